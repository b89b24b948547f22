"""Stage "importance": head importance ``[layers, heads]`` of each method of ``importance.methods``, and
feed-forward neuron importance ``[layers, neurons]`` of each method that scores neurons when
``pruning.units`` (or ``compare_units``) prunes them, and whole-sublayer importance ``[layers, 2]`` of
each method that scores sublayers when ``pruning.sublayers`` is on.

:func:`compute_importance` dispatches to :mod:`prune_attattr.importance`; :func:`cached_importance`
keys each result on the model, the importance examples' tokens, the settings, the seed and the pruned
units (so re-scoring along a pruning curve is cached too); :func:`importance_stage` scores every
method's heads, :func:`neuron_importance_stage` every neuron method's neurons.
"""

from __future__ import annotations

import torch

from .. import importance as imp
from ..cache import digest, encoded_digest
from ..errors import RunError
from ..importance.sublayers import sublayer_importance
from ..registry import NEURON_METHODS, SUBLAYER_METHODS
from .context import STAGE_CACHE_VERSION, Prepared, RunContext, pruned_key

__all__ = [
    "cached_importance",
    "compute_importance",
    "compute_neuron_importance",
    "compute_sublayer_importance",
    "importance_stage",
    "neuron_importance_stage",
    "neuron_methods",
    "sublayer_importance_stage",
    "sublayer_methods",
]


def compute_importance(method: str, model, loader, ctx: RunContext) -> torch.Tensor:
    """Head importance ``[layers, heads]`` of ``model`` by ``method`` on ``loader``, with the recipe's
    ``importance`` settings (``max_tokens_per_forward`` bounds every method's forwards).

    Raises:
        RunError: an unknown method.
    """
    r = ctx.recipe
    bound = {"max_tokens_per_forward": r.importance.max_tokens_per_forward}
    if method == "attattr":
        a = r.importance.attattr
        return imp.attattr_importance(
            model, loader, ctx.accelerator, steps=a.steps, target=a.target, mode=a.mode, quadrature=a.quadrature, chunk_size=a.chunk_size,
            aggregate=a.aggregate, objective=a.objective, **bound,
        )
    if method == "taylor":
        return imp.taylor_importance(model, loader, ctx.accelerator, **bound)
    if method == "fisher":
        return imp.fisher_importance(model, loader, ctx.accelerator, **bound)
    if method == "accuracy_difference":
        return imp.accuracy_difference_importance(model, loader, ctx.accelerator, metrics=ctx.metrics, **bound)
    if method == "attention":
        return imp.attention_importance(model, loader, ctx.accelerator, **bound)
    if method == "random":
        return imp.random_importance(model, seed=r.seed)
    raise RunError(f"unknown method {method}")


def compute_neuron_importance(method: str, model, loader, ctx: RunContext) -> torch.Tensor:
    """Feed-forward neuron importance ``[layers, neurons]`` of ``model`` by ``method`` (one of
    :data:`prune_attattr.registry.NEURON_METHODS`; AttAttr's settings as the head method's; Taylor
    without per-layer normalisation, so that one budget can rank heads and neurons)."""
    r = ctx.recipe
    a = r.importance.attattr
    _, neurons = imp.unit_importance(
        method, model, loader, ctx.accelerator, units="neurons", steps=a.steps, target=a.target, mode=a.mode,
        quadrature=a.quadrature, aggregate=a.aggregate, objective=a.objective, metrics=ctx.metrics, seed=r.seed, max_tokens_per_forward=r.importance.max_tokens_per_forward,
    )
    return neurons


def compute_sublayer_importance(method: str, model, loader, ctx: RunContext) -> torch.Tensor:
    """Whole-sublayer importance ``[layers, 2]`` of ``model`` by ``method`` (one of
    :data:`prune_attattr.registry.SUBLAYER_METHODS`; AttAttr's steps, quadrature, objective and aggregate
    as the head method's; :func:`prune_attattr.importance.sublayers.sublayer_importance`)."""
    r = ctx.recipe
    a = r.importance.attattr
    return sublayer_importance(
        method, model, loader, ctx.accelerator, steps=a.steps, quadrature=a.quadrature, objective=a.objective, aggregate=a.aggregate,
        seed=r.seed, max_tokens_per_forward=r.importance.max_tokens_per_forward,
    )


def _importance_key(prep: Prepared, method: str, model, unit: str = "heads") -> str:
    r = prep.ctx.recipe
    # every importance setting but the method list (adding a method keeps the others' entries); the
    # examples enter through their tokens
    settings = r.importance.model_dump(exclude={"methods"} if method == "attattr" else {"methods", "attattr"})
    if method == "attattr":
        # AttAttr's aggregate and objective enter the key, except at the paper's values (max, prob), so that
        # scores cached before these settings existed stay valid
        a = settings["attattr"]
        for name, paper in (("aggregate", "max"), ("objective", "prob")):
            if a.get(name) == paper:
                del a[name]
    settings.update(metrics=prep.ctx.metrics, seed=r.seed)
    kind = {"heads": "importance", "neurons": "neuron importance", "sublayers": "sublayer importance"}[unit]
    return digest(kind, STAGE_CACHE_VERSION, prep.model_key, encoded_digest(prep.imp_enc), method, settings, pruned_key(model))


def cached_importance(prep: Prepared, method: str, model=None, *, unit: str = "heads") -> tuple[torch.Tensor, bool]:
    """``(scores, reused)`` of ``method`` on ``model`` (default: the prepared model): head scores
    ``[layers, heads]`` (``unit="heads"``), neuron scores ``[layers, neurons]`` (``unit="neurons"``) or
    sublayer scores ``[layers, 2]`` (``unit="sublayers"``),
    from the stage cache when the same model, examples and settings were scored before."""
    model = prep.model if model is None else model
    ctx = prep.ctx
    key = _importance_key(prep, method, model, unit)
    hit = ctx.cached(key)
    if hit is not None:
        return torch.tensor(hit, dtype=torch.float32), True
    compute = {"heads": compute_importance, "neurons": compute_neuron_importance, "sublayers": compute_sublayer_importance}[unit]
    scores = compute(method, model, prep.imp_loader, ctx)
    ctx.store(key, scores.tolist())
    return scores, False


def _scoring_stage(prep: Prepared, methods: list[str], unit: str, label: str) -> dict[str, torch.Tensor]:
    """``{method: scores}`` of ``unit`` for each of ``methods``, one stage ``"<label>: <method>"`` each (cached)."""
    ctx = prep.ctx
    scores: dict[str, torch.Tensor] = {}
    for method in methods:
        name = f"{label}: {method}"
        with ctx.stage(name):
            scores[method], reused = cached_importance(prep, method, unit=unit)
        if reused:
            ctx.reused.append(name)
            ctx.print("   reused from cache")
    return scores


def importance_stage(prep: Prepared) -> dict[str, torch.Tensor]:
    """Head importance ``[layers, heads]`` per method of ``importance.methods`` (each cached)."""
    return _scoring_stage(prep, list(prep.ctx.recipe.importance.methods), "heads", "importance")


def neuron_methods(recipe) -> list[str]:
    """The methods of ``importance.methods`` whose neurons are scored: those that score neurons, when
    ``pruning.units`` or ``pruning.compare_units`` prunes neurons (none otherwise)."""
    p = recipe.pruning
    if not p.enabled or all(u == "heads" for u in [p.units, *p.compare_units]):
        return []
    return [m for m in recipe.importance.methods if m in NEURON_METHODS]


def neuron_importance_stage(prep: Prepared) -> dict[str, torch.Tensor]:
    """Feed-forward neuron importance ``[layers, neurons]`` per method of :func:`neuron_methods` (each cached)."""
    return _scoring_stage(prep, neuron_methods(prep.ctx.recipe), "neurons", "neuron importance")


def sublayer_methods(recipe) -> list[str]:
    """The methods of ``importance.methods`` whose whole sublayers are scored: those that score sublayers,
    when ``pruning.sublayers`` is on (none otherwise)."""
    p = recipe.pruning
    if not (p.enabled and p.sublayers):
        return []
    return [m for m in recipe.importance.methods if m in SUBLAYER_METHODS]


def sublayer_importance_stage(prep: Prepared) -> dict[str, torch.Tensor]:
    """Whole-sublayer importance ``[layers, 2]`` per method of :func:`sublayer_methods` (each cached)."""
    return _scoring_stage(prep, sublayer_methods(prep.ctx.recipe), "sublayers", "sublayer importance")
