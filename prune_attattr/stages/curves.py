"""Stage "pruning curves": prune each method's least important units step by step, evaluating each step.

``pruning.units: heads``: :func:`curves_stage` runs :func:`prune_attattr.prune.heads.pruning_curve` per
method (accuracy vs heads kept; each step's FLOPs fraction is recorded too). ``neurons`` or ``both``:
:func:`prune_attattr.prune.curve.flops_curve` per method, one step per ``pruning.flops_steps`` budget
(accuracy vs FLOPs kept); a head-only method (accuracy difference, attention) prunes heads on the same
axis. ``pruning.compare_units`` adds each method's curve for other unit kinds, named
``"<method> (<units>)"`` (:func:`curve_name`). Every evaluated step (and every re-scoring with
``pruning.rescore``) is cached, so an interrupted curve resumes. Every step records its loyalty to the
unpruned model (``PruningStep.loyalty``, :func:`prune_attattr.evaluation.loyalty`), measured in the pass
that measures its metric. With ``pruning.schedule: iterative``
``export.method``'s curve is :func:`iterative_curve` instead: a brief recovery between steps (Michel et
al. 2019).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from ..prune.cost import UnitCosts, unit_flops
from ..evaluation import evaluate_outputs
from ..prune.curve import balance_for, flops_curve
from ..prune.heads import pruned_heads_of, pruning_curve
from ..prune.neurons import pruned_neurons_of
from ..recover.distill import recover, recovery_dataloader
from ..registry import NEURON_METHODS
from .context import Prepared, cached_evaluation, mean_length, reference_logits
from .importance import cached_importance, compute_importance, compute_neuron_importance

if TYPE_CHECKING:
    from .recovery import RecoveryState

__all__ = ["curve_name", "curve_units", "curves_stage", "iterative_curve"]


def curve_units(recipe, method: str, kind: str) -> str:
    """The units ``method``'s curve of kind ``kind`` prunes: ``kind``, or heads for a head-only method."""
    return kind if method in NEURON_METHODS else "heads"


def curve_name(recipe, method: str, kind: str) -> str:
    """Key of ``method``'s curve of unit kind ``kind`` in the report: the method's name for
    ``pruning.units``, ``"<method> (<kind>)"`` for a ``compare_units`` kind."""
    return method if kind == recipe.pruning.units else f"{method} ({kind})"


def _with_flops(steps: list, costs: UnitCosts) -> list:
    """Head-count steps with their FLOPs fraction (every neuron kept)."""
    n_layers = len(costs.head)
    for s in steps:
        heads = [costs.heads_total - len(s.pruned_heads.get(str(layer), [])) for layer in range(n_layers)]
        s.neurons_kept = costs.neurons_total * n_layers
        s.flops_fraction = costs.flops(heads, [costs.neurons_total] * n_layers) / costs.unpruned
    return steps


def curves_stage(
    prep: Prepared, scores: dict[str, torch.Tensor], recovery: RecoveryState | None = None, neuron_scores: dict[str, torch.Tensor] | None = None
) -> dict[str, list]:
    """The pruning curves of every method (and unit kind of ``pruning.compare_units``); see the module
    docstring. ``neuron_scores``: method -> ``[layers, neurons]`` (:func:`prune_attattr.stages.importance.neuron_importance_stage`).
    ``pruning.schedule: iterative``: ``export.method``'s curve is :func:`iterative_curve` (``recovery``)."""
    r = prep.ctx.recipe
    neuron_scores = neuron_scores or {}
    curves = {}
    seq_len = mean_length(prep.dev_enc)
    costs = unit_flops(prep.model, seq_len)
    for method in r.importance.methods if r.pruning.enabled else []:
        for kind in [r.pruning.units, *r.pruning.compare_units]:
            units = curve_units(r, method, kind)
            if method not in NEURON_METHODS and kind != r.pruning.units:
                continue  # a head-only method has one curve (heads), drawn for pruning.units
            name = curve_name(r, method, kind)
            if r.pruning.units == "heads" and kind == "heads":  # the paper's curves: heads kept
                curves[name] = _with_flops(_heads_curve(prep, method, scores, recovery), costs)
            else:  # FLOPs kept
                curves[name] = _budget_curve(prep, method, units, scores[method], neuron_scores.get(method), seq_len, name, recovery)
    return curves


def _counting_evaluate(prep: Prepared):
    """``(evaluate, counts, loyalties)``: a step evaluation through the stage cache that counts the steps
    and how many came from the cache (``counts["steps"]``, ``counts["reused"]``, for the report's
    ``reused`` list) and appends each step's loyalty to ``loyalties`` in evaluation order (one evaluation
    per step: :func:`_attach_loyalty` puts them on the steps)."""
    counts = {"steps": 0, "reused": 0}
    loyalties: list = []

    def evaluate(model):
        metrics, loyal, reused = cached_evaluation(prep, model)
        counts["steps"] += 1
        counts["reused"] += reused
        loyalties.append(loyal)
        return metrics

    return evaluate, counts, loyalties


def _attach_loyalty(steps: list, loyalties: list) -> list:
    """Set each step's ``loyalty`` from the evaluations' (one per step, in order).

    Raises:
        RuntimeError: a curve that did not evaluate each step exactly once (a change in the curve code).
    """
    if len(steps) != len(loyalties):
        raise RuntimeError(f"{len(loyalties)} evaluations for {len(steps)} curve steps; loyalty cannot be matched to the steps")
    for s, loyal in zip(steps, loyalties):
        s.loyalty = loyal
    return steps


def _budget_curve(
    prep: Prepared, method: str, units: str, head_scores, neuron_scores, seq_len: float, name: str, recovery: RecoveryState | None = None
) -> list:
    """``method``'s curve over ``pruning.flops_steps`` (:func:`prune_attattr.prune.curve.flops_curve`),
    every step's evaluation cached; ``export.method``'s curve under ``pruning.schedule: iterative`` is
    :func:`iterative_curve` (``recovery``)."""
    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    evaluate, counts, loyalties = _counting_evaluate(prep)

    def show(s):
        gone = sum(len(v) for v in s.removed_sublayers.values())
        ctx.print(
            f"   {name}: FLOPs {100 * s.flops_fraction:5.1f}% ({s.heads_kept} heads, {s.neurons_kept} neurons"
            + (f", {gone} sublayers removed" if gone else "") + f") -> {metric} {100 * s.metrics[metric]:.2f}%"
        )

    stage = f"pruning curve: {name}" + ("" if units == r.pruning.units or name != method else f" ({units} only)")
    if r.pruning.schedule == "iterative" and name == r.export.method and recovery is not None:  # issue 20 (d)
        with ctx.stage(stage + " (iterative, with recovery)"):
            return iterative_curve(prep, head_scores, method, recovery, neuron_scores=neuron_scores, units=units, seq_len=seq_len)
    sublayers = prep.sublayer_scores.get(method) if units == r.pruning.units else None  # pruning.sublayers: the main curve only
    with ctx.stage(stage):
        steps = flops_curve(
            prep.model, head_scores, neuron_scores if units != "heads" else None, r.pruning.flops_steps, evaluate,
            units=units, seq_len=seq_len, balance=balance_for(method, r.pruning.balance, r.importance.attattr.aggregate), on_step=show,
            sublayer_scores=sublayers, sublayer_cost=r.pruning.sublayer_cost,
        )
    if counts["reused"]:
        ctx.reused.append(f"{stage} ({counts['reused']}/{counts['steps']} steps)")
    return _attach_loyalty(steps, loyalties)


def _heads_curve(prep: Prepared, method: str, scores: dict, recovery) -> list:
    """``method``'s curve over head counts (``pruning.step_fraction``), as in the paper."""
    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    name = f"pruning curve: {method}"
    if r.pruning.schedule == "iterative" and method == r.export.method and recovery is not None:  # issue 10
        with ctx.stage(name + " (iterative, with recovery)"):
            return iterative_curve(prep, scores[method], method, recovery)
    evaluate, counts, loyalties = _counting_evaluate(prep)

    def rescore(m):
        return cached_importance(prep, method, m)[0]

    with ctx.stage(name):
        curve = pruning_curve(
            prep.model,
            scores[method],
            evaluate,
            step_fraction=r.pruning.step_fraction,
            rescore_fn=rescore if r.pruning.rescore else None,
            on_step=lambda s: ctx.print(f"   {method}: {s.heads_kept:3d} heads kept -> {metric} {100 * s.metrics[metric]:.2f}%"),
        )
    if counts["reused"]:
        ctx.reused.append(f"{name} ({counts['reused']}/{counts['steps']} steps)")
    return _attach_loyalty(curve, loyalties)


def iterative_curve(
    prep: Prepared, scores: torch.Tensor, method: str, state: RecoveryState, *, neuron_scores: torch.Tensor | None = None,
    units: str = "heads", seq_len: float | None = None,
) -> list:
    """Pruning curve of ``pruning.schedule: iterative``: prune a step, evaluate, recover briefly (in place, on
    the first ``recovery.iterative_examples`` recovery examples, one epoch), re-score with ``method``, prune
    again (Michel et al. 2019's iterative pruning with recovery between steps). ``units="heads"``: steps of
    ``pruning.step_fraction`` heads (:func:`prune_attattr.prune.heads.pruning_curve`); ``neurons`` or
    ``both``: the ``pruning.flops_steps`` budgets, each pruned further from the previous step's recovered
    model (:func:`prune_attattr.prune.curve.flops_curve` with ``rescore_fn``; ``neuron_scores``
    ``[layers, neurons]`` and ``seq_len``, the dev split's mean length, are needed). Not stage-cached: the
    weights change along the curve. Step ``k``'s recovered model is kept in ``state.snapshots[k]``."""
    from accelerate.utils import set_seed

    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    calls = [0]

    def brief_recovery(work) -> bool:
        """Recover ``work`` in place after curve step ``calls[0]``; False (nothing done) before any pruning."""
        step = calls[0]
        calls[0] += 1
        if not pruned_heads_of(work) and not pruned_neurons_of(work):
            return False
        state.ensure(prep)
        n = min(r.recovery.iterative_examples, len(state.train))
        loader = recovery_dataloader(state.train.subset(range(n)), batch_size=r.recovery.batch_size, pad_id=ctx.pad_id, seed=r.seed + step)
        table = state.table[:n] if state.table is not None else None
        set_seed(r.seed + step)  # dropout draws independent of which earlier stages ran or came from the cache
        teacher = prep.model if r.recovery.hidden_weight > 0 else None  # layer-wise distillation runs it per batch
        recover(work, teacher, loader, ctx.accelerator, r.recovery.model_copy(update={"epochs": 1}), cached_teacher=table)
        state.snapshots[step] = copy.deepcopy(work)
        return True

    reference = reference_logits(prep)
    loyalties: list = []

    def evaluate(m):
        result = evaluate_outputs(m, prep.dev_loader, ctx.accelerator, ctx.metrics, reference=reference)
        loyalties.append(result.loyalty)
        return result.metrics

    if units == "heads":
        def rescore(work):
            return compute_importance(method, work, prep.imp_loader, ctx) if brief_recovery(work) else scores

        steps = pruning_curve(
            prep.model,
            scores,
            evaluate,
            step_fraction=r.pruning.step_fraction,
            rescore_fn=rescore,
            on_step=lambda s: ctx.print(f"   {method} (iterative): {s.heads_kept:3d} heads kept -> {metric} {100 * s.metrics[metric]:.2f}%"),
        )
        return _attach_loyalty(steps, loyalties)

    if neuron_scores is None or seq_len is None:
        raise ValueError(f"the iterative {units} curve needs neuron scores and the mean sequence length")
    current = (scores, neuron_scores)

    def rescore_both(work):
        nonlocal current
        if brief_recovery(work):
            heads = compute_importance(method, work, prep.imp_loader, ctx) if units != "neurons" else current[0]
            current = (heads, compute_neuron_importance(method, work, prep.imp_loader, ctx))
        return current

    steps = flops_curve(
        prep.model, scores, neuron_scores, r.pruning.flops_steps, evaluate, units=units, seq_len=seq_len,
        balance=balance_for(method, r.pruning.balance, r.importance.attattr.aggregate), rescore_fn=rescore_both,
        on_step=lambda s: ctx.print(
            f"   {method} (iterative): FLOPs {100 * s.flops_fraction:5.1f}% ({s.heads_kept} heads, {s.neurons_kept} neurons) -> "
            f"{metric} {100 * s.metrics[metric]:.2f}%"
        ),
    )
    return _attach_loyalty(steps, loyalties)
