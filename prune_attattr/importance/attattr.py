"""Self-attention attribution (AttAttr), Hao et al. 2021, section 3.

For one layer with attention probabilities ``A`` (``[heads, seq, seq]``, computed on the input) and
the model output ``F`` (probability of the target class), with the target layer's probabilities
replaced by ``alpha * A`` and every other layer left as it is:

    Attr(A) = A ⊙ ∫_0^1 ∂F(alpha A)/∂A d alpha                                   (Eq. 2)
            ≈ A ⊙ Σ_i w_i ∂F(alpha_i A)/∂A                                          (Eq. 3)

with a zero baseline. The paper uses the left Riemann sum ``alpha_i = i/m``, ``w_i = 1/m``,
``i = 0..m-1``, ``m = 20``. By the completeness of integrated gradients, the sum of ``Attr`` over a
layer approaches ``F(A) - F(0)`` as the quadrature converges.

Every example is attributed on its own tokens: rows are read from ``attention_mask`` (right or left
padding), grouped by length and run without their padding columns
(:mod:`prune_attattr.importance.batching`); results go back to the caller's rows and columns. So
the result, and the speed, do not depend on how the caller orders or pads the examples. Each
forward holds at most ``max_tokens_per_forward`` tokens (rows x width, alpha copies included).

Two procedures compute the same quantity:

* ``mode="reference"``: the paper's procedure, one example at a time without padding; for every layer,
  a forward of the whole model on the ``m`` scaled copies (split by the token bound) and a backward.
* ``mode="fast"``: per group of similar-length rows, the layers below the target layer run once and
  are reused for every alpha; rows and alpha steps share a forward; the backward stops at the target
  layer; parameters get no gradients. With the same quadrature both modes agree to float rounding;
  ``quadrature="gauss"`` (Gauss-Legendre) reaches the integral with far fewer steps.

Under ``mixed_precision="bf16"``/``"fp16"`` the forwards run in autocast; the scaled probabilities,
their gradients and the attribution sums stay float32.

A head's importance is the max of its attribution matrix over token pairs, summed over examples
(section 4.1, "Attribution Score for Head Pruning"). For pruning, :mod:`prune_attattr.importance` also
offers the matrix's sum (:func:`attribution_head_sums`: the integrated gradient of a gate on the head's
output along the joint path, additive and complete) and ``objective="log_prob"`` (the log of the
target probability is attributed instead of the probability); the defaults are the paper's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..attention import AttentionControl
from ..models import (
    classify,
    embed,
    encoder_layers,
    forward_logits,
    evaluating,
    kept_heads,
    run_layers,
)
from ..precision import autocast, resolve_precision
from .batching import (
    Rows,
    check_fits,
    compact,
    length_groups,
    row_spans,
    split_evenly,
    token_budget,
)

Quadrature = Literal["left", "midpoint", "gauss"]
Target = Literal["predicted", "gold"]
Objective = Literal["prob", "log_prob"]
#: What is integrated: the target-class probability (the paper) or its log (minus the cross-entropy loss).
OBJECTIVES: tuple[str, ...] = ("prob", "log_prob")

__all__ = [
    "quadrature_nodes",
    "attention_attribution",
    "iter_layer_attributions",
    "iter_group_attributions",
    "attribution_head_scores",
    "attribution_head_sums",
    "GroupAttribution",
    "OBJECTIVES",
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


def _target_prob(logits: torch.Tensor, target: torch.Tensor, objective: Objective = "prob") -> torch.Tensor:
    """The attributed output ``F [N]`` float32: the target class's probability (``objective="prob"``, the
    paper) or its log-probability (``"log_prob"``; with the gold label, minus the cross-entropy loss)."""
    if objective == "log_prob":
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, target.view(-1, 1)).squeeze(-1)
    return torch.softmax(logits.float(), dim=-1).gather(-1, target.view(-1, 1)).squeeze(-1)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}'; use prob or log_prob")


@dataclass
class GroupAttribution:
    """Attributions of one layer for one group of rows, compacted (every row starts at column 0).

    Attributes:
        index: the caller's row of each group row, ``[r]``.
        attr: float32 ``[r, kept_heads, W, W]`` (query, key); entries involving padding are 0.
        probs: attention probabilities ``[r, kept_heads, W, W]`` (padding rows/columns as computed).
        attention_mask: ``[r, W]`` of the compacted rows (1 = token).
    """

    index: list[int]
    attr: torch.Tensor
    probs: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class _Group:
    index: list[int]
    sub: dict[str, torch.Tensor]
    mask: torch.Tensor | None = None
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    target: torch.Tensor | None = None


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _groups(model, batch, rows: Rows, max_tokens: int, max_rows: int | None) -> list[_Group]:
    """Length groups of the batch (:func:`length_groups`), each compacted to its own width."""
    index_groups = length_groups(rows.length, max_tokens, max_rows)
    pad = _pad_id(model)
    return [_Group(index=g, sub=compact(batch, rows, g, pad)) for g in index_groups]


def _prepare_fast(model, group: _Group, layers: list[int], target: Target, precision: str, probabilities: bool = True) -> None:
    """One no-grad forward of the group: inputs (and, with ``probabilities``, attention probabilities)
    of the requested layers, the mask, the target class. Shared by the head and the neuron fast paths."""
    device = group.sub["input_ids"].device
    wanted = set(layers)
    last = len(encoder_layers(model)) - 1
    with torch.no_grad(), autocast(device, precision):
        hidden, mask = embed(model, group.sub)
        control = AttentionControl(record=wanted) if probabilities else None
        for i in range(last + 1):
            if i in wanted:
                group.inputs[i] = hidden
            hidden = run_layers(model, hidden, mask, i, i + 1, control)
        logits = classify(model, hidden)
    group.mask = mask
    group.probs = {k: v.detach() for k, v in control.recorded.items()} if probabilities else {}
    group.target = _targets(logits, group.sub, target)


class _ScaledTargetLayer:
    """The target layer from its attention output on, for a chunk of alpha steps at once.

    The layer is linear in its probabilities up to the output projection ``W_O``:
    ``attn_out(alpha) = alpha * P + b_O`` with ``P = (A V) W_O^T`` (``[r, T_q, hidden]``, computed once).
    Step ``k`` of a chunk runs the rest of the layer on ``alpha_k P + b_O + w_k δ``, where ``δ``
    (``[r, T_q, hidden]``, zeros) is one leaf shared by the chunk's steps: the gradient of
    ``Σ_k F_k`` with respect to ``δ`` is the quadrature sum ``Σ_k w_k ∂F/∂attn_out(alpha_k)`` itself.

    When the family splits the layer at its feed-forward's first linear map ``W_1``
    (:func:`prune_attattr.models.feed_forward_split`), that map is not applied per step. Its input is
    ``norm(s_k)`` with ``s_k = x + b_O + alpha_k P + w_k δ`` (``x`` the residual); the centred
    ``c(s_k) = c(x + b_O) + alpha_k c(P) + w_k c(δ)`` is affine in the step, so with ``γ, β`` the norm's
    affine parameters and ``σ_k`` its per-token scale,

        W_1 norm(s_k) + b_1 = (H_0 + alpha_k H_1 + w_k W_1 (γ ⊙ c(δ))) / σ_k + W_1 β + b_1,
        H_0 = W_1 (γ ⊙ c(x + b_O)),   H_1 = W_1 (γ ⊙ c(P)),

    an identity in ``δ``: ``H_0`` and ``H_1`` are computed once per group, the ``δ`` term once per
    chunk (and its backward is one product with ``W_1``, not one per step). Exact up to float rounding.
    This part runs in float32 under any ``mixed_precision``: ``H_0``, ``H_1`` are products of the
    unnormalised centred sums, which float16 could overflow. Dropout is left out: the model is in eval mode.
    """

    def __init__(self, block: nn.Module, residual: torch.Tensor, proj: torch.Tensor):
        from ..models import feed_forward_split, output_projection

        self.block = block
        self.bias = output_projection(block).bias  # b_O
        self.residual = residual
        self.base = residual if self.bias is None else residual + self.bias  # [r, T_q, hidden]
        self.proj = proj
        self.split = feed_forward_split(block)
        if self.split is not None:
            norm, first = self.split.norm, self.split.first
            gamma = (norm.weight if norm.weight is not None else torch.ones_like(proj[0, 0])).float()
            self.gamma, self.w1 = gamma, first.weight.float()
            # float32 whatever the run's precision: H_0 and H_1 are products of the *unnormalised* centred
            # sums (sigma times a usual pre-activation), which could overflow in float16; once per group.
            with torch.no_grad():
                base = self.base.float()
                self.h0 = nn.functional.linear(gamma * (base - base.mean(-1, keepdim=True)), self.w1)
                self.h1 = nn.functional.linear(gamma * (proj - proj.mean(-1, keepdim=True)), self.w1)
                beta = norm.bias.float() if norm.bias is not None else torch.zeros_like(gamma)
                self.c1 = nn.functional.linear(beta, self.w1, None if first.bias is None else first.bias.float())

    def __call__(self, a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(δ leaf [r, T_q, hidden], layer output [k * r, T_q, hidden])`` for steps ``a [k]``, weights ``w [k]``
        (copy-major rows); call under ``enable_grad`` and the run's autocast."""
        from ..models import layer_from_attention_output
        from ..models import repeat_batch as rep

        k, (r, t_q, _) = a.shape[0], self.base.shape
        av, wv = a.view(k, 1, 1, 1), w.view(k, 1, 1, 1)
        delta = torch.zeros_like(self.base, dtype=torch.float32, requires_grad=True)
        if self.split is None:
            attn_out = (av * self.proj + wv * delta).reshape(k * r, t_q, -1)
            if self.bias is not None:
                attn_out = attn_out + self.bias
            return delta, layer_from_attention_output(self.block, attn_out, rep(self.residual, k))
        norm = self.split.norm
        summed = (self.base + av * self.proj + wv * delta).reshape(k * r, t_q, -1)
        normed = norm(summed)
        scale = torch.rsqrt(summed.float().var(-1, unbiased=False, keepdim=True) + norm.eps)  # 1 / σ_k
        with torch.autocast(delta.device.type, enabled=False):  # float32, as H_0 and H_1
            d_in = nn.functional.linear(self.gamma * (delta - delta.mean(-1, keepdim=True)), self.w1)
            pre = (self.h0 + av * self.h1 + wv * d_in).reshape(k * r, t_q, -1) * scale + self.c1
        return delta, self.split.rest(pre.to(normed.dtype), normed, summed)


def _fast_layer(model, group: _Group, layer: int, alphas, weights, max_tokens: int, max_rows: int | None, precision: str, objective: Objective = "prob"):
    """Attribution ``[r, kept, W, W]`` float32 of ``layer`` for one prepared group (see :func:`_fast_attributions`).

    The backward's leaf is the target layer's attention output (:class:`_ScaledTargetLayer`); the
    gradient of the probabilities, summed over the quadrature, is ``(Σ_k w_k ∂F/∂attn_out_k) W_O V^T``
    per head: exact, with no per-alpha attention or output-projection product.
    """
    from ..models import logits_from_layer, output_projection, values
    from ..models import repeat_batch as rep

    enc_layers = encoder_layers(model)
    last = len(enc_layers) - 1
    block = enc_layers[layer]
    probs = group.probs.pop(layer)
    hidden_in = group.inputs.pop(layer)
    device = probs.device
    bsz, width = group.sub["input_ids"].shape
    rows = probs[:, :, :1, :] if layer == last else probs  # only [CLS] reaches the classifier
    rows32 = rows.float()
    heads, t_q = rows.shape[1], rows.shape[2]
    w_o = output_projection(block)
    with torch.no_grad(), autocast(device, precision):
        v = values(block, hidden_in)  # [r, heads, W, d]
        context = torch.matmul(rows32.to(v.dtype), v)  # [r, heads, T_q, d]
        flat = context.transpose(1, 2).reshape(bsz, t_q, -1)
        proj = nn.functional.linear(flat, w_o.weight).float()  # (A V) W_O^T, [r, T_q, hidden]
    scaled = _ScaledTargetLayer(block, hidden_in[:, :1] if layer == last else hidden_in, proj)
    grad_u = torch.zeros_like(proj)
    per = max(1, max_tokens // (bsz * width))
    if max_rows is not None:
        per = max(1, min(per, max_rows // bsz))
    for start, stop in split_evenly(alphas.shape[0], per):
        a = alphas[start:stop].to(device)
        w = weights[start:stop].to(device)
        k = stop - start
        with torch.enable_grad(), autocast(device, precision):
            delta, out = scaled(a, w)
            if layer == last:
                logits_a = classify(model, out)
            else:
                logits_a = logits_from_layer(model, out, rep(group.mask, k), layer + 1)
            prob = _target_prob(logits_a, group.target.repeat(k), objective)
        (grad,) = torch.autograd.grad(prob.sum(), delta)  # Σ_k w_k ∂F/∂attn_out(alpha_k)
        grad_u += grad.float()
    grad_ctx = torch.matmul(grad_u, w_o.weight.float())  # [r, T_q, heads * d]
    grad_ctx = grad_ctx.view(bsz, t_q, heads, -1).transpose(1, 2)
    grad_rows = torch.matmul(grad_ctx, v.float().transpose(-1, -2))  # [r, heads, T_q, W]
    attr = torch.zeros(probs.shape, dtype=torch.float32, device=device)
    attr[:, :, :t_q, :] = rows32 * grad_rows
    return attr, probs


def _fast_attributions(model, batch, rows, steps, target, layers, quadrature, max_tokens, max_rows, precision, objective="prob"):
    """Per layer, the :class:`GroupAttribution` of every length group (the fast procedure).

    Same quantity as :func:`_reference_attributions`, with the work cut where it changes nothing:

    * each length group runs at its own width; its layers below the target layer run once (their
      output does not depend on alpha);
    * the target layer starts from its attention output ``alpha (A V) W_O^T + b_O`` (``A V`` and its
      projection computed once; the layer is linear in ``A`` up to there), so no Q/K/V or output
      projection is repeated per alpha, and the probabilities' gradient is formed once from the
      quadrature-weighted gradient of that output; the feed-forward's first linear map, fed an
      affine function of alpha up to the norm's scale, runs once per group on the alpha-free parts
      and once per chunk of alpha steps on the backward's leaf (:class:`_ScaledTargetLayer`);
    * the last layer is computed for the [CLS] query only (the classifier reads nothing else); for
      the last layer itself, only the [CLS] row of the attribution can be non-zero, and is;
    * rows and alpha steps share a forward of at most ``max_tokens`` tokens; parameters get no gradients.
    """
    alphas, weights = quadrature_nodes(steps, quadrature)
    groups = _groups(model, batch, rows, max_tokens, max_rows)
    for g in groups:
        _prepare_fast(model, g, layers, target, precision)
    for layer in layers:
        if layer not in groups[0].probs:  # every head of this layer was pruned
            continue
        out = []
        for g in groups:
            attr, probs = _fast_layer(model, g, layer, alphas, weights, max_tokens, max_rows, precision, objective)
            out.append(GroupAttribution(g.index, attr, probs, g.sub["attention_mask"]))
        yield layer, out


def _reference_attributions(model, batch, rows, steps, target, layers, quadrature, max_tokens, max_rows, precision, objective="prob"):
    """The paper's procedure: one example at a time on its own tokens; per layer, whole-model forwards
    of the scaled copies (at most ``max_tokens`` tokens each) and their backward."""
    alphas, weights = quadrature_nodes(steps, quadrature)
    pad = _pad_id(model)
    results: dict[int, list[GroupAttribution]] = {layer: [] for layer in layers}
    for b in range(len(rows)):
        one = compact(batch, rows, [b], pad)
        n = rows.length[b]
        device = one["input_ids"].device
        with torch.no_grad(), autocast(device, precision):
            control = AttentionControl(record=set(layers))
            logits = forward_logits(model, one, control)
        tgt = _targets(logits, one, target)
        per = max(1, max_tokens // n)
        if max_rows is not None:
            per = min(per, max_rows)
        for layer in layers:
            probs = control.recorded.get(layer)
            if probs is None:
                continue
            probs = probs.detach()
            probs32 = probs.float()
            grad_sum = torch.zeros_like(probs32[0])
            for start, stop in split_evenly(steps, per):
                k = stop - start
                a = alphas[start:stop].to(device)
                w = weights[start:stop].to(device)
                copies = {key: v.expand(k, -1) for key, v in one.items() if key != "labels"}
                scaled = (a.view(k, 1, 1, 1) * probs32).requires_grad_(True)
                with torch.enable_grad(), autocast(device, precision):
                    logits_a = forward_logits(model, copies, AttentionControl(replace={layer: scaled}))
                    prob = _target_prob(logits_a, tgt.expand(k), objective)
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
                grad_sum += (w.view(k, 1, 1, 1) * grad.float()).sum(0)
            attr = (probs32[0] * grad_sum)[None]
            results[layer].append(GroupAttribution([b], attr, probs, one["attention_mask"]))
    for layer in layers:
        if results[layer]:
            yield layer, results[layer]


def _check_layers(model, layers):
    n_layers = len(encoder_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers")
    return layers


def iter_group_attributions(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    max_tokens_per_forward: int | None = None,
    chunk_size: int | None = None,
    mixed_precision: str | None = None,
    objective: Objective = "prob",
) -> Iterator[tuple[int, list[GroupAttribution]]]:
    """Yield ``(layer, [GroupAttribution per group of rows])``: the attributions before they are placed back.

    The cheapest form for per-example reductions (e.g. head scores): no ``[B, heads, T, T]`` tensor
    in the caller's layout is built. Arguments as in :func:`attention_attribution`.
    """
    yield from checked_run(
        _fast_attributions if mode == "fast" else _reference_attributions, model, batch, steps=steps, target=target, layers=layers,
        mode=mode, quadrature=quadrature, max_tokens_per_forward=max_tokens_per_forward, chunk_size=chunk_size,
        mixed_precision=mixed_precision, objective=objective, row_cap=True,
    )


def checked_run(
    run, model: nn.Module, batch: dict[str, torch.Tensor], *, steps: int, target: str, layers, mode: str, quadrature: str,
    max_tokens_per_forward: int | None, chunk_size: int | None, mixed_precision: str | None, objective: str, row_cap: bool,
):
    """What AttAttr's attention and neuron paths share: check the arguments (before any work), then yield
    what ``run(model, batch, rows, steps, target, layers, quadrature, max_tokens[, max_rows], precision,
    objective)`` yields (``max_rows`` only with ``row_cap``), with ``model`` in eval mode and frozen; its
    training mode is restored afterwards. An all-padding batch yields nothing.

    Raises:
        ValueError: a layer out of range, an unknown objective, mode, target or quadrature, bad steps or
            token budget, or a row longer than the budget.
    """
    layers = _check_layers(model, layers)
    _check_objective(objective)
    if mode not in ("fast", "reference"):
        raise ValueError(f"unknown mode '{mode}'; use fast or reference")
    if target not in ("predicted", "gold"):
        raise ValueError(f"unknown target '{target}'; use predicted or gold")
    quadrature_nodes(steps, quadrature)  # validates steps and quadrature before any work
    max_tokens, max_rows = token_budget(max_tokens_per_forward, chunk_size)
    budget = (max_tokens, max_rows) if row_cap else (max_tokens,)
    precision = resolve_precision(mixed_precision)
    rows = row_spans(batch["attention_mask"])
    if len(rows) == 0:
        return
    check_fits(rows.length, max_tokens)
    with evaluating(model):
        yield from run(model, batch, rows, steps, target, layers, quadrature, *budget, precision, objective)


def _place(groups: list[GroupAttribution], rows: Rows, bsz: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Group results back at the caller's rows and columns: ``([B, kept, T, T] float32, probs [B, kept, T, T])``."""
    heads = groups[0].attr.shape[1]
    attr = torch.zeros(bsz, heads, rows.width, rows.width, device=device)
    probs = torch.zeros(bsz, heads, rows.width, rows.width, device=device, dtype=groups[0].probs.dtype)
    for g in groups:
        for i, b in enumerate(g.index):
            s, n = rows.start[b], rows.length[b]
            attr[b, :, s : s + n, s : s + n] = g.attr[i, :, :n, :n]
            probs[b, :, s : s + n, s : s + n] = g.probs[i, :, :n, :n]
    return attr, probs


def iter_layer_attributions(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    max_tokens_per_forward: int | None = None,
    chunk_size: int | None = None,
    mixed_precision: str | None = None,
    objective: Objective = "prob",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(layer, attribution [B, kept_heads, T, T] float32, probabilities [B, kept_heads, T, T])``.

    In the caller's rows and columns. Heads are the layer's current heads (see
    :func:`prune_attattr.models.kept_heads` for their original indices); a layer with no heads left
    is skipped. Entries involving padding are 0. Arguments as in :func:`attention_attribution`.
    """
    rows = row_spans(batch["attention_mask"])
    bsz = batch["input_ids"].shape[0]
    for layer, groups in iter_group_attributions(
        model, batch, steps=steps, target=target, layers=layers, mode=mode, quadrature=quadrature,
        max_tokens_per_forward=max_tokens_per_forward, chunk_size=chunk_size, mixed_precision=mixed_precision,
        objective=objective,
    ):
        attr, probs = _place(groups, rows, bsz, batch["input_ids"].device)
        yield layer, attr, probs


def attention_attribution(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    max_tokens_per_forward: int | None = None,
    chunk_size: int | None = None,
    mixed_precision: str | None = None,
    objective: Objective = "prob",
) -> torch.Tensor:
    """Self-attention attribution scores (Hao et al. 2021, Eq. 2-3) for every head of the chosen layers.

    Each example is attributed on its own tokens (what the model computes for it alone), whatever
    the order of the rows and the side of the padding; rows of similar length share forwards.

    Args:
        model: BERT-family sequence classifier loaded by :func:`prune_attattr.load_classifier`
            (any model whose attention implementation is ``prune_attattr``), possibly pruned.
        batch: ``input_ids [B, T]``, ``attention_mask [B, T]`` (right or left padding), optional
            ``token_type_ids [B, T]``, and ``labels [B]`` when ``target="gold"``.
        steps: number of quadrature steps m (paper: 20).
        target: class whose probability is attributed: the model's prediction or the gold label.
        layers: layer indices to attribute (default: all), in the order of the output's dim 1.
        mode: ``"reference"`` (paper's procedure) or ``"fast"`` (same quantity, batched, reused).
        quadrature: ``"left"`` Riemann (paper), ``"midpoint"`` or ``"gauss"`` (Gauss-Legendre).
        max_tokens_per_forward: at most this many tokens (rows x width, alpha copies included) in
            one forward; default 16384.
        chunk_size: deprecated; if given, also at most this many rows per forward.
        mixed_precision: ``"no"`` (default), ``"bf16"`` or ``"fp16"``: autocast on the batch's
            device type; attribution sums stay float32.
        objective: the attributed output ``F``: ``"prob"``, the target-class probability (paper), or
            ``"log_prob"``, its log (with ``target="gold"``: minus the cross-entropy loss).

    Returns:
        float32 tensor ``[B, len(layers), num_attention_heads, T, T]`` (query, key) in the caller's
        rows and columns; the unit is the target-class probability (or its log). Pruned heads and padded
        positions are 0.

    Raises:
        ValueError: bad ``steps``, ``target``, ``mode``, ``quadrature``, ``objective``, layer index, token
            bound, precision, an empty row, padding between tokens, or a row longer than the token bound.
    """
    layers = _check_layers(model, layers)
    bsz, seq = batch["input_ids"].shape
    n_heads = model.config.num_attention_heads
    out = torch.zeros(bsz, len(layers), n_heads, seq, seq, device=batch["input_ids"].device)
    heads = kept_heads(model)
    position = {layer: i for i, layer in enumerate(layers)}
    for layer, attr, _ in iter_layer_attributions(
        model, batch, steps=steps, target=target, layers=layers, mode=mode, quadrature=quadrature,
        max_tokens_per_forward=max_tokens_per_forward, chunk_size=chunk_size, mixed_precision=mixed_precision,
        objective=objective,
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
    masked = attr.float().masked_fill(~pair, float("-inf"))
    return masked.flatten(2).max(-1).values


def attribution_head_sums(attr: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-example head total: the sum of the attribution over valid (query, key) pairs.

    Scaling head ``h``'s probabilities by alpha scales its output by alpha, so this sum is the integrated
    gradient of a gate on head ``h``'s output along the path where the whole layer's attention is scaled
    together (Eq. 2): additive over heads, and over a layer complete (``F(A) - F(0)``, up to quadrature).

    Args:
        attr: ``[B, heads, T, T]`` attributions of one layer.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding).

    Returns:
        ``[B, heads]`` float32, in the attributed output's unit.
    """
    valid = attention_mask.bool()
    pair = (valid[:, :, None] & valid[:, None, :])[:, None]
    return attr.float().masked_fill(~pair, 0.0).flatten(2).sum(-1)
