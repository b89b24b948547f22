"""Export by budget after recovery: the most pruned curve step whose *recovered* metric stays within budget
(steps sized by heads kept, or by FLOPs kept when neurons are pruned too).

Recovering a candidate costs a training run, so the steps are searched, not all recovered. The
search assumes that the recovered metric does not rise as heads are removed (true of the curves
before recovery up to noise); under that assumption a binary search over the steps finds the most
pruned step within budget with ``ceil(log2(candidates + 1))`` recoveries. It leans to the most
pruned side (the midpoint rounds towards more pruning) and starts above a step known to be within
budget without recovery, since recovery does not make a model worse there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Trial", "BudgetChoice", "search_budget"]


@dataclass
class Trial:
    """One recovered candidate: curve step ``index``, its size (heads kept or FLOPs fraction kept) and its
    recovered metric (fraction in [0, 1])."""

    index: int
    size: float
    metric: float
    within: bool


@dataclass
class BudgetChoice:
    """Result of :func:`search_budget`: the chosen step and every candidate tried, in the order tried."""

    index: int
    trials: list[Trial]

    @property
    def tried(self) -> list[int]:
        return [t.index for t in self.trials]


def search_budget(
    sizes: Sequence[float],
    floor: float,
    recovered_metric: Callable[[int], float],
    *,
    known_within: int = 0,
) -> BudgetChoice:
    """Most pruned step whose recovered metric is ``>= floor``, by binary search over the steps.

    Args:
        sizes: the size of each curve step (heads kept, or FLOPs fraction kept), strictly decreasing
            (step 0 = least pruned).
        floor: the lowest acceptable metric (unpruned metric minus ``export.max_drop``).
        recovered_metric: step index -> metric of that step after recovery (a training run; called
            at most once per index).
        known_within: a step already known to be within budget (e.g. the most pruned one within
            budget *before* recovery); the search looks only at more pruned steps. It is recovered
            at the end if no more pruned step qualifies, so the returned step is always a recovered one.

    Returns:
        :class:`BudgetChoice`: ``index`` of the chosen step and the trials in the order run. If even
        ``known_within`` misses the floor after recovery, ``index`` is still ``known_within`` (its
        trial says ``within=False``; the caller reports it).

    Raises:
        ValueError: ``sizes`` empty or not strictly decreasing, ``known_within`` out of range.
    """
    n = len(sizes)
    if n == 0:
        raise ValueError("search_budget needs at least one curve step")
    if any(a <= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"the steps' sizes must decrease strictly along the curve, got {list(sizes)}")
    if not 0 <= known_within < n:
        raise ValueError(f"known_within {known_within} is not a step index (0..{n - 1})")
    trials: dict[int, Trial] = {}
    order: list[int] = []

    def ok(i: int) -> bool:
        if i not in trials:
            m = float(recovered_metric(i))
            trials[i] = Trial(i, float(sizes[i]), m, m >= floor - 1e-12)
            order.append(i)
        return trials[i].within

    lo, hi = known_within, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2  # rounds towards the most pruned side
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    ok(lo)  # the chosen step is always a recovered one
    return BudgetChoice(lo, [trials[i] for i in order])
