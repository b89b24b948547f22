"""Stage "pruning curves": prune each method's least important heads step by step, evaluating each step.

:func:`curves_stage` runs :func:`prune_attattr.pruning.pruning_curve` per method, every evaluated step
(and every re-scoring with ``pruning.rescore``) cached, so an interrupted curve resumes. With
``pruning.schedule: iterative`` ``export.method``'s curve is :func:`iterative_curve` instead: a brief
recovery between steps (Michel et al. 2019).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from ..evaluation import evaluate_model
from ..pruning import pruned_heads_of, pruning_curve
from ..recovery import recover, recovery_dataloader
from .context import Prepared, cached_evaluate
from .importance import cached_importance, compute_importance

if TYPE_CHECKING:
    from .recovery import RecoveryState

__all__ = ["curves_stage", "iterative_curve"]


def curves_stage(prep: Prepared, scores: dict[str, torch.Tensor], recovery: RecoveryState | None = None) -> dict[str, list]:
    """One pruning curve per method (:func:`prune_attattr.pruning.pruning_curve`); every evaluated step
    (and every re-scoring with ``pruning.rescore``) is cached, so an interrupted curve resumes.
    ``pruning.schedule: iterative``: ``export.method``'s curve is :func:`iterative_curve` (``recovery``)."""
    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    curves = {}
    for method in r.importance.methods if r.pruning.enabled else []:
        name = f"pruning curve: {method}"
        if r.pruning.schedule == "iterative" and method == r.export.method and recovery is not None:  # issue 10
            with ctx.stage(name + " (iterative, with recovery)"):
                curves[method] = iterative_curve(prep, scores[method], method, recovery)
            continue
        counts = {"steps": 0, "reused": 0}

        def evaluate(m, _counts=counts):
            metrics, reused = cached_evaluate(prep, m)
            _counts["steps"] += 1
            _counts["reused"] += reused
            return metrics

        def rescore(m, _method=method):
            return cached_importance(prep, _method, m)[0]

        with ctx.stage(name):
            curves[method] = pruning_curve(
                prep.model,
                scores[method],
                evaluate,
                step_fraction=r.pruning.step_fraction,
                rescore_fn=rescore if r.pruning.rescore else None,
                on_step=lambda s, _m=method: ctx.print(f"   {_m}: {s.heads_kept:3d} heads kept -> {metric} {100 * s.metrics[metric]:.2f}%"),
            )
        if counts["reused"]:
            ctx.reused.append(f"{name} ({counts['reused']}/{counts['steps']} steps)")
    return curves


def iterative_curve(prep: Prepared, scores: torch.Tensor, method: str, state: RecoveryState) -> list:
    """Pruning curve of ``pruning.schedule: iterative``: prune a step, evaluate, recover briefly (in place, on
    the first ``recovery.iterative_examples`` recovery examples, one epoch), re-score with ``method``, prune
    again (Michel et al. 2019's iterative pruning with recovery between steps). Not stage-cached: the
    weights change along the curve. Step ``k``'s recovered model is kept in ``state.snapshots[k]``."""
    from accelerate.utils import set_seed

    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    calls = [0]

    def rescore(work):
        step = calls[0]
        calls[0] += 1
        if not pruned_heads_of(work):
            return scores
        state.ensure(prep)
        n = min(r.recovery.iterative_examples, len(state.train))
        loader = recovery_dataloader(state.train.subset(range(n)), batch_size=r.recovery.batch_size, pad_id=ctx.pad_id, seed=r.seed + step)
        table = state.table[:n] if state.table is not None else None
        set_seed(r.seed + step)  # dropout draws independent of which earlier stages ran or came from the cache
        recover(work, None, loader, ctx.accelerator, r.recovery.model_copy(update={"epochs": 1}), cached_teacher=table)
        state.snapshots[step] = copy.deepcopy(work)
        return compute_importance(method, work, prep.imp_loader, ctx)

    return pruning_curve(
        prep.model,
        scores,
        lambda m: evaluate_model(m, prep.dev_loader, ctx.accelerator, ctx.metrics),
        step_fraction=r.pruning.step_fraction,
        rescore_fn=rescore,
        on_step=lambda s: ctx.print(f"   {method} (iterative): {s.heads_kept:3d} heads kept -> {metric} {100 * s.metrics[metric]:.2f}%"),
    )
