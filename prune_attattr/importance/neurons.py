"""Feed-forward neuron attribution: knowledge attribution (Dai, Dong, Hao et al., ACL 2022, section 3).

For one layer with intermediate activations ``a`` (``[seq, neurons]``: the input of the feed-forward
block's second linear map, i.e. the activation function's output; GLU families: ``act(x) * gate``)
and the model output ``F`` (probability of the target class), with that layer's activations replaced
by ``alpha * a`` and every other layer left as it is:

    Attr(a) = a ⊙ ∫_0^1 ∂F(alpha a)/∂a d alpha                                   (Dai et al., Eq. 3)
            ≈ a ⊙ Σ_i w_i ∂F(alpha_i a)/∂a                                          (Eq. 4)

with a zero baseline and the quadrature of the head method
(:func:`prune_attattr.importance.attattr.quadrature_nodes`; the paper: left Riemann, ``m = 20``). By
completeness, the sum of ``Attr`` over a layer's tokens and neurons approaches ``F(a) - F(0)``.

A neuron's importance is the max of its attribution over the example's valid tokens (as a head's is
the max of its attribution matrix, Hao et al. 2021, section 4.1), summed over examples.

Two procedures compute the same quantity:

* ``mode="reference"``: one example, one layer, one alpha at a time: a whole-model forward with the
  layer's activations replaced (:class:`~prune_attattr.attention.AttentionControl` ``neuron_replace``)
  and a backward.
* ``mode="fast"``: per group of similar-length rows (:mod:`prune_attattr.importance.batching`), the
  layers below the target layer run once, the target layer's attention block and first map once
  (:func:`_ffn_pieces`); the second map is linear in the activations, so
  ``W_2 (alpha a) + b_2 = alpha P + b_2`` with ``P = a W_2^T`` computed once
  (:class:`_ScaledNeurons`); only the layers above run per alpha, alpha steps and rows sharing a
  forward of at most ``max_tokens_per_forward`` tokens; the backward stops at the second map's
  output; the last layer runs for [CLS] only (:func:`prune_attattr.models.cls_layer`). For the last
  layer itself only position 0's activations reach the classifier: its attribution is 0 elsewhere
  (in both modes). Parameters get no gradients.

Under ``mixed_precision="bf16"``/``"fp16"`` the forwards run in autocast (the second map's output
``alpha P + b_2`` is cast to the autocast dtype, as the map would return it); ``P``, the leaf ``δ``, the
quadrature-summed gradient and the attributions stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..attention import AttentionControl, controlled
from ..models import (
    ModelError,
    classify,
    cls_layer,
    encoder_layers,
    feed_forward,
    forward_logits,
    intermediate_size,
    kept_neurons,
    logits_from_layer,
    prepare,
    repeat_batch,
    run_layers,
)
from ..precision import autocast
from .attattr import (
    Objective,
    Quadrature,
    Target,
    _check_layers,
    _groups,
    _pad_id,
    _prepare_fast,
    _target_prob,
    _targets,
    checked_run,
    quadrature_nodes,
)
from .batching import compact, row_spans, split_evenly

__all__ = [
    "GroupNeuronAttribution",
    "iter_neuron_attributions",
    "neuron_attribution",
    "neuron_scores",
    "neuron_sums",
]


@dataclass
class GroupNeuronAttribution:
    """Neuron attributions of one layer for one group of rows, compacted (every row starts at column 0).

    Attributes:
        index: the caller's row of each group row, ``[r]``.
        attr: float32 ``[r, W, kept_neurons]`` (token, neuron) in the target-class probability's unit;
            padding positions are 0 (for the last layer every position but 0 is).
        attention_mask: ``[r, W]`` of the compacted rows (1 = token).
    """

    index: list[int]
    attr: torch.Tensor
    attention_mask: torch.Tensor


def neuron_scores(attr: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-example neuron score: the max attribution over the example's valid tokens.

    Args:
        attr: ``[B, T, neurons]`` attributions of one layer.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding).

    Returns:
        ``[B, neurons]`` float32.
    """
    valid = attention_mask.bool()[:, :, None]
    return attr.float().masked_fill(~valid, float("-inf")).max(1).values


def neuron_sums(attr: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-example neuron total: the sum of the attribution over the example's valid tokens.

    Scaling neuron ``i``'s activations by alpha at every token is a gate on that neuron, so this sum is
    the integrated gradient of the gate along the path where the whole layer's activations are scaled
    together (Dai et al. 2022, Eq. 3): additive over neurons, complete over a layer (``F(a) - F(0)``).

    Args:
        attr: ``[B, T, neurons]`` attributions of one layer.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding).

    Returns:
        ``[B, neurons]`` float32, in the attributed output's unit.
    """
    valid = attention_mask.bool()[:, :, None]
    return attr.float().masked_fill(~valid, 0.0).sum(1)


@contextlib.contextmanager
def _output_given(linear: nn.Module, output: torch.Tensor):
    """Inside the block, ``linear(x)`` returns ``output`` whatever ``x`` is (its hooks still run).

    Lets the family's ``second`` (second map, dropout, residual, norm: code per family) run on a second
    map's output computed otherwise (:class:`_ScaledNeurons`), without the map's product per alpha.
    """
    had = "forward" in linear.__dict__
    saved = linear.__dict__.get("forward")
    linear.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        if had:
            linear.forward = saved
        else:
            del linear.forward


@contextlib.contextmanager
def _norm_io(norm: nn.Module):
    """Records the feed-forward norm's input (``summed``) and output (``normed``) during the block."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        seen["summed"], seen["normed"] = args[0], output

    handle = norm.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _split(model: nn.Module, block: nn.Module):
    """The family's :class:`~prune_attattr.families.FeedForwardSplit` of ``block``.

    Raises:
        ModelError: the family gives none (the fast path needs it; ``mode='reference'`` does not).
    """
    fam = prepare(model)
    if fam.ffn_split is None:
        raise ModelError(f"the {fam.name} family entry has no ffn_split; neuron attribution needs mode 'reference' for it")
    return fam.ffn_split(block)


def _ffn_pieces(model, layer: int, hidden_in: torch.Tensor, mask, precision: str):
    """Run ``layer`` once on its input ``hidden_in [r, W, hidden]`` (no grad; the last layer for [CLS]
    only): ``(split, acts [r, T_q, kept], normed [r, T_q, hidden], summed [r, T_q, hidden])`` with
    ``T_q = 1`` for the last layer, ``W`` otherwise (the inputs of the family's ``second``)."""
    layers = encoder_layers(model)
    block = layers[layer]
    split = _split(model, block)
    control = AttentionControl(neuron_record={layer})
    with torch.no_grad(), autocast(hidden_in.device, precision), _norm_io(split.norm) as seen:
        if layer == len(layers) - 1:
            cls_layer(model, block, hidden_in, mask, control)
        else:
            run_layers(model, hidden_in, mask, layer, layer + 1, control)
    return split, control.neuron_recorded[layer].detach(), seen["normed"].detach(), seen["summed"].detach()


class _ScaledNeurons:
    """A layer from its intermediate activations on, for a chunk of alpha steps at once.

    The second map is linear: its output at step ``k`` is ``alpha_k P + b_2`` with ``P = a W_2^T``
    (``[r, T_q, hidden]``, float32, computed once). Step ``k`` runs the rest of the layer
    (:attr:`FeedForwardSplit.second` past the map: dropout, residual, norm) on
    ``alpha_k P + b_2 + w_k δ``, with ``δ`` (zeros, ``[r, T_q, hidden]``) one leaf shared by the chunk's
    steps: the gradient of ``Σ_k F_k`` with respect to ``δ`` is the quadrature sum
    ``Σ_k w_k ∂F/∂y(alpha_k)`` of the map's output, and ``(that) W_2`` is the activations' gradient
    summed over the quadrature: one product with ``W_2`` per group, not one per alpha. Exact up to
    float rounding.
    """

    def __init__(self, model, layer: int, split, acts, normed, summed):
        self.split, self.normed, self.summed = split, normed, summed
        self.map = feed_forward(model, layer)[1]
        self.acts = acts.float()
        self.w2 = self.map.weight.float()  # [hidden, kept]
        self.bias = None if self.map.bias is None else self.map.bias.float()
        self.proj = nn.functional.linear(self.acts, self.w2)  # P = a W_2^T: [r, T_q, hidden]

    def __call__(self, a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(δ leaf [r, T_q, hidden], layer output [k * r, T_q, hidden])`` for steps ``a [k]``, weights
        ``w [k]`` (copy-major rows); call under ``enable_grad`` and the run's autocast."""
        k, (r, t_q, hidden) = a.shape[0], self.proj.shape
        delta = torch.zeros_like(self.proj, requires_grad=True)
        y = (a.view(k, 1, 1, 1) * self.proj + w.view(k, 1, 1, 1) * delta).reshape(k * r, t_q, hidden)
        if self.bias is not None:
            y = y + self.bias
        device = y.device.type
        if torch.is_autocast_enabled(device):  # what the map itself would return under the run's autocast
            y = y.to(torch.get_autocast_dtype(device))
        with controlled(None), _output_given(self.map, y):  # no outer control reaches the neuron hook
            out = self.split.second(y, repeat_batch(self.normed, k), repeat_batch(self.summed, k))
        return delta, out

    def attribution(self, grad_y: torch.Tensor) -> torch.Tensor:
        """``a ⊙ (Σ_k w_k ∂F/∂y_k) W_2``: float32 ``[r, T_q, kept]`` from the summed gradient ``grad_y [r, T_q, hidden]``."""
        return self.acts * torch.matmul(grad_y, self.w2)


def _fast_layer(model, group, layer: int, alphas, weights, max_tokens: int, precision: str, objective: Objective = "prob") -> torch.Tensor:
    """Attribution float32 ``[r, W, kept]`` of ``layer`` for one prepared group (see the module docstring)."""
    last = len(encoder_layers(model)) - 1
    hidden_in = group.inputs.pop(layer)
    device = hidden_in.device
    r, width = group.sub["input_ids"].shape
    split, acts, normed, summed = _ffn_pieces(model, layer, hidden_in, group.mask, precision)
    scaled = _ScaledNeurons(model, layer, split, acts, normed, summed)
    t_q = acts.shape[1]
    grad_y = torch.zeros_like(scaled.proj)
    per = max(1, max_tokens // (r * (1 if layer == last else width)))  # copies of the group per forward
    for start, stop in split_evenly(alphas.shape[0], per):
        a, w = alphas[start:stop].to(device), weights[start:stop].to(device)
        k = stop - start
        with torch.enable_grad(), autocast(device, precision):
            delta, out = scaled(a, w)
            if layer == last:
                logits = classify(model, out)
            else:
                logits = logits_from_layer(model, out, repeat_batch(group.mask, k), layer + 1)
            prob = _target_prob(logits, group.target.repeat(k), objective)
        (grad,) = torch.autograd.grad(prob.sum(), delta)
        grad_y += grad.float()
    attr = torch.zeros(r, width, acts.shape[-1], device=device)
    attr[:, :t_q] = scaled.attribution(grad_y)
    return attr * group.sub["attention_mask"][:, :, None].to(attr.dtype)


def _fast(model, batch, rows, steps, target, layers, quadrature, max_tokens, precision, objective="prob"):
    alphas, weights = quadrature_nodes(steps, quadrature)
    kept = kept_neurons(model)
    layers = [layer for layer in layers if kept[layer]]  # a layer without neurons has nothing to attribute
    if not layers:
        return
    for group in _groups(model, batch, rows, max_tokens, None):
        _prepare_fast(model, group, layers, target, precision, probabilities=False)
        for layer in layers:
            attr = _fast_layer(model, group, layer, alphas, weights, max_tokens, precision, objective)
            yield layer, GroupNeuronAttribution(group.index, attr, group.sub["attention_mask"])


def _reference(model, batch, rows, steps, target, layers, quadrature, max_tokens, precision, objective="prob"):
    """One example, one layer, one alpha at a time: whole-model forwards with the layer's activations replaced."""
    alphas, weights = quadrature_nodes(steps, quadrature)
    pad = _pad_id(model)
    for b in range(len(rows)):
        one = compact(batch, rows, [b], pad)
        device = one["input_ids"].device
        with torch.no_grad(), autocast(device, precision):
            control = AttentionControl(neuron_record=set(layers))
            logits = forward_logits(model, one, control)
        tgt = _targets(logits, one, target)
        for layer in layers:
            acts = control.neuron_recorded.get(layer)
            if acts is None or acts.shape[-1] == 0:  # a layer without neurons
                continue
            acts32 = acts.detach().float()
            grad_sum = torch.zeros_like(acts32)
            for a, w in zip(alphas.tolist(), weights.tolist()):
                scaled = (a * acts32).requires_grad_(True)
                with torch.enable_grad(), autocast(device, precision):
                    prob = _target_prob(forward_logits(model, one, AttentionControl(neuron_replace={layer: scaled})), tgt, objective)
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
                grad_sum += w * grad.float()
            yield layer, GroupNeuronAttribution([b], acts32 * grad_sum, one["attention_mask"])


def iter_neuron_attributions(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    objective: Objective = "prob",
) -> Iterator[tuple[int, GroupNeuronAttribution]]:
    """Yield ``(layer, GroupNeuronAttribution)`` for every (layer, group of rows), in no fixed order.

    The cheapest form for per-example reductions (:func:`neuron_scores`): nothing in the caller's
    layout is built. Neurons are the layer's current ones (:func:`prune_attattr.models.kept_neurons`
    maps them to original indices); a layer without neurons is skipped. Arguments as in
    :func:`neuron_attribution`.
    """
    yield from checked_run(
        _fast if mode == "fast" else _reference, model, batch, steps=steps, target=target, layers=layers, mode=mode,
        quadrature=quadrature, max_tokens_per_forward=max_tokens_per_forward, chunk_size=None, mixed_precision=mixed_precision,
        objective=objective, row_cap=False,
    )


def neuron_attribution(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    steps: int = 20,
    target: Target = "predicted",
    layers: list[int] | None = None,
    mode: Literal["fast", "reference"] = "fast",
    quadrature: Quadrature = "left",
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    objective: Objective = "prob",
) -> torch.Tensor:
    """Knowledge attribution (Dai et al. 2022, Eq. 3-4) of every feed-forward neuron at every token.

    Each example is attributed on its own tokens, whatever the order of the rows and the side of the
    padding; rows of similar length share forwards.

    Args:
        model: sequence classifier of a supported family (possibly pruned), as for
            :func:`prune_attattr.importance.attattr.attention_attribution`.
        batch: ``input_ids [B, T]``, ``attention_mask [B, T]`` (right or left padding), optional
            ``token_type_ids [B, T]``, and ``labels [B]`` when ``target="gold"``.
        steps: quadrature steps m (Dai et al.: 20).
        target: class whose probability is attributed: the model's prediction or the gold label.
        layers: layer indices (default: all), in the order of the output's dim 1.
        mode: ``"reference"`` (one example, layer and alpha at a time) or ``"fast"`` (same quantity).
        quadrature: ``"left"`` Riemann (paper), ``"midpoint"`` or ``"gauss"`` (Gauss-Legendre).
        max_tokens_per_forward: at most this many tokens (rows x width, alpha copies included) in one
            forward; default 16384.
        mixed_precision: ``"no"`` (default), ``"bf16"`` or ``"fp16"``; attributions stay float32.
        objective: ``"prob"`` (target-class probability, Dai et al.) or ``"log_prob"`` (its log).

    Returns:
        float32 ``[B, len(layers), T, intermediate_size]`` (token, original neuron index) in the
        caller's rows and columns; unit: target-class probability. Pruned neurons and padding are 0.

    Raises:
        ValueError: bad ``steps``, ``target``, ``mode``, ``quadrature``, ``objective``, layer index, token
            bound, precision, an empty row, padding between tokens, or a row longer than the token bound.
        ModelError: ``mode="fast"`` for a family without a feed-forward split.
    """
    layers = _check_layers(model, layers)
    rows = row_spans(batch["attention_mask"])
    bsz, seq = batch["input_ids"].shape
    out = torch.zeros(bsz, len(layers), seq, intermediate_size(model), device=batch["input_ids"].device)
    kept = kept_neurons(model)
    position = {layer: i for i, layer in enumerate(layers)}
    for layer, g in iter_neuron_attributions(
        model, batch, steps=steps, target=target, layers=layers, mode=mode, quadrature=quadrature,
        max_tokens_per_forward=max_tokens_per_forward, mixed_precision=mixed_precision, objective=objective,
    ):
        cols = torch.tensor(kept[layer], device=out.device)
        for i, b in enumerate(g.index):
            s, n = rows.start[b], rows.length[b]
            out[b, position[layer], s : s + n, cols] = g.attr[i, :n].to(out.device)
    return out
