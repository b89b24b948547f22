"""Accuracy versus FLOPs kept: one pruned model per FLOPs budget, heads and feed-forward neurons chosen
together (issue 15; Kwon et al. 2022, section 4.1).

For each fraction of ``pruning.flops_steps`` the units to keep are searched from the method's head and
neuron scores (:func:`prune_attattr.prune.search.search_units`), a copy of the unpruned model is pruned
structurally (:func:`prune_attattr.prune.units.prune_units`) and evaluated. Steps are independent:
each starts from the unpruned model, so a step's model does not depend on the steps before it. A budget
the unit kind cannot reach (heads only below the feed-forward share) is left out of that curve.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..models import kept_heads, kept_neurons, num_heads_total, removed_sublayers
from .cost import UnitCosts, unit_flops
from .heads import PruningStep, count_parameters, pruned_heads_of
from .neurons import pruned_neurons_of
from .search import lowest_fraction, search_sublayers, search_units
from .units import prune_units

__all__ = ["balance_for", "flops_fraction", "choose_units", "flops_curve"]

#: Methods whose head and neuron scores estimate one additive quantity (the loss change when the unit
#: goes), which Kwon et al.'s search adds as they are. Measured on the embedded SST-2 MiniLM before recovery
#: (docs/benchmarks.md): Fisher raw 85.21% / 81.31% at 50% / 35% FLOPs against 84.06% / 79.47% cost-balanced;
#: AttAttr raw 72.48% / 71.90% against 83.37% / 77.87% cost-balanced; Taylor (heads normalised per layer,
#: Michel et al.) raw keeps no head at 50% (49.08%), cost-balanced 86.35% / 81.88%.
_ADDITIVE = ("fisher",)


#: AttAttr aggregations (``importance.attattr.aggregate``) that are additive over units: a head's and a
#: neuron's score are integrated gradients of a gate on the unit, in the objective's unit for both.
_ADDITIVE_AGGREGATES = ("sum", "abs_sum", "sq_sum")


def balance_for(method: str, setting: str = "auto", aggregate: str = "max") -> str:
    """How :func:`prune_attattr.prune.search.search_units` puts ``method``'s head and neuron scores on one scale
    (``pruning.balance``; ``auto``: ``"none"`` for Fisher, whose two kinds estimate the same loss change,
    and for AttAttr with an additive ``aggregate`` (``sum``, ``abs_sum``, ``sq_sum``: a head's and a
    neuron's score are both integrated gradients of a gate on the unit, summed over examples, so they
    share one unit); ``"cost"`` for the others: AttAttr with ``max`` (the paper: a head's score is a max
    over ``T x T`` entries, a neuron's over ``T``), Taylor (heads normalised per layer) and random (no
    unit); see :mod:`prune_attattr.prune.search`). ``aggregate`` is read for AttAttr only."""
    if setting != "auto":
        return setting
    if method == "attattr":
        return "none" if aggregate in _ADDITIVE_AGGREGATES else "cost"
    return "none" if method in _ADDITIVE else "cost"


def flops_fraction(model: nn.Module, costs: UnitCosts) -> float:
    """FLOPs per token of ``model`` (pruned or not) as a fraction of the unpruned architecture's, with the
    unit costs of ``costs`` (:func:`prune_attattr.prune.cost.unit_flops` at the evaluation length)."""
    heads = [len(h) for h in kept_heads(model)]
    neurons = [len(n) for n in kept_neurons(model)]
    return costs.flops(heads, neurons) / costs.unpruned


def choose_units(
    model: nn.Module, head_scores: torch.Tensor, neuron_scores: torch.Tensor | None, costs: UnitCosts, budget: float, units: str,
    balance: str = "cost", sublayer_scores: torch.Tensor | None = None, sublayer_cost: float = 0.0,
):
    """The :class:`~prune_attattr.prune.search.UnitChoice` of ``units`` (heads, neurons, both) within ``budget``
    (fraction of the unpruned FLOPs per token) for ``model`` (its pruned units stay pruned).

    With ``sublayer_scores`` (``[layers, 2]``, ``units="both"``) whole sublayers may go too: the
    :class:`~prune_attattr.prune.search.SublayerChoice` of :func:`~prune_attattr.prune.search.search_sublayers`,
    ``budget`` a fraction of the unpruned cost counting ``sublayer_cost`` (a fraction of the unpruned FLOPs
    per token) per present sublayer.

    Raises:
        prune_attattr.prune.search.SearchError: a budget ``units`` cannot reach.
    """
    if sublayer_scores is not None:
        if units != "both" or neuron_scores is None:
            raise ValueError("whole sublayers are searched with heads and neurons (units both, neuron scores given)")
        return search_sublayers(
            head_scores, neuron_scores, sublayer_scores, costs.head, costs.neuron, costs.fixed, sublayer_cost * costs.unpruned, budget,
            kept_heads=kept_heads(model), kept_neurons=kept_neurons(model), removed=removed_sublayers(model), balance=balance,
        )
    if neuron_scores is None:
        if units != "heads":
            raise ValueError(f"pruning {units} needs neuron scores")
        neuron_scores = torch.zeros(len(costs.neuron), costs.neurons_total)
    return search_units(
        head_scores, neuron_scores, costs.head, costs.neuron, costs.fixed, budget,
        units=units, kept_heads=kept_heads(model), kept_neurons=kept_neurons(model), balance=balance,
    )


def flops_curve(
    model: nn.Module,
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor | None,
    fractions: Sequence[float],
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    *,
    units: str,
    seq_len: float,
    balance: str = "cost",
    on_step: Callable[[PruningStep], None] | None = None,
    rescore_fn: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    sublayer_scores: torch.Tensor | None = None,
    sublayer_cost: float = 0.0,
) -> list[PruningStep]:
    """Prune ``model`` (a copy per step) to each FLOPs fraction and evaluate it.

    With ``rescore_fn`` the steps are cumulative instead (the iterative schedule, Michel et al. 2019):
    one copy is pruned further at each budget, and after every step but the last ``rescore_fn(work)``
    may change it in place (a brief recovery) and returns the new ``(head_scores, neuron_scores)``
    (original unit indices; entries of pruned units are ignored) that choose the next step's units.

    Args:
        model: the unpruned (or partly pruned) classifier; not changed.
        head_scores: ``[layers, heads]`` importance; neuron_scores: ``[layers, neurons]`` (None for ``units="heads"``).
        fractions: FLOPs fractions kept, decreasing; 1.0 is the model itself.
        evaluate_fn: model -> metrics (fractions in [0, 1]).
        units: ``heads``, ``neurons`` or ``both``.
        seq_len: tokens per sequence for the cost model (the dev split's mean length).
        balance: how the search scales heads against neurons (:func:`balance_for`).
        sublayer_scores, sublayer_cost: whole sublayers searched too (:func:`choose_units`; one-shot steps only).

    Returns:
        One :class:`~prune_attattr.prune.heads.PruningStep` per reachable fraction, with ``budget``,
        ``flops_fraction``, ``heads_kept``/``neurons_kept`` and the pruned units of each.
    """
    costs = unit_flops(model, seq_len)
    total_heads = num_heads_total(model)
    floor = lowest_fraction(
        costs.head, costs.neuron, costs.fixed, costs.heads_total, costs.neurons_total, units,
        kept_heads=kept_heads(model), kept_neurons=kept_neurons(model),
    )
    steps: list[PruningStep] = []
    reachable = [b for b in fractions if b >= floor - 1e-12]
    work = copy.deepcopy(model) if rescore_fn is not None else None
    for i, budget in enumerate(reachable):
        if rescore_fn is None:
            work = copy.deepcopy(model)
        if budget < 1.0:  # choose_units keeps pruned units pruned: a cumulative step only adds to them
            choice = choose_units(work, head_scores, neuron_scores, costs, budget, units, balance, sublayer_scores, sublayer_cost)
            picked = choice.units if sublayer_scores is not None else choice
            removed = choice.removed if sublayer_scores is not None else None
            prune_units(work, heads=picked.pruned_heads, neurons=picked.pruned_neurons, sublayers=removed)
        metrics = evaluate_fn(work)
        pruned_h = pruned_heads_of(work)
        step = PruningStep(
            heads_pruned=sum(len(v) for v in pruned_h.values()),
            heads_kept=total_heads - sum(len(v) for v in pruned_h.values()),
            parameters=count_parameters(work),
            metrics=metrics,
            pruned_heads={str(k): v for k, v in pruned_h.items()},
            neurons_kept=sum(len(n) for n in kept_neurons(work)),
            pruned_neurons={str(k): v for k, v in pruned_neurons_of(work).items()},
            flops_fraction=flops_fraction(work, costs),
            budget=float(budget),
            removed_sublayers={str(k): v for k, v in removed_sublayers(work).items()},
        )
        steps.append(step)
        if on_step is not None:
            on_step(step)
        if rescore_fn is not None and i < len(reachable) - 1:
            head_scores, neuron_scores = rescore_fn(work)
    return steps
