"""Per-example gradients of the loss with respect to unit masks: the one backward behind Taylor and Fisher.

Every head and every feed-forward neuron gets a mask ``m`` (all ones, one per example: heads scale
their attention probabilities, :class:`~prune_attattr.attention.AttentionControl` ``head_mask``;
neurons their intermediate activations, ``neuron_mask``). With the cross-entropy loss ``L`` against
the gold label, summed over the examples of a forward, ``∂L/∂m`` of example ``b``'s mask is that
example's own gradient. From these gradients ``g``:

* Taylor (Michel et al. 2019, Eq. 4; Molchanov et al. 2017): ``|g|``, i.e. ``|Σ_tokens A ⊙ ∂L/∂A|``
  for a head and ``|Σ_tokens a ⊙ ∂L/∂a|`` for a neuron, summed over examples;
* Fisher (Kwon et al. 2022, arXiv 2204.09656, section 4.1, the empirical Fisher information of the
  mask): ``g^2`` summed over examples.

Heads and neurons come from the same forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionControl
from ..models import encoder_layers, evaluating, forward_logits, intermediate_size, kept_heads, kept_neurons
from ..precision import autocast, resolve_precision
from .attattr import _pad_id
from .batching import over_batches, sub_batches, token_budget

__all__ = ["mask_gradients"]


def _put(table: torch.Tensor, index: list[int], layer: int, units: list[int], values: torch.Tensor) -> None:
    """Write group values ``[len(index), len(units)]`` into ``table [B, layers, units]`` at the caller's rows."""
    rows = torch.tensor(index, device=table.device)
    cols = torch.tensor(units, device=table.device)
    table[rows[:, None], layer, cols[None, :]] = values.float().to(table.device)


def mask_gradients(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    heads: bool = True,
    neurons: bool = True,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "mask gradients",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-example gradients of the cross-entropy loss with respect to per-example unit masks (all ones).

    Args:
        model: sequence classifier of a supported family (possibly pruned).
        dataloader: prepared dataloader of batches with ``labels``; examples are gathered across
            processes (:func:`~prune_attattr.importance.batching.over_batches`), so N processes give
            the values of one.
        heads, neurons: which units to differentiate (at least one).
        max_tokens_per_forward: at most this many tokens per forward (default 16384).
        mixed_precision: ``"no"``, ``"bf16"``, ``"fp16"``; default the accelerator's. The loss and the
            gradients are float32.

    Returns:
        ``(heads [N, layers, num_attention_heads] or None, neurons [N, layers, intermediate_size] or None)``
        float32, at original unit indices (pruned units 0); unit: loss (nats) per unit of mask.

    Raises:
        ValueError: neither unit asked for, a batch without ``labels``, or bad token bound / precision.
    """
    if not (heads or neurons):
        raise ValueError("mask_gradients needs heads or neurons (or both)")
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    head_ids = kept_heads(model) if heads else []
    neuron_ids = kept_neurons(model) if neurons else []
    n_layers = len(encoder_layers(model))
    pad = _pad_id(model)

    def work(batch):
        if batch.get("labels") is None:
            raise ValueError("mask gradients need gold labels ('labels') in every batch")
        device = batch["input_ids"].device
        bsz = batch["input_ids"].shape[0]
        out = []
        if heads:
            out.append(torch.zeros(bsz, n_layers, model.config.num_attention_heads, device=device))
        if neurons:
            out.append(torch.zeros(bsz, n_layers, intermediate_size(model), device=device))
        for index, sub in sub_batches(batch, max_tokens, pad):
            r = len(index)
            hm = {layer: torch.ones(r, len(h), device=device, requires_grad=True) for layer, h in enumerate(head_ids) if h}
            nm = {layer: torch.ones(r, len(n), device=device, requires_grad=True) for layer, n in enumerate(neuron_ids) if n}
            with torch.enable_grad():
                with autocast(device, precision):
                    logits = forward_logits(model, sub, AttentionControl(head_mask=hm, neuron_mask=nm))
                loss = nn.functional.cross_entropy(logits.float(), sub["labels"], reduction="sum")
                grads = torch.autograd.grad(loss, [*hm.values(), *nm.values()])
            for layer, g in zip(hm, grads[: len(hm)]):
                _put(out[0], index, layer, head_ids[layer], g)
            for layer, g in zip(nm, grads[len(hm) :]):
                _put(out[-1], index, layer, neuron_ids[layer], g)
        return tuple(out)

    with evaluating(model):
        gathered = over_batches(dataloader, accelerator, description, work)
    return (gathered[0] if heads else None), (gathered[-1] if neurons else None)
