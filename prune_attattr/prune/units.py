"""Every structural removal at once: heads, feed-forward neurons and whole sublayers.

The one call the curve steps, recovery's start models, the export copy and :func:`~prune_attattr.prune.checkpoint.load_pruned`
make to give a model a pruned shape. It sits above :mod:`.heads`, :mod:`.neurons` and :mod:`.sublayers`
(which imports the other two), so none of them imports it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .heads import prune_heads
from .neurons import prune_neurons
from .sublayers import remove_sublayers

__all__ = ["prune_units"]


def prune_units(
    model: nn.Module,
    heads: Mapping[int | str, Sequence[int]] | None = None,
    neurons: Mapping[int | str, Sequence[int]] | None = None,
    sublayers: Mapping[int | str, Sequence[str]] | None = None,
) -> nn.Module:
    """Remove attention heads (:func:`~prune_attattr.prune.heads.prune_heads`), feed-forward neurons
    (:func:`~prune_attattr.prune.neurons.prune_neurons`) and then whole sublayers
    (:func:`~prune_attattr.prune.sublayers.remove_sublayers`) from ``model``, in place.

    Args:
        heads, neurons: original indices, ``{layer: [units]}`` (layer keys int or str, as JSON gives them).
        sublayers: ``{layer: ["attention" and/or "ffn"]}``; their remaining units go with them.

    Returns:
        The same model. Raises what the three functions raise.
    """
    if heads:
        prune_heads(model, heads)
    if neurons:
        prune_neurons(model, neurons)
    if sublayers:
        remove_sublayers(model, sublayers)
    return model
