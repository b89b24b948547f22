"""How every importance method cuts its work: rows grouped by length, padding dropped, forwards bounded by tokens.

A caller may hand over batches in any order and with any padding. Each public function here first
reads the rows' valid spans from ``attention_mask`` (left or right padding), sorts the rows by
length, splits them into groups whose padded size is close to their real size
(:func:`length_groups`), and runs each group compacted to its own width (:func:`compact`): every
row starts at column 0, with no column that is padding in every row. Results go back to the
caller's rows and columns (:class:`Rows`), so the output does not depend on the order or padding of
the input, only the speed would have.

Memory is bounded by *tokens per forward*: rows x sequence width (copies included, e.g. alpha steps
or masked heads), at most ``max_tokens_per_forward``. A single sequence longer than the bound is an
error, not a silent overrun.

:func:`over_batches` is the one loop over a prepared dataloader (progress bar, per-batch work,
``gather_for_metrics``, concatenation) shared by the importance methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..progress import progress

DEFAULT_MAX_TOKENS = 16384
"""Default tokens per forward: the former ``chunk_size`` default (256 rows) at ``max_length`` 64."""

GROUP_OVERHEAD_TOKENS = 24
"""Cost of one more group, in padded tokens, when :func:`length_groups` splits rows (fixed per-forward costs)."""

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Rows",
    "row_spans",
    "check_fits",
    "length_groups",
    "compact",
    "token_budget",
    "split_evenly",
    "sub_batches",
    "over_batches",
]


def token_budget(max_tokens_per_forward: int | None, chunk_size: int | None = None) -> tuple[int, int | None]:
    """Validated ``(max tokens per forward, max rows per forward or None)``.

    ``chunk_size`` is the deprecated row cap of earlier versions; when given it still holds (rows
    per forward, copies included), on top of the token bound.

    Raises:
        ValueError: a bound below 1.
    """
    tokens = DEFAULT_MAX_TOKENS if max_tokens_per_forward is None else int(max_tokens_per_forward)
    if tokens < 1:
        raise ValueError(f"max_tokens_per_forward must be >= 1, got {max_tokens_per_forward}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return tokens, None if chunk_size is None else int(chunk_size)


@dataclass(frozen=True)
class Rows:
    """Valid spans of a batch's rows: row ``b`` holds tokens at columns ``start[b] .. start[b] + length[b] - 1``."""

    start: list[int]
    length: list[int]
    width: int

    def __len__(self) -> int:
        return len(self.length)


def row_spans(attention_mask: torch.Tensor) -> Rows:
    """Read each row's span of tokens from ``attention_mask [B, T]`` (right or left padding).

    Raises:
        ValueError: a row with no token, or padding between two tokens of a row (neither left
            nor right padding: its positions would be ambiguous).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    valid = attention_mask.detach().to("cpu").bool()
    lengths = valid.sum(-1)
    first = valid.int().argmax(-1)
    starts, lens = first.tolist(), lengths.tolist()
    for b, (s, n) in enumerate(zip(starts, lens)):
        if n == 0:
            raise ValueError(f"attention_mask row {b} has no token (all padding); drop empty examples first")
        if not bool(valid[b, s : s + n].all()):
            raise ValueError(
                f"attention_mask row {b} has padding between tokens; only right or left padding is supported"
            )
    return Rows(starts, lens, int(attention_mask.shape[1]))


def check_fits(lengths: Sequence[int], max_tokens: int) -> None:
    """Raise unless every row fits one forward.

    Raises:
        ValueError: a row longer than ``max_tokens`` (one line: the length, the bound, what to change).
    """
    longest = max((int(n) for n in lengths), default=0)
    if longest > max_tokens:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit max_tokens_per_forward={max_tokens}; "
            "raise max_tokens_per_forward (or shorten model.max_length)"
        )


def length_groups(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None, overhead: int = GROUP_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Split rows into groups of similar length, each run at its own width.

    Rows are sorted by length; contiguous runs of the sorted order form the groups, chosen (dynamic
    programming, O(B^2)) to minimise ``Σ_groups (rows x longest + overhead)`` in tokens, with at most
    ``max_tokens`` tokens (and ``max_rows`` rows) per group.

    Returns:
        Row indices per group, each group in ascending length; every row exactly once.

    Raises:
        ValueError: a row longer than ``max_tokens``.
    """
    check_fits(lengths, max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sl = [int(lengths[i]) for i in order]
    n = len(sl)
    inf = float("inf")
    best = [0.0] + [inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # best split of the first j sorted rows; the last group is sl[i:j]
        width = sl[j - 1]
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows * width > max_tokens or (max_rows is not None and rows > max_rows):
                break
            cost = best[i] + rows * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def compact(
    batch: dict[str, torch.Tensor], rows: Rows, index: Sequence[int], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """The rows ``index`` of ``batch``, right-padded to their longest length (columns of padding dropped).

    Keys ``input_ids``, ``attention_mask``, ``token_type_ids`` are moved (tokens shifted to column 0,
    padding ``pad_id`` / 0 after); ``labels`` is selected; other keys are left out. Shapes
    ``[len(index), max length]``.
    """
    ids = batch["input_ids"]
    device = ids.device
    idx = torch.as_tensor(list(index), dtype=torch.long, device=device)
    starts = torch.as_tensor([rows.start[i] for i in index], dtype=torch.long, device=device)
    lens = torch.as_tensor([rows.length[i] for i in index], dtype=torch.long, device=device)
    width = int(max(rows.length[i] for i in index))
    cols = torch.arange(width, device=device)
    inside = cols[None, :] < lens[:, None]
    src = (starts[:, None] + cols[None, :]).clamp_max(rows.width - 1)
    out: dict[str, torch.Tensor] = {}
    for key in INPUT_KEYS:
        if key not in batch or batch[key] is None:
            continue
        taken = batch[key][idx].gather(1, src)
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.where(inside, taken, torch.full_like(taken, fill))
    out["attention_mask"] = inside.to(batch["attention_mask"].dtype)
    if "labels" in batch and batch["labels"] is not None:
        out["labels"] = batch["labels"][idx]
    return out


def split_evenly(total: int, per: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``0 .. total-1`` in as few parts of at most ``per`` as possible, of near-equal size."""
    per = max(1, int(per))
    parts = -(-total // per)
    size = -(-total // max(parts, 1))
    for start in range(0, total, size):
        yield start, min(start + size, total)


def sub_batches(
    batch: dict[str, torch.Tensor], max_tokens: int, pad_id: int = 0
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(caller rows, compacted sub-batch)`` per length group of ``batch`` (:func:`length_groups`,
    :func:`compact`): at most ``max_tokens`` tokens each, padding columns dropped.

    Raises:
        ValueError: as :func:`row_spans` and :func:`check_fits`.
    """
    rows = row_spans(batch["attention_mask"])
    for index in length_groups(rows.length, max_tokens):
        yield index, compact(batch, rows, index, pad_id)


def over_batches(
    dataloader,
    accelerator,
    description: str | None,
    work: Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, ...]:
    """Run ``work(batch)`` over a prepared dataloader and gather its per-example outputs across processes.

    ``work`` returns one tensor or a tuple of tensors, each ``[batch, ...]`` on the batch's device.
    Outputs pass through ``accelerator.gather_for_metrics`` (duplicates added by sharding dropped)
    and are concatenated on CPU along dim 0, in dataloader order. A progress bar is shown on the
    main process when ``description`` is given.

    Returns:
        A tuple with one ``[N, ...]`` tensor per output of ``work``.

    Raises:
        ValueError: the dataloader gave no batch (scores of no example would be zeros that look real).
    """
    it = progress(dataloader, description, accelerator) if description else dataloader
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in it:
        out = work(batch)
        single = isinstance(out, torch.Tensor)
        out = (out,) if single else tuple(out)
        gathered = accelerator.gather_for_metrics(out)
        parts.append(tuple(t.cpu() for t in gathered))
    if not parts:
        raise ValueError(f"{description or 'importance'}: the dataloader gave no batch; give at least one example")
    return tuple(torch.cat(column) for column in zip(*parts))
