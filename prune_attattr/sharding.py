"""Splitting per-example work (Python objects, not tensors) across Accelerate processes.

Tensor loops use ``accelerator.prepare(dataloader)`` and ``gather_for_metrics``. Work whose results
are Python objects (the adversarial-trigger patterns, per-example hits of inserted triggers) is split
here instead: process ``p`` of ``N`` takes examples ``p, p + N, p + 2N, ...``, and the results of
every process are gathered back into example order on every process. With one process (or no
accelerator) nothing is split.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["my_share", "gather_in_order"]


def my_share(n: int, accelerator=None) -> list[int]:
    """Indices ``0..n-1`` this process works on (strided; all of them for one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(range(n))
    return list(range(accelerator.process_index, n, accelerator.num_processes))


def gather_in_order(index: Sequence[int], values: Sequence, n: int, accelerator=None) -> list:
    """Every process's ``(index, value)`` pairs, as one list of ``n`` values in index order (on every process).

    Raises:
        RuntimeError: an index is missing or given twice (the shares did not cover ``0..n-1``).
    """
    pairs = list(zip(index, values))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    out: list = [None] * n
    seen = [False] * n
    for i, v in pairs:
        if seen[i]:
            raise RuntimeError(f"example {i} was computed twice across processes")
        out[i], seen[i] = v, True
    if not all(seen):
        raise RuntimeError(f"{seen.count(False)} of {n} examples were computed by no process")
    return out
