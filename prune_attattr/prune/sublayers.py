"""Structural removal of whole sublayers: an encoder layer's attention block or feed-forward block.

A removed sublayer is the identity: the hidden states pass it unchanged, so its units (every head or
every neuron), its residual connection and its norm are gone, and with them the sublayer's operators
(the per-operator time that dominates a small model at batch 1). CoFi (Xia et al. 2022, "Structured
Pruning Learns Compact and Accurate Models", section 3.1) removes whole multi-head-attention and
feed-forward layers the same way; its layer-wise distillation is ``recovery.hidden_weight`` here.

Removing the ``"attention"`` sublayer of layer ``l`` first prunes all its heads
(:func:`~prune_attattr.prune.heads.prune_heads`), removing ``"ffn"`` all its neurons
(:func:`~prune_attattr.prune.neurons.prune_neurons`); then the module named by the family's
:class:`~prune_attattr.families.Sublayer` ``bypass`` is replaced:

* ``kind="residual"`` (BERT, RoBERTa, ELECTRA, DeBERTa-v2: ``BertSelfOutput``/``BertOutput`` compute
  ``LN(dense(x) + input_tensor)``): by :class:`Residual`, which returns ``input_tensor``;
* ``kind="zero"`` (DistilBERT post-norm, ModernBERT pre-norm: the layer adds the block's output to
  ``h``): by :class:`Zero`, which returns 0, and the sublayer's norm by ``nn.Identity``.

The replacement keeps the children that unit paths of the family table run through (the emptied
output projection with ``head_ids``, the emptied second feed-forward map with ``neuron_ids``), so
:func:`~prune_attattr.models.kept_heads` and :func:`~prune_attattr.models.kept_neurons` report no
units for the removed sublayer, and the checkpoint template (``modeling_pruned.py``) rebuilds the
same modules from ``config.prune_attattr_removed_sublayers`` (``{layer: ["attention", "ffn"]}``).

The removed model equals the model whose sublayer gate is 0 (:class:`~prune_attattr.attention.AttentionControl`
``sublayer_gate``), in every family (``tests/test_sublayers.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..families import (
    REMOVED_SUBLAYERS_KEY,
    SUBLAYERS,
    Family,
    ModelError,
    get_path,
    set_path,
)
from ..models import _is_removed, encoder_layers, intermediate_size, prepare, removed_sublayers
from .heads import prune_heads
from .neurons import prune_neurons

__all__ = ["Residual", "Zero", "bypass_children", "remove_sublayers", "removed_sublayers"]


class Residual(nn.Module):
    """A removed post-norm sublayer whose output module took ``(hidden_states, input_tensor)``: returns
    ``input_tensor`` (the sublayer's input), unchanged. Keeps the children given (unit bookkeeping)."""

    _prune_attattr_bypass = True

    def __init__(self, children: Mapping[str, nn.Module] | None = None):
        super().__init__()
        for name, module in (children or {}).items():
            self.add_module(name, module)

    def forward(self, hidden_states, input_tensor, *args, **kwargs):
        return input_tensor


class Zero(nn.Module):
    """A removed sublayer whose output the layer adds to its input: returns 0 (``(0, None)`` when
    ``pair``, for an attention module that also returns weights). Keeps the children and the head
    bookkeeping (``head_ids``, ``layer_idx``) of the module it replaces."""

    _prune_attattr_bypass = True

    def __init__(self, children: Mapping[str, nn.Module] | None = None, pair: bool = False, **attrs):
        super().__init__()
        for name, module in (children or {}).items():
            self.add_module(name, module)
        self.pair = pair
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, *args, **kwargs):
        return (0, None) if self.pair else 0


def bypass_children(fam: Family, which: str) -> list[str]:
    """Names of the children of sublayer ``which``'s bypass module that the family's unit paths run
    through (kept by the replacement so those paths stay valid)."""
    sub = fam.sublayers[which]
    unit_paths = [fam.attention, fam.output, fam.ffn_in or "", fam.ffn_out or ""]
    prefix = sub.bypass + "."
    names = []
    for path in unit_paths:
        if path.startswith(prefix):
            child = path[len(prefix) :].split(".")[0]
            if child not in names:
                names.append(child)
    return names


def _bypass(block: nn.Module, fam: Family, which: str) -> None:
    sub = fam.sublayers[which]
    old = get_path(block, sub.bypass)
    children = {name: getattr(old, name) for name in bypass_children(fam, which)}
    if sub.kind == "residual":
        set_path(block, sub.bypass, Residual(children))
    else:
        attrs = {k: getattr(old, k) for k in ("head_ids", "layer_idx", "num_attention_heads") if hasattr(old, k)}
        set_path(block, sub.bypass, Zero(children, pair=sub.pair, **attrs))
        set_path(block, sub.norm, nn.Identity())


def remove_sublayers(model: nn.Module, sublayers: Mapping[int | str, Sequence[str]]) -> nn.Module:
    """Remove whole sublayers from ``model`` in place (structural; module docstring).

    Args:
        model: a sequence classifier of a supported family, pruned or not.
        sublayers: ``{layer: ["attention" and/or "ffn"]}``; sublayers already removed are ignored.

    Returns:
        The same model: the named sublayers are the identity, their heads or neurons pruned, and
        ``config.prune_attattr_removed_sublayers`` updated (with the pruned heads and neurons).

    Raises:
        ValueError: a layer out of range or a name other than ``"attention"``/``"ffn"``.
        prune_attattr.families.ModelError: a family whose table entry does not say where its sublayers are.
    """
    fam = prepare(model)
    if not fam.sublayers:
        raise ModelError(f"the {fam.name} family entry does not say where its sublayers are; whole sublayers cannot be removed")
    layers = encoder_layers(model)
    for key, names in sublayers.items():
        layer = int(key)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
        bad = [n for n in names if n not in SUBLAYERS]
        if bad:
            raise ValueError(f"sublayer name(s) {bad} of layer {layer}: use {' or '.join(repr(s) for s in SUBLAYERS)}")
        for which in SUBLAYERS:
            if which not in names or _is_removed(encoder_layers(model)[layer], fam.sublayers[which]):
                continue
            if which == "attention":
                prune_heads(model, {layer: list(range(model.config.num_attention_heads))})
            else:
                prune_neurons(model, {layer: list(range(intermediate_size(model)))})
            _bypass(encoder_layers(model)[layer], fam, which)
    prepare(model)  # hooks onto the new modules
    setattr(model.config, REMOVED_SUBLAYERS_KEY, {str(k): v for k, v in removed_sublayers(model).items()})
    return model
