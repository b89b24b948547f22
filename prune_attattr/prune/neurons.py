"""Structural pruning of feed-forward neurons for the encoder families of :mod:`prune_attattr.families`.

A layer's feed-forward block is ``second(act(first(x)))``; its intermediate neurons are the output
rows of the first linear map (``ffn_in``) and the input columns of the second (``ffn_out``). Removing
neuron ``j`` deletes row ``j`` of the first map and of its bias and column ``j`` of the second map
(the neuron mask of Kwon et al. 2022, arXiv 2204.09656, multiplies exactly these activations). With a gated
first map (``glu``: ModernBERT's ``Wi`` holds the row blocks ``[x; gate]``), both rows of a neuron go.

A layer that loses every neuron keeps a first map with no rows (``nn.Linear(hidden, 0)``, its output
is empty and unused) and, in place of the second map, a bias-only module (:class:`~prune_attattr.prune.heads._BiasOnly`):
its feed-forward output is the second map's bias, exactly what a fully masked layer computes. A
zero-width second map would compute the same in PyTorch and export to ONNX, but leaves zero-sized
initialisers in the graph, and ONNX Runtime's int8 dynamic quantisation then gave wrong logits (a
tiny BERT: max logit error 5.8 with them, 0.6 with the bias-only module, 0.3 unpruned).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from ..families import PRUNED_NEURONS_KEY, set_path
from ..models import encoder_layers, feed_forward, intermediate_size, kept_neurons, prepare
from .heads import _BiasOnly, _bias_of

__all__ = ["prune_neurons", "pruned_neurons_of"]


def pruned_neurons_of(model: nn.Module) -> dict[int, list[int]]:
    """Original indices of the feed-forward neurons already pruned, ``{layer: [neurons]}`` (layers with none omitted)."""
    n = intermediate_size(model)
    out = {}
    for layer, kept in enumerate(kept_neurons(model)):
        gone = sorted(set(range(n)) - set(kept))
        if gone:
            out[layer] = gone
    return out


def _rows(first: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """``first`` keeping output rows ``index`` (possibly none: ``nn.Linear(in, 0)``)."""
    with warnings.catch_warnings():  # torch warns that initialising a zero-element weight is a no-op
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return prune_linear_layer(first, index, dim=0)


def prune_neurons(model: nn.Module, neurons: Mapping[int | str, Sequence[int]]) -> nn.Module:
    """Remove feed-forward neurons from ``model`` in place (structural pruning).

    Args:
        model: a sequence classifier of a supported family (see :mod:`prune_attattr.families`).
        neurons: ``{layer: [neuron, ...]}`` with *original* neuron indices (0 .. intermediate size - 1,
            :func:`prune_attattr.models.intermediate_size`). Neurons already pruned are ignored; a
            layer may lose all its neurons.

    Returns:
        The same model: the first map of every touched layer has fewer rows (GLU: both halves of a
        neuron), the second map fewer columns, ``neuron_ids`` on the second map records the original
        index of every kept neuron (:func:`prune_attattr.models.kept_neurons`), and
        ``config.prune_attattr_pruned_neurons`` (``{"layer": [neurons]}``) is updated. The neuron hooks
        of :func:`prune_attattr.models.prepare` sit on the new modules.

    Raises:
        ValueError: a layer or neuron index out of range.
        prune_attattr.models.ModelError: the family has no feed-forward paths.
    """
    fam = prepare(model)
    layers = encoder_layers(model)
    size = intermediate_size(model)
    for key, ns in neurons.items():
        layer = int(key)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
        bad = [j for j in ns if not 0 <= int(j) < size]
        if bad:
            raise ValueError(f"neuron(s) {bad[:5]} of layer {layer} out of range: layers have {size} feed-forward neurons")
        current = kept_neurons(model)[layer]
        drop = {int(j) for j in ns} & set(current)
        if not drop:
            continue
        keep = [j for j in current if j not in drop]
        block = layers[layer]
        first, second = feed_forward(model, layer)
        index = torch.tensor([p for p, j in enumerate(current) if j not in drop], dtype=torch.long, device=first.weight.device)
        rows = torch.cat([index, index + len(current)]) if fam.glu else index  # GLU: [x; gate] blocks
        set_path(block, fam.ffn_in, _rows(first, rows))
        if keep:
            new_second = prune_linear_layer(second, index, dim=1)
        else:
            new_second = _BiasOnly(_bias_of(second))
        new_second.neuron_ids = keep
        set_path(block, fam.ffn_out, new_second)
    prepare(model)  # the neuron hooks onto the new second maps
    setattr(model.config, PRUNED_NEURONS_KEY, {str(k): v for k, v in pruned_neurons_of(model).items()})
    return model

