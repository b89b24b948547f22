"""Adversarial triggers from attribution patterns (Hao et al. 2021, section 6), as the authors ran them.

This follows the official code step by step (github.com/YRdddream/attattr,
``examples/run_adver_connection.py`` for extraction and ``examples/run_adver_evaluate.py`` for the
attack); nothing of it is copied, the procedure is re-implemented on this package's engine.

Extraction (``run_adver_connection.py``), on training examples:

1. the target is the model's **predicted** label; attributions use a zero baseline and the left
   Riemann sum with m = 64 (``scaled_input`` with ``batch_size 16 x num_batch 4``);
2. for each layer, the head holding the largest attribution entry; across layers, the (layer, head)
   whose largest entry is largest (strictly larger replaces, so ties keep the lower layer);
3. in that head's ``[T, T]`` matrix (all tokens, [CLS]/[SEP] and the diagonal included), the two
   largest entries: top-1 and top-2 connections ``(query i, key j)``. The example's pattern is the
   two token pairs with their positions, scored by the sum of the two attributions;
4. patterns are sorted by that score, largest first, and those below ``threshold`` (0.02) dropped.

Attack (``run_adver_evaluate.py``), for each pattern:

1. the positions of the top-1 pair, plus those of the top-2 pair when ``top2 / top1 >= 0.2``
   (de-duplicated, sorted); positions of [CLS]/[SEP] are dropped;
2. each remaining token keeps its segment (first / second sentence) and its relative position
   inside it: ``(index within the segment, from 1) / (segment length)``;
3. the tokens are inserted into **every** dev example of **every** class: in each segment, in order,
   at ``round((len + n) * relative_position)`` (Python's ``round``; a position equal to the previous
   insertion's moves one to the right), where ``len`` is the dev segment's length and ``n`` the
   number of tokens inserted into that segment; then the pair is truncated as BERT does (the longer
   segment loses its last token until it fits) and the special tokens are added, so truncation
   never removes [SEP];
4. accuracy is measured per gold class before and after.

The paper's table (its Table 3) shows the three triggers with the largest accuracy drop; here the
drop of a pattern is the mean over classes of the per-class drop, in percentage points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..importance.attattr import iter_layer_attributions
from ..models import forward_logits, kept_heads
from ..progress import progress
from ..sharding import gather_in_order, my_share
from ..tasks import Encoded, Examples, make_dataloader

__all__ = [
    "Pattern",
    "example_pattern",
    "rank_patterns",
    "extract_patterns",
    "trigger_tokens",
    "insert_trigger",
    "Template",
    "attack",
    "paper_table",
]


@dataclass
class Pattern:
    """One source example's pattern: its top-1 and top-2 connections in the chosen head.

    Positions are ``(query, key)`` indices into ``tokens`` / ``input_ids`` (the source example,
    special tokens included), as the official ``top1position`` / ``top2position``.
    """

    source_index: int
    layer: int
    head: int  # original head number
    top1_position: tuple[int, int]
    top2_position: tuple[int, int]
    top1_tokens: tuple[str, str]
    top2_tokens: tuple[str, str]
    max_combined_attr: tuple[float, float]
    target_label: int  # predicted label (the attribution target)
    gold_label: int
    tokens: list[str]
    input_ids: list[int]

    @property
    def score(self) -> float:
        """Sum of the top-1 and top-2 attributions (the official sort key)."""
        return float(self.max_combined_attr[0] + self.max_combined_attr[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = self.score
        return d


def example_pattern(layer_attrs: list[torch.Tensor]) -> tuple[int, int, tuple[int, int, float], tuple[int, int, float]]:
    """The official per-example choice of head and connections.

    Args:
        layer_attrs: one ``[heads, T, T]`` attribution tensor per layer (query, key), for one example
            without padding.

    Returns:
        ``(layer, head, (q1, k1, a1), (q2, k2, a2))``: the position in ``layer_attrs`` and head index
        of the chosen head, and its largest and second-largest entries.

    Raises:
        ValueError: no layer, or fewer than 2 entries in a head.
    """
    if not layer_attrs:
        raise ValueError("example_pattern needs at least one layer of attributions")
    best_layer, best_head, best_max = -1, -1, None
    for layer, attr in enumerate(layer_attrs):
        if attr.numel() == 0:
            continue
        t = attr.shape[-1]
        head = int(torch.argmax(attr.reshape(-1))) // (t * t)  # head of the layer's largest entry
        value = attr[head].max()
        if best_max is None or bool(value > best_max):
            best_layer, best_head, best_max = layer, head, value
    if best_max is None:
        raise ValueError("every layer is empty")
    m = layer_attrs[best_layer][best_head]
    t = m.shape[-1]
    if t * t < 2:
        raise ValueError("a pattern needs at least 2 token pairs")
    flat = m.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:2].tolist()
    (q1, k1), (q2, k2) = divmod(order[0], t), divmod(order[1], t)
    return best_layer, best_head, (q1, k1, float(flat[order[0]])), (q2, k2, float(flat[order[1]]))


def rank_patterns(patterns: list[Pattern], threshold: float = 0.02) -> list[Pattern]:
    """Sort by ``score`` (top-1 + top-2 attribution), largest first; drop those below ``threshold``."""
    return [p for p in sorted(patterns, key=lambda p: p.score, reverse=True) if p.score >= threshold]


def extract_patterns(
    model,
    tokenizer,
    data: Encoded,
    *,
    steps: int = 64,
    quadrature: str = "left",
    mode: str = "fast",
    batch_size: int = 16,
    accelerator=None,
) -> list[Pattern]:
    """One pattern per example of ``data`` (predicted-label target), in ``data`` order (unranked).

    Args:
        model: the classifier; tokenizer: gives the token strings.
        data: source examples (training examples in the paper; labels are kept as ``gold_label``).
        steps, quadrature, mode: attribution settings (official: 64, left).
        accelerator: with several processes, each extracts every N-th example and all receive every
            pattern (:mod:`prune_attattr.sharding`).

    Returns:
        ``len(data)`` patterns; pass them to :func:`rank_patterns`.
    """
    share = my_share(len(data), accelerator)  # several processes: each extracts its share of the examples
    loader = make_dataloader(data.subset(share), batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0)
    order = [share[i] for b in loader.batch_sampler for i in b]
    heads = kept_heads(model)
    device = next(model.parameters()).device
    mine: list[Pattern] = []
    pos = 0
    for batch in progress(loader, "trigger extraction", accelerator):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            pred = forward_logits(model, batch).argmax(-1)
        per_layer: dict[int, torch.Tensor] = {}
        layer_ids: list[int] = []
        for layer, a, _ in iter_layer_attributions(model, batch, steps=steps, target="predicted", mode=mode, quadrature=quadrature):
            per_layer[layer] = a.cpu()
            layer_ids.append(layer)
        for b in range(batch["input_ids"].shape[0]):
            idx = order[pos]
            pos += 1
            n = int(batch["attention_mask"][b].sum())
            layer_pos, head, (q1, k1, a1), (q2, k2, a2) = example_pattern([per_layer[l][b, :, :n, :n] for l in layer_ids])
            layer = layer_ids[layer_pos]
            ids = [int(x) for x in batch["input_ids"][b, :n]]
            toks = tokenizer.convert_ids_to_tokens(ids)
            mine.append(Pattern(
                source_index=idx,
                layer=layer,
                head=int(heads[layer][head]),
                top1_position=(q1, k1),
                top2_position=(q2, k2),
                top1_tokens=(toks[q1], toks[k1]),
                top2_tokens=(toks[q2], toks[k2]),
                max_combined_attr=(a1, a2),
                target_label=int(pred[b]),
                gold_label=int(batch["labels"][b]),
                tokens=toks,
                input_ids=ids,
            ))
    return gather_in_order([p.source_index for p in mine], mine, len(data), accelerator)


def _segments(input_ids: list[int], special_ids: set[int]) -> list[list[int]]:
    """Positions of the text segments of one encoded example (runs of non-special tokens)."""
    segs, cur = [], []
    for i, x in enumerate(input_ids):
        if x in special_ids:
            if cur:
                segs.append(cur)
            cur = []
        else:
            cur.append(i)
    if cur:
        segs.append(cur)
    return segs


def trigger_tokens(pattern: Pattern, special_ids: set[int], pair_ratio: float = 0.2) -> list[tuple[int, float, int]]:
    """The tokens the attack inserts: ``(segment 0/1, relative position, token id)``, in position order.

    Top-1 pair's positions, plus the top-2 pair's when ``top2 / top1 >= pair_ratio``; duplicates
    merged; special tokens dropped. A position in a segment of length L at index r (from 1) gets the
    relative position r / L (official: ``pos / (seg_pos - 1)`` and ``(pos - seg_pos) / len_b``).

    Raises:
        ValueError: the source example has more than two text segments.
    """
    a1, a2 = pattern.max_combined_attr
    positions = set(pattern.top1_position)
    if not (a1 != 0 and a2 / a1 < pair_ratio):
        positions |= set(pattern.top2_position)
    segs = _segments(pattern.input_ids, special_ids)
    if len(segs) > 2:
        raise ValueError(f"pattern {pattern.source_index}: {len(segs)} text segments; triggers handle one or two")
    where = {p: (s, r + 1, len(seg)) for s, seg in enumerate(segs) for r, p in enumerate(seg)}
    out = []
    for p in sorted(positions):
        if pattern.input_ids[p] in special_ids:
            continue
        s, r, n = where[p]
        out.append((s, r / n, pattern.input_ids[p]))
    return out


def insert_trigger(tokens_a: list[int], tokens_b: list[int] | None, trigger: list[tuple[int, float, int]]) -> tuple[list[int], list[int] | None]:
    """Insert trigger tokens into one example's segments (official ``convert_examples_to_features``).

    In each segment, in order: ``pos = round((len + n) * rel)`` with Python's ``round`` (ties to
    even), ``len`` the segment's original length and ``n`` the tokens inserted into it; a position
    equal to the previous one moves one to the right.

    Raises:
        ValueError: a second-segment token for a single-segment example.
    """
    out: list[list[int] | None] = [list(tokens_a), list(tokens_b) if tokens_b is not None else None]
    for seg in (0, 1):
        items = [(rel, tok) for s, rel, tok in trigger if s == seg]
        if not items:
            continue
        tokens = out[seg]
        if tokens is None:
            raise ValueError("the trigger has second-segment tokens but the example has one segment")
        orig, n, prev = len(tokens), len(items), -1
        for rel, tok in items:
            cur = round((orig + n) * rel)
            if cur == prev:
                cur += 1
            prev = cur
            tokens.insert(cur, tok)
    return out[0], out[1]


def _truncate_pair(a: list[int], b: list[int], max_tokens: int) -> None:
    """BERT's ``_truncate_seq_pair``: pop the last token of the longer segment until they fit."""
    while len(a) + len(b) > max_tokens:
        (a if len(a) > len(b) else b).pop()


@dataclass
class Template:
    """Where the tokenizer puts its special tokens around one or two segments, and the segment ids.

    Built from the tokenizer itself (``tokenizer("a", "b")``), so BERT's ``[CLS] A [SEP] B [SEP]``
    and RoBERTa's ``<s> A </s></s> B </s>`` both work.
    """

    single: tuple[list[int], list[int]]  # prefix, suffix ids
    pair: tuple[list[int], list[int], list[int]]  # prefix, middle, suffix ids
    single_types: tuple[list[int], int, list[int]] | None
    pair_types: tuple[list[int], int, list[int], int, list[int]] | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Template:
        """Raises: ValueError when the probe words are not single tokens for this tokenizer."""
        a = tokenizer("a", add_special_tokens=False)["input_ids"]
        b = tokenizer("b", add_special_tokens=False)["input_ids"]
        if len(a) != 1 or len(b) != 1:
            raise ValueError("cannot read the tokenizer's special-token layout ('a'/'b' are not single tokens)")
        one = tokenizer("a")
        two = tokenizer("a", "b")
        ia = one["input_ids"].index(a[0])
        s_ids = one["input_ids"]
        p_ids = two["input_ids"]
        pa = p_ids.index(a[0])
        pb = pa + 1 + p_ids[pa + 1 :].index(b[0])
        single = (s_ids[:ia], s_ids[ia + 1 :])
        pair = (p_ids[:pa], p_ids[pa + 1 : pb], p_ids[pb + 1 :])
        st = one.get("token_type_ids")
        pt = two.get("token_type_ids")
        single_types = (st[:ia], st[ia], st[ia + 1 :]) if st is not None else None
        pair_types = (pt[:pa], pt[pa], pt[pa + 1 : pb], pt[pb], pt[pb + 1 :]) if pt is not None else None
        return cls(single, pair, single_types, pair_types)

    def build(self, a: list[int], b: list[int] | None, max_length: int) -> tuple[list[int], list[int] | None]:
        """Truncate (never a special token) and add the special tokens: ``(input ids, token type ids)``."""
        a = list(a)
        if b is None:
            pre, suf = self.single
            a = a[: max(0, max_length - len(pre) - len(suf))]
            ids = pre + a + suf
            t = self.single_types
            types = t[0] + [t[1]] * len(a) + t[2] if t is not None else None
            return ids, types
        b = list(b)
        pre, mid, suf = self.pair
        _truncate_pair(a, b, max_length - len(pre) - len(mid) - len(suf))
        ids = pre + a + mid + b + suf
        t = self.pair_types
        types = t[0] + [t[1]] * len(a) + t[2] + [t[3]] * len(b) + t[4] if t is not None else None
        return ids, types


@torch.no_grad()
def _correct(model, data: Encoded, pad_id: int, batch_size: int, accelerator=None) -> torch.Tensor:
    """``[N]`` bool: prediction == label, in ``data`` order (each process evaluates its share)."""
    share = my_share(len(data), accelerator)
    loader = make_dataloader(data.subset(share), batch_size=batch_size, pad_id=pad_id)
    order = [share[i] for b in loader.batch_sampler for i in b]
    device = next(model.parameters()).device
    hits = [forward_logits(model, {k: v.to(device) for k, v in b.items()}).argmax(-1).cpu() == b["labels"] for b in loader]
    hits = torch.cat(hits).tolist() if hits else []
    return torch.tensor(gather_in_order(order, hits, len(data), accelerator), dtype=torch.bool)


def _per_class(correct: torch.Tensor, labels: list[int], n_classes: int) -> list[float | None]:
    y = torch.tensor(labels)
    return [float(correct[y == c].float().mean()) if bool((y == c).any()) else None for c in range(n_classes)]


def attack(
    model,
    tokenizer,
    dev: Examples,
    patterns: list[Pattern],
    *,
    max_length: int,
    n_classes: int,
    pair_ratio: float = 0.2,
    batch_size: int = 64,
    accelerator=None,
) -> dict:
    """Insert each pattern's trigger into every dev example; per-class accuracy before and after.

    Args:
        dev: raw dev examples (text, optional pair, gold label); tokenised here without special
            tokens so the trigger can go into each segment.
        patterns: ranked patterns (their order is their rank by attribution).
        accelerator: with several processes, each evaluates every N-th dev example; all get the result.

    Returns:
        ``{"accuracy_before": [per class], "patterns": [{rank, pattern fields, inserted tokens,
        accuracy_after, drop_points (per class), mean_drop_points}]}``; accuracies are fractions,
        drops percentage points; a class with no dev example has ``None``.
    """
    special = set(tokenizer.all_special_ids)
    tpl = Template.from_tokenizer(tokenizer)
    pad = tokenizer.pad_token_id or 0
    enc_a = tokenizer(dev.texts, add_special_tokens=False)["input_ids"]
    enc_b = tokenizer(dev.pairs, add_special_tokens=False)["input_ids"] if dev.pairs is not None else [None] * len(dev)

    def encoded(trigger) -> Encoded:
        ids, types = [], []
        for a, b in zip(enc_a, enc_b):
            a2, b2 = insert_trigger(a, b, trigger)
            i, t = tpl.build(a2, b2, max_length)
            ids.append(i)
            types.append(t)
        return Encoded(ids, types if types[0] is not None else None, list(dev.labels))

    before = _per_class(_correct(model, encoded([]), pad, batch_size, accelerator), dev.labels, n_classes)
    results = []
    for rank, p in enumerate(progress(patterns, "trigger attack", accelerator), 1):
        trig = trigger_tokens(p, special, pair_ratio)
        after = _per_class(_correct(model, encoded(trig), pad, batch_size, accelerator), dev.labels, n_classes)
        drops = [None if b is None else 100 * (b - a) for b, a in zip(before, after)]
        valid = [d for d in drops if d is not None]
        results.append(
            {
                "rank": rank,
                **p.to_dict(),
                "inserted": [{"segment": s, "relative_position": r, "token": tokenizer.convert_ids_to_tokens(t)} for s, r, t in trig],
                "accuracy_after": after,
                "drop_points": drops,
                "mean_drop_points": sum(valid) / len(valid) if valid else None,
            }
        )
    return {"accuracy_before": before, "patterns": results}


def paper_table(result: dict, n: int = 3) -> dict:
    """The paper's Table 3: the ``n`` patterns with the largest mean drop, and per class the mean drop
    over those ``n`` ("Avg. Δ"), in percentage points.

    Returns:
        ``{"patterns": [rank...], "avg_drop_per_class": [...], "mean_drop_points": float | None}``.
    """
    pats = [p for p in result["patterns"] if p["mean_drop_points"] is not None]
    top = sorted(pats, key=lambda p: p["mean_drop_points"], reverse=True)[:n]
    per_class = []
    for c in range(len(result["accuracy_before"])):
        vals = [p["drop_points"][c] for p in top if p["drop_points"][c] is not None]
        per_class.append(sum(vals) / len(vals) if vals else None)
    means = [p["mean_drop_points"] for p in top]
    return {"patterns": [p["rank"] for p in top], "avg_drop_per_class": per_class, "mean_drop_points": sum(means) / len(means) if means else None}
