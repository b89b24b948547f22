"""Importance of whole sublayers (an encoder layer's attention block or feed-forward block).

Each sublayer gets a gate ``g`` (:class:`~prune_attattr.attention.AttentionControl` ``sublayer_gate``):
1 is the model, 0 makes the sublayer the identity, exactly what its structural removal
(:mod:`prune_attattr.prune.sublayers`) computes. The criteria of heads and neurons carry over:

* **Taylor** (Michel et al. 2019, Eq. 4; Molchanov et al. 2017): ``|∂L/∂g|`` at ``g = 1`` per
  example, summed over examples; ``L`` the cross-entropy against the gold label;
* **Fisher** (Kwon et al. 2022, section 4.1): ``(∂L/∂g)^2`` summed over examples;
* **AttAttr**: integrated gradients of the objective (gold probability, or its log) over the gates of
  one layer at a time, as the paper attributes one layer's attention probabilities at a time
  (Hao et al. 2021, Eq. 2-3): the two gates of layer ``l`` go together from the baseline 0 (layer ``l``
  removed) to 1 with the other layers whole; left Riemann sum of ``m = 20`` steps by default.
  ``Attr_s = ∫_0^1 ∂F(α g)/∂g_s dα`` (times ``g_s - 0 = 1``), so the attributions of a layer's two
  sublayers add up to ``F(model) - F(layer l removed)`` (completeness; ``tests/test_sublayers.py``).
  A gate is one number per example, so the aggregations of :data:`~prune_attattr.importance.AGGREGATES`
  are: ``max`` and ``sum`` the signed attribution, ``abs_sum`` its magnitude, ``sq_sum`` its square,
  summed over examples, in the objective's unit like the heads' and neurons' additive aggregations;
* **random**: uniform scores from a seed.

Scores are ``[layers, 2]`` (column 0 the attention sublayer, column 1 the feed-forward one, the order of
:data:`~prune_attattr.families.SUBLAYERS`), float32; a removed sublayer scores 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionControl
from ..families import SUBLAYERS
from ..models import (
    classify,
    embed,
    encoder_layers,
    forward_logits,
    evaluating,
    removed_sublayers,
    repeat_batch,
    run_layers,
)
from ..precision import autocast, resolve_precision
from ..registry import SUBLAYER_METHODS
from .attattr import _check_objective, _pad_id, _target_prob, quadrature_nodes
from .batching import over_batches, sub_batches, token_budget

__all__ = ["SUBLAYER_METHODS", "sublayer_attributions", "sublayer_gradients", "sublayer_importance"]

_SEED_OFFSET = 0x5851F42D


def _present(model: nn.Module) -> list[tuple[int, str]]:
    gone = removed_sublayers(model)
    return [(layer, w) for layer in range(len(encoder_layers(model))) for w in SUBLAYERS if w not in gone.get(layer, [])]


def _run(model, dataloader, accelerator, description, work):
    with evaluating(model):
        return over_batches(dataloader, accelerator, description, work)[0]


def _gold(batch: dict) -> torch.Tensor:
    if batch.get("labels") is None:
        raise ValueError("sublayer importance needs gold labels ('labels') in every batch")
    return batch["labels"].long()


def sublayer_gradients(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "sublayer gradients",
) -> torch.Tensor:
    """Per-example gradients of the cross-entropy loss (gold label) with respect to every sublayer gate at 1.

    Args:
        model: sequence classifier of a supported family (possibly pruned, with sublayers removed).
        dataloader: prepared dataloader of batches with ``labels`` (gathered across processes).
        max_tokens_per_forward: at most this many tokens per forward (default 16384).
        mixed_precision: ``"no"``, ``"bf16"``, ``"fp16"``; default the accelerator's.

    Returns:
        ``[N, layers, 2]`` float32 (removed sublayers 0); unit: nats per unit of gate.

    Raises:
        ValueError: a batch without ``labels``, a bad token bound or precision, an empty dataloader.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    present = _present(model)
    n_layers, pad = len(encoder_layers(model)), _pad_id(model)

    def work(batch):
        labels = _gold(batch)
        out = torch.zeros(labels.shape[0], n_layers, len(SUBLAYERS), device=labels.device)
        for index, sub in sub_batches(batch, max_tokens, pad):
            gates = {key: torch.ones(len(index), device=labels.device, requires_grad=True) for key in present}
            with torch.enable_grad():
                with autocast(labels.device, precision):
                    logits = forward_logits(model, sub, AttentionControl(sublayer_gate=gates))
                loss = nn.functional.cross_entropy(logits.float(), sub["labels"], reduction="sum")
                grads = torch.autograd.grad(loss, list(gates.values()))
            rows = torch.tensor(index, device=labels.device)
            for (layer, w), g in zip(gates, grads):
                out[rows, layer, SUBLAYERS.index(w)] = g.float()
        return out

    return _run(model, dataloader, accelerator, description, work)


def sublayer_attributions(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    steps: int = 20,
    quadrature: str = "left",
    objective: str = "prob",
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "AttAttr sublayer importance",
) -> torch.Tensor:
    """Per-example integrated gradients of the gold objective over each layer's two sublayer gates
    (module docstring): the gates of layer ``l`` scaled together by ``alpha`` from 0 to 1.

    Args:
        steps, quadrature: the Riemann sum (``left``, the paper's, ``midpoint`` or ``gauss``; nodes of
            :func:`~prune_attattr.importance.attattr.quadrature_nodes`).
        objective: ``"prob"`` (the paper's) or ``"log_prob"`` of the gold label.
        Others as :func:`sublayer_gradients`; the layers below ``l`` run once per example, the layers
        from ``l`` on once per step (``steps`` copies per forward, within the token bound, or one
        example's copies when a single example's exceed it).

    Returns:
        ``[N, layers, 2]`` float32 (removed sublayers 0); unit: the objective's (probability or nats).

    Raises:
        ValueError: a bad objective, steps, quadrature, token bound or precision, a batch without labels.
    """
    _check_objective(objective)
    alphas, weights = quadrature_nodes(steps, quadrature)
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    present = _present(model)
    n_layers, pad = len(encoder_layers(model)), _pad_id(model)
    per_layer = {layer: [w for (lay, w) in present if lay == layer] for layer in range(n_layers)}

    def work(batch):
        labels = _gold(batch)
        device = labels.device
        out = torch.zeros(labels.shape[0], n_layers, len(SUBLAYERS), device=device)
        a = alphas.to(device)
        longest = int(batch["attention_mask"].sum(-1).max()) if batch["attention_mask"].numel() else 1
        # the steps copies of a group share one forward; one row's copies always fit, even past the bound
        for index, sub in sub_batches(batch, max(max_tokens // steps, longest, 1), pad):
            r = len(index)
            rows = torch.tensor(index, device=device)
            with torch.no_grad(), autocast(device, precision):
                hidden, mask = embed(model, sub)
            for layer, names in per_layer.items():
                if not names:
                    hidden = _advance(model, hidden, mask, layer, precision, device)
                    continue
                # one leaf per gate, equal values: the joint path of the layer's gates, each gate's own gradient
                gates = {w: a.repeat_interleave(r).requires_grad_(True) for w in names}  # [steps * r], copy-major like repeat_batch
                control = AttentionControl(sublayer_gate={(layer, w): g for w, g in gates.items()})
                with torch.enable_grad():
                    with autocast(device, precision):
                        h = run_layers(model, repeat_batch(hidden, steps), repeat_batch(mask, steps), layer, None, control)
                        logits = classify(model, h)
                    f = _target_prob(logits, repeat_batch(sub["labels"].long(), steps), objective)
                    grads = torch.autograd.grad(f.sum(), list(gates.values()))
                for w, g in zip(names, grads):
                    out[rows, layer, SUBLAYERS.index(w)] = (g.view(steps, r) * weights.to(device)[:, None]).sum(0)
                hidden = _advance(model, hidden, mask, layer, precision, device)
        return out

    return _run(model, dataloader, accelerator, description, work)


def _advance(model, hidden, mask, layer, precision, device):
    """Layer ``layer``'s output for its input ``hidden`` (no gradients)."""
    with torch.no_grad(), autocast(device, precision):
        return run_layers(model, hidden, mask, layer, layer + 1)


def sublayer_importance(
    method: str,
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    steps: int = 20,
    quadrature: str = "left",
    objective: str = "prob",
    aggregate: str = "sq_sum",
    seed: int = 0,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Importance of every sublayer by ``method`` (module docstring): ``[layers, 2]`` float32, higher = more
    important, removed sublayers 0; unit: nats (taylor), nats^2 (fisher), the objective's (attattr).

    Raises:
        ValueError: a method that does not score sublayers (:data:`SUBLAYER_METHODS`), or what the
            functions above raise.
    """
    from . import _check_aggregate, aggregate_examples

    if method not in SUBLAYER_METHODS:
        raise ValueError(f"importance method '{method}' does not score whole sublayers; use one of {list(SUBLAYER_METHODS)}")
    bound = {"max_tokens_per_forward": max_tokens_per_forward, "mixed_precision": mixed_precision}
    present = torch.zeros(len(encoder_layers(model)), len(SUBLAYERS))
    for layer, w in _present(model):
        present[layer, SUBLAYERS.index(w)] = 1.0
    if method == "random":
        g = torch.Generator().manual_seed(int(seed) + _SEED_OFFSET)
        return torch.rand(present.shape, generator=g) * present
    if method in ("taylor", "fisher"):
        grads = sublayer_gradients(model, dataloader, accelerator, **bound, description=f"{method} sublayer importance" if progress else None)
        return (grads.abs() if method == "taylor" else grads.pow(2)).sum(0) * present
    _check_aggregate(aggregate)
    attr = sublayer_attributions(
        model, dataloader, accelerator, steps=steps, quadrature=quadrature, objective=objective, **bound,
        description="AttAttr sublayer importance" if progress else None,
    )
    return aggregate_examples(attr, attr, aggregate) * present  # a gate is one number: its max is its sum
