"""Which heads and feed-forward neurons to keep under one FLOPs budget (Kwon et al. 2022, section 4.1).

Kwon et al. ("A Fast Post-Training Pruning Framework for Transformers", arXiv 2204.09656, Algorithm 1
and ``prune/search.py`` of their code) rank heads and neurons globally by importance and, for every
number ``n`` of heads kept, keep the ``n`` top heads and fill the rest of the FLOPs budget with the top
neurons; of all splits the one with the largest total kept importance wins. With one cost per head and
one per neuron that search is exact: for a fixed ``n`` the top ``n`` heads and the top neurons that fit are
the best choice, and every ``n`` is tried.

What :func:`search_units` does, and why:

* **Costs per layer.** A cost model may give each layer its own per-unit cost (e.g. local attention
  layers). Units are therefore ranked by importance per FLOP (``score / cost``), the greedy order of
  the knapsack problem; with equal costs across layers this is Kwon et al.'s ranking by score, and the
  search is theirs. With unequal costs it is the same prefix search over that order (not an exact
  knapsack, but the kept importance is still non-decreasing in the budget: it is a maximum over ``n`` of
  functions that each grow with the budget).
* **Filling.** The neurons fill the budget left by the heads (``fill``), as Kwon et al. do: every split
  uses the budget up to less than one unit.
* **Zero heads is a split too** (Kwon et al. start at one head): the importance decides; a layer, or the
  whole model, may lose all heads.
* **Balancing the two kinds of unit (``balance``).** The search adds head scores to neuron scores, so it
  needs them on one scale. Fisher (Kwon et al.) and Taylor scores are both estimates of the loss change
  when the unit is removed, and AttAttr's are attributions of the target probability, so within one
  method the units agree, but the *aggregation* is not additive for AttAttr: a head's score is the
  maximum over its ``T x T`` attention entries, a neuron's the maximum over its ``T`` tokens, and the
  maximum of more entries is larger; a random score has no unit at all (uniform head and neuron scores
  would make a head, which costs as much as ~66 neurons of MiniLM, as valuable as one neuron).
  ``balance="cost"`` (the default) multiplies each kind's scores by one positive factor so that its
  total importance per FLOP is 1 (total candidate cost / total |score|): the average head and the average
  neuron are then worth the same per FLOP, and the search decides by the *shape* of each kind's
  distribution, i.e. it prunes the tail of unimportant units of either kind first. This is invariant to
  any per-kind scale of the scores, the mismatch above. ``balance="none"`` is Kwon et al.'s search on
  raw scores (right when both kinds estimate the same additive quantity, as Fisher does: on the
  fine-tuned MiniLM at 50% / 35% FLOPs, Fisher masks score 85.21% / 81.31% SST-2 dev with ``"none"``
  against 84.06% / 79.47% with ``"cost"``, ``benchmarks/least_squares.py``). Use ``"none"`` for Fisher
  and Taylor, ``"cost"`` for random scores (raw uniform scores would prune every head first) and for
  AttAttr's paper aggregation (``max``). AttAttr's additive aggregations (``importance.attattr.aggregate``
  ``sum``, ``abs_sum``, ``sq_sum``: per example, the sum of a unit's attribution, i.e. integrated
  gradients of a gate on that head's or neuron's output, complete over a layer) put heads and neurons
  in one unit, the objective's, like Fisher: ``balance: auto`` uses ``"none"`` for them
  (:func:`prune_attattr.prune.curve.balance_for`). A signed ``sum`` may be negative: such a unit is
  ranked below every unit with a positive score (removing it is estimated to help).
  Within one kind the order is the same either way; ``units="heads"`` or ``"neurons"`` is unaffected.

Units already pruned (absent from ``kept_heads``/``kept_neurons``) are neither candidates nor counted in
the cost; the returned pruned sets are relative to the unpruned architecture and include them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..families import SUBLAYERS

__all__ = ["BALANCE", "UNITS", "SearchError", "SublayerChoice", "UnitChoice", "lowest_fraction", "search_sublayers", "search_units"]

UNITS = ("heads", "neurons", "both")
BALANCE = ("cost", "none")


class SearchError(ValueError):
    """The search cannot run on what it was given (a shape, a mode, or a budget it cannot reach)."""


@dataclass(frozen=True)
class UnitChoice:
    """The result of :func:`search_units`.

    Attributes:
        pruned_heads: ``{layer: [original head ids]}`` not kept (already pruned ones included; layers
            with none omitted), for :func:`prune_attattr.prune.heads.prune_heads`.
        pruned_neurons: ``{layer: [original neuron ids]}`` not kept, the same way.
        heads_kept, neurons_kept: numbers of units kept.
        flops: FLOPs per token of the kept model (``fixed + sum of kept units' costs``).
        fraction: ``flops`` / FLOPs per token of the unpruned architecture (``<= budget``).
        importance: total kept importance, in the balanced units that were maximised
            (``head_weight * head scores + neuron_weight * neuron scores`` of kept units).
        head_weight, neuron_weight: the factors ``balance`` put on each kind's scores (1.0 for ``"none"``
            and for ``units="heads"``/``"neurons"``, where only one kind is chosen).
    """

    pruned_heads: dict[int, list[int]]
    pruned_neurons: dict[int, list[int]]
    heads_kept: int
    neurons_kept: int
    flops: float
    fraction: float
    importance: float
    head_weight: float
    neuron_weight: float


def _candidates(scores: torch.Tensor, kept: Sequence[Sequence[int]] | None, what: str) -> torch.Tensor:
    """Boolean ``[L, N]``: units still present."""
    present = torch.zeros(scores.shape, dtype=torch.bool) if kept is not None else torch.ones(scores.shape, dtype=torch.bool)
    if kept is not None:
        if len(kept) != scores.shape[0]:
            raise SearchError(f"kept {what} list {len(kept)} layers but the scores have {scores.shape[0]}")
        for layer, ids in enumerate(kept):
            for i in ids:
                if not 0 <= int(i) < scores.shape[1]:
                    raise SearchError(f"kept {what} id {i} of layer {layer} is out of range 0..{scores.shape[1] - 1}")
                present[layer, int(i)] = True
    return present


def _ranked(scores: torch.Tensor, cost_per_layer: torch.Tensor, present: torch.Tensor, weight: float):
    """Candidates in decreasing importance per FLOP: ``(flat ids, cumulative cost [n+1], cumulative importance [n+1])``."""
    cost = cost_per_layer[:, None].expand_as(scores)
    flat = present.flatten().nonzero().flatten()
    s = (weight * scores).flatten()[flat]
    c = cost.flatten()[flat]
    ratio = s / c
    order = torch.sort(ratio, descending=True, stable=True).indices
    flat, s, c = flat[order], s[order], c[order]
    zero = torch.zeros(1, dtype=torch.float64)
    return flat, torch.cat([zero, c.cumsum(0)]), torch.cat([zero, s.cumsum(0)])


def _weight(scores: torch.Tensor, cost_per_layer: torch.Tensor, present: torch.Tensor, balance: str) -> float:
    if balance == "none":
        return 1.0
    total = float((scores.abs() * present).sum())
    cost = float((cost_per_layer[:, None].expand_as(scores) * present).sum())
    return cost / total if total > 0 else 1.0


def _as64(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if not torch.isfinite(t).all():
        raise SearchError(f"{what} has non-finite entries")
    return t


def lowest_fraction(
    head_cost: Sequence[float] | torch.Tensor,
    neuron_cost: Sequence[float] | torch.Tensor,
    fixed_cost: float,
    heads: int,
    neurons: int,
    units: str,
    *,
    kept_heads: Sequence[Sequence[int]] | None = None,
    kept_neurons: Sequence[Sequence[int]] | None = None,
) -> float:
    """The smallest FLOPs fraction ``units`` can reach (every unit of that kind pruned), e.g. to drop
    budgets of a curve a heads-only search cannot meet. Arguments as :func:`search_units`
    (``heads``/``neurons``: units per layer of the unpruned architecture)."""
    hc, nc = _as64(head_cost, "head_cost"), _as64(neuron_cost, "neuron_cost")
    full = float(fixed_cost) + heads * float(hc.sum()) + neurons * float(nc.sum())
    hp = _candidates(torch.zeros(len(hc), heads), kept_heads, "heads")
    npres = _candidates(torch.zeros(len(nc), neurons), kept_neurons, "neurons")
    floor = float(fixed_cost)
    if units == "heads":
        floor += float((nc[:, None] * npres).sum())
    elif units == "neurons":
        floor += float((hc[:, None] * hp).sum())
    elif units != "both":
        raise SearchError(f"pruning.units must be one of {', '.join(UNITS)}, got {units!r}")
    return floor / full


def search_units(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    head_cost: Sequence[float] | torch.Tensor,
    neuron_cost: Sequence[float] | torch.Tensor,
    fixed_cost: float,
    budget: float,
    *,
    units: str = "both",
    kept_heads: Sequence[Sequence[int]] | None = None,
    kept_neurons: Sequence[Sequence[int]] | None = None,
    balance: str = "cost",
) -> UnitChoice:
    """Keep the heads and neurons of largest total importance whose FLOPs fit ``budget`` (see the module docstring).

    Args:
        head_scores: ``[L, H]`` importance of every head of the unpruned architecture (higher = more
            important; entries of pruned heads are ignored). Its shape gives ``H`` also for
            ``units="neurons"``, where the values are not used (zeros will do).
        neuron_scores: ``[L, I]`` importance of every feed-forward neuron (values unused for ``units="heads"``).
        head_cost: ``[L]`` FLOPs per token of one head of each layer.
        neuron_cost: ``[L]`` FLOPs per token of one neuron of each layer.
        fixed_cost: FLOPs per token that no unit carries (embeddings, classifier, ...).
        budget: FLOPs per token allowed, as a fraction of the unpruned architecture's
            (``fixed + H * sum(head_cost) + I * sum(neuron_cost)``), in ``(0, 1]``.
        units: ``"both"`` (one budget for heads and neurons), ``"heads"`` (every present neuron kept) or
            ``"neurons"`` (every present head kept).
        kept_heads, kept_neurons: original ids of the units still present per layer
            (:func:`prune_attattr.models.kept_heads`/``kept_neurons``); default all.
        balance: ``"cost"`` or ``"none"`` (module docstring).

    Returns:
        :class:`UnitChoice`; its ``fraction`` is ``<= budget``. A budget above the present model's cost keeps everything present.

    Raises:
        SearchError: shapes that disagree, non-finite scores or costs, a non-positive cost, an unknown
            ``units``/``balance``, a budget outside ``(0, 1]``, or one below what ``units`` can reach
            (the message gives that floor, :func:`lowest_fraction`).
    """
    if units not in UNITS:
        raise SearchError(f"pruning.units must be one of {', '.join(UNITS)}, got {units!r}")
    if balance not in BALANCE:
        raise SearchError(f"balance must be one of {', '.join(BALANCE)}, got {balance!r}")
    if not 0 < budget <= 1:
        raise SearchError(f"the FLOPs budget is a fraction in (0, 1], got {budget}")
    hc, nc = _as64(head_cost, "head_cost"), _as64(neuron_cost, "neuron_cost")
    if hc.dim() != 1 or nc.shape != hc.shape:
        raise SearchError(f"head_cost and neuron_cost must both be [layers], got {tuple(hc.shape)} and {tuple(nc.shape)}")
    if (hc <= 0).any() or (nc <= 0).any():
        raise SearchError("every per-unit cost must be positive")
    layers = hc.shape[0]
    hs, ns = _as64(head_scores, "head_scores"), _as64(neuron_scores, "neuron_scores")
    if hs.dim() != 2 or ns.dim() != 2 or hs.shape[0] != layers or ns.shape[0] != layers:
        raise SearchError(
            f"scores must be [layers, units] for the {layers} layers of the costs, got heads {tuple(hs.shape)}, neurons {tuple(ns.shape)}"
        )
    hp = _candidates(hs, kept_heads, "heads")
    npres = _candidates(ns, kept_neurons, "neurons")
    full = float(fixed_cost) + hs.shape[1] * float(hc.sum()) + ns.shape[1] * float(nc.sum())
    allowed = budget * full
    floor = lowest_fraction(hc, nc, fixed_cost, hs.shape[1], ns.shape[1], units, kept_heads=kept_heads, kept_neurons=kept_neurons)
    if floor * full > allowed:
        raise SearchError(
            f"a FLOPs budget of {budget:.4g} cannot be met pruning {units}: the lowest reachable fraction is {floor:.4g}"
        )
    wh = _weight(hs, hc, hp, balance) if units == "both" else 1.0
    wn = _weight(ns, nc, npres, balance) if units == "both" else 1.0
    h_ids, h_cost, h_val = _ranked(hs, hc, hp, wh)
    n_ids, n_cost, n_val = _ranked(ns, nc, npres, wn)
    room = allowed - float(fixed_cost)
    if units == "heads":
        n_keep = len(n_ids)
        h_keep = int(torch.searchsorted(h_cost, torch.tensor([room - float(n_cost[-1])], dtype=torch.float64), right=True)) - 1
    elif units == "neurons":
        h_keep = len(h_ids)
        n_keep = int(torch.searchsorted(n_cost, torch.tensor([room - float(h_cost[-1])], dtype=torch.float64), right=True)) - 1
    else:
        fits = h_cost <= room  # every number of heads whose cost alone fits
        counts = fits.nonzero().flatten()
        n_fill = torch.searchsorted(n_cost, room - h_cost[counts], right=True) - 1  # neurons that fill the rest
        total = h_val[counts] + n_val[n_fill]
        best = int(torch.argmax(total))  # first maximum: the fewest heads among equals
        h_keep, n_keep = int(counts[best]), int(n_fill[best])
    keep_h = torch.zeros(hs.numel(), dtype=torch.bool)
    keep_h[h_ids[:h_keep]] = True
    keep_n = torch.zeros(ns.numel(), dtype=torch.bool)
    keep_n[n_ids[:n_keep]] = True
    keep_h, keep_n = keep_h.view(hs.shape), keep_n.view(ns.shape)

    def cost() -> float:
        return float(fixed_cost) + float((hc[:, None] * keep_h).sum()) + float((nc[:, None] * keep_n).sum())

    flops = cost()
    while flops > allowed:  # a cumulative sum that rounded below the budget: drop the last unit taken
        if units != "heads" and n_keep > 0:
            n_keep -= 1
            keep_n.view(-1)[n_ids[n_keep]] = False
        elif units != "neurons" and h_keep > 0:
            h_keep -= 1
            keep_h.view(-1)[h_ids[h_keep]] = False
        else:
            break
        flops = cost()
    return UnitChoice(
        pruned_heads=_pruned(keep_h),
        pruned_neurons=_pruned(keep_n),
        heads_kept=int(keep_h.sum()),
        neurons_kept=int(keep_n.sum()),
        flops=flops,
        fraction=flops / full,
        importance=float(h_val[h_keep] + n_val[n_keep]),
        head_weight=wh,
        neuron_weight=wn,
    )


def _pruned(keep: torch.Tensor) -> dict[int, list[int]]:
    out = {}
    for layer in range(keep.shape[0]):
        gone = (~keep[layer]).nonzero().flatten().tolist()
        if gone:
            out[layer] = gone
    return out


@dataclass(frozen=True)
class SublayerChoice:
    """The result of :func:`search_sublayers`: ``units`` (the :class:`UnitChoice` of the heads and neurons of
    the sublayers kept, with every unit of a removed sublayer among its pruned ones), ``removed``
    (``{layer: ["attention", "ffn"]}``, already removed ones included), ``cost`` (FLOPs per token plus
    ``sublayer_cost`` per present sublayer) and ``objective`` (the kept units' importance less, for each
    newly removed sublayer, what its score exceeds its units' by; see :func:`search_sublayers`)."""

    units: UnitChoice
    removed: dict[int, list[str]]
    cost: float
    objective: float


def search_sublayers(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    sublayer_scores: torch.Tensor,
    head_cost: Sequence[float] | torch.Tensor,
    neuron_cost: Sequence[float] | torch.Tensor,
    fixed_cost: float,
    sublayer_cost: float,
    budget: float,
    *,
    kept_heads: Sequence[Sequence[int]] | None = None,
    kept_neurons: Sequence[Sequence[int]] | None = None,
    removed: dict[int, Sequence[str]] | None = None,
    balance: str = "none",
) -> SublayerChoice:
    """Heads, neurons and whole sublayers under one budget (issue 21 item 1; CoFi, Xia et al. 2022, prunes
    sublayers beside heads and neurons; Kwon et al. 2022 search units under one cost).

    The cost of a model is its FLOPs per token plus ``sublayer_cost`` for every sublayer still present
    (its norm, residual addition and per-operator time, which no unit carries); ``budget`` is a fraction of
    the unpruned model's cost so counted (with ``sublayer_cost = 0``, of its FLOPs, as :func:`search_units`).

    Each criterion's scores estimate the loss of removing a unit: removing every unit of sublayer ``s`` is
    estimated at ``U_s`` (the sum of its units' scores), removing ``s`` itself (the identity, norm and
    residual gone too) at its own score ``S_s``. The two are not on one footing (Taylor sums ``|∂L/∂m|``
    per unit but takes ``|∂L/∂g|`` of the whole; on the SST-2 MiniLM Taylor's ``U_s`` of a feed-forward
    sublayer exceeds its ``S_s`` many times, and trusting ``S_s`` removed one whole feed-forward sublayer per
    budget step, 88.65% -> 84.52% at 78% FLOPs against 88.3% keeping them), so the estimate is
    conservative: removing ``s`` is taken to lose ``max(U_s, S_s)``, at least what removing all its units
    loses. The search maximises ``kept importance - Σ_removed max(0, S_s - U_s)``: a sublayer goes when
    the budget it frees (its per-sublayer cost and its kept units') buys more importance elsewhere than
    its kept units hold, and the sublayer scores order the removals the budget forces.
    The units of a fixed set of removed sublayers are chosen by :func:`search_units` (exact for one cost
    per kind); the set is grown greedily: while the budget cannot be met, the lowest-scored sublayer goes;
    then each round removes the one sublayer that raises the objective most, until none does (at most
    ``2 L`` rounds of ``2 L`` searches, under a second for MiniLM).

    Args:
        sublayer_scores: ``[L, 2]`` importance of each layer's attention and feed-forward sublayer, in the
            unit of the head and neuron scores (:func:`prune_attattr.importance.sublayers.sublayer_importance`).
        balance: as :func:`search_units`; with ``"cost"`` the head and neuron weights are computed once,
            on the units present at the start, and an attention sublayer's score takes the heads' weight,
            a feed-forward one's the neurons' (each sublayer is compared with its own units on one scale).
        sublayer_cost: per present sublayer, in FLOPs per token (>= 0).
        removed: sublayers already removed (``{layer: names}``); their units must be absent from the kept lists.
        Others as :func:`search_units`.

    Raises:
        SearchError: what :func:`search_units` raises, a bad ``sublayer_scores`` shape or cost, or a budget
            that no set of removed sublayers reaches.
    """
    hc, nc = _as64(head_cost, "head_cost"), _as64(neuron_cost, "neuron_cost")
    ss = _as64(sublayer_scores, "sublayer_scores")
    hs, ns = _as64(head_scores, "head_scores"), _as64(neuron_scores, "neuron_scores")
    layers = hc.shape[0]
    if ss.shape != (layers, 2):
        raise SearchError(f"sublayer_scores must be [layers, 2] = [{layers}, 2], got {tuple(ss.shape)}")
    if not sublayer_cost >= 0:
        raise SearchError(f"sublayer_cost must be >= 0 FLOPs per token, got {sublayer_cost}")
    names = SUBLAYERS
    if balance not in BALANCE:
        raise SearchError(f"balance must be one of {', '.join(BALANCE)}, got {balance!r}")
    if not 0 < budget <= 1:
        raise SearchError(f"the budget is a fraction in (0, 1], got {budget}")
    hp = _candidates(hs, kept_heads, "heads")
    npres = _candidates(ns, kept_neurons, "neurons")
    wh, wn = _weight(hs, hc, hp, balance), _weight(ns, nc, npres, balance)
    hs, ns, ss = hs * wh, ns * wn, ss * torch.tensor([[wh, wn]], dtype=torch.float64)
    gone0 = {(int(k), w) for k, ws in (removed or {}).items() for w in ws}
    full_flops = float(fixed_cost) + hs.shape[1] * float(hc.sum()) + ns.shape[1] * float(nc.sum())
    full = full_flops + sublayer_cost * 2 * layers
    units_of = {(layer, "attention"): float((hs[layer] * hp[layer]).sum()) for layer in range(layers)}
    units_of.update({(layer, "ffn"): float((ns[layer] * npres[layer]).sum()) for layer in range(layers)})

    def solve(gone: set[tuple[int, str]]):
        kh = [[] if (layer, "attention") in gone else hp[layer].nonzero().flatten().tolist() for layer in range(layers)]
        kn = [[] if (layer, "ffn") in gone else npres[layer].nonzero().flatten().tolist() for layer in range(layers)]
        present = 2 * layers - len(gone)
        allowed_flops = budget * full - sublayer_cost * present
        if allowed_flops <= 0:
            return None
        try:
            choice = search_units(hs, ns, hc, nc, fixed_cost, min(allowed_flops / full_flops, 1.0), units="both", kept_heads=kh, kept_neurons=kn, balance="none")
        except SearchError:
            return None
        bonus = -sum(max(0.0, float(ss[s[0], names.index(s[1])]) - units_of[s]) for s in gone - gone0)
        return choice, choice.importance + bonus, choice.flops + sublayer_cost * present

    gone = set(gone0)
    best = solve(gone)
    order = sorted(((float(ss[layer, j]), (layer, w)) for layer in range(layers) for j, w in enumerate(names)), key=lambda t: t[0])
    for _, s in order:  # a budget the present sublayers' own cost exceeds: remove the lowest-scored ones until it fits
        if best is not None:
            break
        if s not in gone:
            gone.add(s)
            best = solve(gone)
    while True:
        step = None
        for _, s in order:
            if s in gone:
                continue
            trial = solve(gone | {s})
            if trial is not None and (best is None or trial[1] > best[1] + 1e-12) and (step is None or trial[1] > step[1][1]):
                step = (s, trial)
        if step is None:
            break
        gone.add(step[0])
        best = step[1]
    if best is None:
        raise SearchError(f"a budget of {budget:.4g} (FLOPs plus {sublayer_cost:g} per sublayer) cannot be met even removing sublayers")
    choice, objective, cost = best
    choice = dataclasses.replace(choice, head_weight=wh, neuron_weight=wn)
    out: dict[int, list[str]] = {}
    for layer, w in sorted(gone, key=lambda s: (s[0], names.index(s[1]))):
        out.setdefault(layer, []).append(w)
    return SublayerChoice(units=choice, removed=out, cost=cost, objective=objective)
