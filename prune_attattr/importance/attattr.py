"""Self-attention attribution (AttAttr), Hao et al. 2021, section 3.

For one layer with attention probabilities ``A`` (``[heads, seq, seq]``, computed on the input) and
the model output ``F`` (probability of the target class), with the target layer's probabilities
replaced by ``alpha * A`` and every other layer left as it is:

    Attr(A) = A ⊙ ∫_0^1 ∂F(alpha A)/∂A d alpha                                   (Eq. 2)
            ≈ A ⊙ Σ_i w_i ∂F(alpha_i A)/∂A                                          (Eq. 3)

with a zero baseline. The paper uses the left Riemann sum ``alpha_i = i/m``, ``w_i = 1/m``,
``i = 0..m-1``, ``m = 20``. By the completeness of integrated gradients, the sum of ``Attr`` over a
layer approaches ``F(A) - F(0)`` as the quadrature converges.

Two procedures compute the same quantity:

* ``mode="reference"``: the paper's procedure, one example at a time without padding; for every layer,
  one forward of the whole model on the ``m`` scaled copies and one backward.
* ``mode="fast"``: the layers below the target layer run once per batch and are reused for every
  alpha; examples and alpha steps share one forward (``chunk_size`` rows at most); the backward
  stops at the target layer; parameters get no gradients. With the same quadrature both modes agree
  to float rounding; ``quadrature="gauss"`` (Gauss-Legendre) reaches the integral with far fewer steps.

A head's importance is the max of its attribution matrix over token pairs, summed over examples
(section 4.1, "Attribution Score for Head Pruning").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..attention import AttentionControl
from ..models import classify, embed, encoder_layers, forward_logits, frozen, kept_heads, run_layers

Quadrature = Literal["left", "midpoint", "gauss"]
Target = Literal["predicted", "gold"]

__all__ = [
    "quadrature_nodes",
    "attention_attribution",
    "iter_layer_attributions",
    "attribution_head_scores",
]


def quadrature_nodes(steps: int, quadrature: Quadrature = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``alpha [steps]`` in [0, 1] and weights ``w [steps]`` (summing to 1) for ∫_0^1 d alpha.

    ``left``: alpha = i/m (the paper's Riemann sum); ``midpoint``: alpha = (i + 1/2)/m;
    ``gauss``: Gauss-Legendre nodes mapped to [0, 1] (exact for polynomials of degree 2m-1).

    Raises:
        ValueError: ``steps < 1`` or an unknown quadrature.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if quadrature == "left":
        alphas = np.arange(steps) / steps
        weights = np.full(steps, 1.0 / steps)
    elif quadrature == "midpoint":
        alphas = (np.arange(steps) + 0.5) / steps
        weights = np.full(steps, 1.0 / steps)
    elif quadrature == "gauss":
        x, w = np.polynomial.legendre.leggauss(steps)
        alphas = (x + 1) / 2
        weights = w / 2
    else:
        raise ValueError(f"unknown quadrature '{quadrature}'; use left, midpoint or gauss")
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


def _targets(logits: torch.Tensor, batch: dict, target: Target) -> torch.Tensor:
    if target == "predicted":
        return logits.argmax(-1)
    if target == "gold":
        if "labels" not in batch:
            raise ValueError("target='gold' needs 'labels' in the batch")
        return batch["labels"].to(logits.device).long()
    raise ValueError(f"unknown target '{target}'; use predicted or gold")


def _target_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).gather(-1, target.view(-1, 1)).squeeze(-1)


def _fast(model, batch, steps, target, layers, quadrature, chunk_size) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Same quantity as :func:`_reference`, with the work cut where it changes nothing:

    * the layers below the target layer run once per batch (their output does not depend on alpha);
    * the target layer starts from its attention context ``(alpha A) @ V`` (``V`` computed once), so
      the scaled probabilities are the leaf of the backward and no Q/K/V projection is repeated;
    * the last layer is computed for the [CLS] query only (the classifier reads nothing else); for
      the last layer itself, only the [CLS] row of the attribution can be non-zero, and is;
    * examples and alpha steps share one forward of at most ``chunk_size`` rows; parameters get no
      gradients.
    """
    from ..models import layer_from_context, logits_from_layer, values
    from ..models import repeat_batch as rep

    alphas, weights = quadrature_nodes(steps, quadrature)
    enc_layers = encoder_layers(model)
    last = len(enc_layers) - 1
    with torch.no_grad():
        hidden, mask = embed(model, batch)
        control = AttentionControl(record=True)
        inputs = [hidden]
        for i in range(last + 1):
            inputs.append(run_layers(model, inputs[-1], mask, i, i + 1, control))
        logits = classify(model, inputs[-1])
        tgt = _targets(logits, batch, target)
    bsz = hidden.shape[0]
    per_chunk = max(1, chunk_size // bsz)

    for layer in layers:
        probs = control.recorded.get(layer)
        if probs is None:  # every head of this layer was pruned
            continue
        probs = probs.detach()
        with torch.no_grad():
            v = values(enc_layers[layer], inputs[layer])
        rows = probs[:, :, :1, :] if layer == last else probs  # only [CLS] reaches the classifier
        grad_sum = torch.zeros_like(rows, dtype=torch.float32)
        for start in range(0, steps, per_chunk):
            a = alphas[start : start + per_chunk].to(probs.device, probs.dtype)
            w = weights[start : start + per_chunk].to(probs.device)
            k = a.shape[0]
            scaled = (a.view(k, 1, 1, 1, 1) * rows.unsqueeze(0)).reshape(k * bsz, *rows.shape[1:])
            scaled.requires_grad_(True)
            with torch.enable_grad():
                context = torch.matmul(scaled, rep(v, k))
                if layer == last:
                    out = layer_from_context(enc_layers[layer], context, rep(inputs[layer][:, :1], k))
                    logits_a = classify(model, out)
                else:
                    out = layer_from_context(enc_layers[layer], context, rep(inputs[layer], k))
                    logits_a = logits_from_layer(model, out, rep(mask, k), layer + 1)
                prob = _target_prob(logits_a, tgt.repeat(k))
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
            grad_sum += (w.view(k, 1, 1, 1, 1) * grad.float().view(k, *rows.shape)).sum(0)
        attr = torch.zeros_like(probs, dtype=torch.float32)
        attr[:, :, : rows.shape[2], :] = rows.float() * grad_sum
        yield layer, attr, probs


def _reference(model, batch, steps, target, layers, quadrature) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    alphas, weights = quadrature_nodes(steps, quadrature)
    lengths = batch["attention_mask"].sum(-1).tolist()
    bsz, seq = batch["input_ids"].shape
    results = {layer: None for layer in layers}
    for b in range(bsz):
        n = int(lengths[b])
        one = {k: v[b : b + 1, :n] for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if "labels" in batch:
            one["labels"] = batch["labels"][b : b + 1]
        with torch.no_grad():
            control = AttentionControl(record=True)
            logits = forward_logits(model, one, control)
            tgt = _targets(logits, one, target)
        rep = {k: v.expand(steps, -1) for k, v in one.items() if k != "labels"}
        for layer in layers:
            probs = control.recorded.get(layer)
            if probs is None:
                continue
            probs = probs.detach()
            a = alphas.to(probs.device, probs.dtype)
            scaled = (a.view(steps, 1, 1, 1) * probs).requires_grad_(True)
            with torch.enable_grad():
                logits_a = forward_logits(model, rep, AttentionControl(replace={layer: scaled}))
                prob = _target_prob(logits_a, tgt.expand(steps))
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
            attr = probs[0].float() * (weights.to(grad.device).view(steps, 1, 1, 1) * grad.float()).sum(0)
            if results[layer] is None:
                h = probs.shape[1]
                results[layer] = (
                    torch.zeros(bsz, h, seq, seq, device=probs.device),
                    torch.zeros(bsz, h, seq, seq, device=probs.device, dtype=probs.dtype),
                )
            results[layer][0][b, :, :n, :n] = attr
            results[layer][1][b, :, :n, :n] = probs[0]
    for layer in layers:
        if results[layer] is not None:
            yield layer, results[layer][0], results[layer][1]


def iter_layer_attributions(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    chunk_size: int = 256,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(layer, attribution [B, kept_heads, T, T] float32, probabilities [B, kept_heads, T, T])``.

    Heads are the layer's current heads (see :func:`prune_attattr.models.kept_heads` for their
    original indices); a layer with no heads left is skipped. Entries involving padding are 0.
    Arguments as in :func:`attention_attribution`.
    """
    n_layers = len(encoder_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers")
    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            if mode == "fast":
                yield from _fast(model, batch, steps, target, layers, quadrature, chunk_size)
            elif mode == "reference":
                yield from _reference(model, batch, steps, target, layers, quadrature)
            else:
                raise ValueError(f"unknown mode '{mode}'; use fast or reference")
    finally:
        model.train(was_training)


def attention_attribution(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    chunk_size: int = 256,
) -> torch.Tensor:
    """Self-attention attribution scores (Hao et al. 2021, Eq. 2-3) for every head of the chosen layers.

    Args:
        model: BERT-family sequence classifier loaded by :func:`prune_attattr.load_classifier`
            (any model whose attention implementation is ``prune_attattr``), possibly pruned.
        batch: ``input_ids [B, T]``, ``attention_mask [B, T]``, optional ``token_type_ids [B, T]``,
            and ``labels [B]`` when ``target="gold"``.
        steps: number of quadrature steps m (paper: 20).
        target: class whose probability is attributed: the model's prediction or the gold label.
        layers: layer indices to attribute (default: all), in the order of the output's dim 1.
        mode: ``"reference"`` (paper's procedure) or ``"fast"`` (same quantity, batched, reused).
        quadrature: ``"left"`` Riemann (paper), ``"midpoint"`` or ``"gauss"`` (Gauss-Legendre).
        chunk_size: at most this many (example, alpha) rows per forward in fast mode.

    Returns:
        float32 tensor ``[B, len(layers), num_attention_heads, T, T]`` (query, key); the unit is the
        target-class probability. Pruned heads and padded positions are 0.

    Raises:
        ValueError: bad ``steps``, ``target``, ``mode``, ``quadrature`` or layer index.
    """
    n_layers = len(encoder_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bsz, seq = batch["input_ids"].shape
    n_heads = model.config.num_attention_heads
    out = torch.zeros(bsz, len(layers), n_heads, seq, seq, device=batch["input_ids"].device)
    heads = kept_heads(model)
    position = {layer: i for i, layer in enumerate(layers)}
    for layer, attr, _ in iter_layer_attributions(
        model, batch, steps=steps, target=target, layers=layers, mode=mode, quadrature=quadrature, chunk_size=chunk_size
    ):
        out[:, position[layer], heads[layer]] = attr
    return out


def attribution_head_scores(attr: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-example head score: the max attribution over valid (query, key) pairs.

    Args:
        attr: ``[B, heads, T, T]`` attributions of one layer.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding).

    Returns:
        ``[B, heads]`` float32.
    """
    valid = attention_mask.bool()
    pair = (valid[:, :, None] & valid[:, None, :])[:, None]
    masked = attr.masked_fill(~pair, float("-inf"))
    return masked.flatten(2).max(-1).values
