"""Names shared by the recipe validator and the code that implements them, without importing torch.

``config.py`` validates recipes against these names; ``importance/`` implements one function per name.
"""

from __future__ import annotations

__all__ = ["METHODS", "DEFAULT_METHODS", "NEURON_METHODS", "SUBLAYER_METHODS", "UNITS"]

#: Importance methods, in the order reports list them (see :mod:`prune_attattr.importance`).
METHODS: tuple[str, ...] = ("attattr", "taylor", "fisher", "accuracy_difference", "attention", "random")

#: ``importance.methods`` when a recipe names none (the paper's comparison).
DEFAULT_METHODS: tuple[str, ...] = ("attattr", "taylor", "accuracy_difference", "attention", "random")

#: Methods that also score feed-forward neurons; the others are head-only (their curves prune heads only).
NEURON_METHODS: tuple[str, ...] = ("attattr", "taylor", "fisher", "random")

#: Methods that also score whole sublayers (``pruning.sublayers``; :mod:`prune_attattr.importance.sublayers`).
SUBLAYER_METHODS: tuple[str, ...] = ("attattr", "taylor", "fisher", "random")

#: What ``pruning.units`` may prune.
UNITS: tuple[str, ...] = ("heads", "neurons", "both")
