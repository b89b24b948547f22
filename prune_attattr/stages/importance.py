"""Stage "importance": head importance ``[layers, heads]`` of each method of ``importance.methods``.

:func:`compute_importance` dispatches to :mod:`prune_attattr.importance`; :func:`cached_importance`
keys each result on the model, the importance examples' tokens, the settings, the seed and the pruned
heads (so re-scoring along a pruning curve is cached too); :func:`importance_stage` scores every method.
"""

from __future__ import annotations

import torch

from .. import importance as imp
from ..cache import digest, encoded_digest
from ..errors import RunError
from .context import STAGE_CACHE_VERSION, Prepared, RunContext, pruned_key

__all__ = ["compute_importance", "cached_importance", "importance_stage"]


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
            model, loader, ctx.accelerator, steps=a.steps, target=a.target, mode=a.mode, quadrature=a.quadrature, chunk_size=a.chunk_size, **bound
        )
    if method == "taylor":
        return imp.taylor_importance(model, loader, ctx.accelerator, **bound)
    if method == "accuracy_difference":
        return imp.accuracy_difference_importance(model, loader, ctx.accelerator, metrics=ctx.metrics, **bound)
    if method == "attention":
        return imp.attention_importance(model, loader, ctx.accelerator, **bound)
    if method == "random":
        return imp.random_importance(model, seed=r.seed)
    raise RunError(f"unknown method {method}")


def _importance_key(prep: Prepared, method: str, model) -> str:
    r = prep.ctx.recipe
    # every importance setting but the method list (adding a method keeps the others' entries); the
    # examples enter through their tokens
    settings = r.importance.model_dump(exclude={"methods"} if method == "attattr" else {"methods", "attattr"})
    settings.update(metrics=prep.ctx.metrics, seed=r.seed)
    return digest("importance", STAGE_CACHE_VERSION, prep.model_key, encoded_digest(prep.imp_enc), method, settings, pruned_key(model))


def cached_importance(prep: Prepared, method: str, model=None) -> tuple[torch.Tensor, bool]:
    """``(scores [layers, heads], reused)`` of ``method`` on ``model`` (default: the prepared model),
    from the stage cache when the same model, examples and settings were scored before."""
    model = prep.model if model is None else model
    ctx = prep.ctx
    key = _importance_key(prep, method, model)
    hit = ctx.cached(key)
    if hit is not None:
        return torch.tensor(hit, dtype=torch.float32), True
    scores = compute_importance(method, model, prep.imp_loader, ctx)
    ctx.store(key, scores.tolist())
    return scores, False


def importance_stage(prep: Prepared) -> dict[str, torch.Tensor]:
    """Head importance ``[layers, heads]`` per method of ``importance.methods`` (each cached)."""
    ctx = prep.ctx
    scores: dict[str, torch.Tensor] = {}
    for method in ctx.recipe.importance.methods:
        name = f"importance: {method}"
        with ctx.stage(name):
            scores[method], reused = cached_importance(prep, method)
        if reused:
            ctx.reused.append(name)
            ctx.print("   reused from cache")
    return scores
