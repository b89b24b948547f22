"""Names shared by the recipe validator and the code that implements them, without importing torch.

``config.py`` validates recipes against these names; ``importance/`` implements one function per name.
"""

from __future__ import annotations

__all__ = ["METHODS"]

#: Head importance methods, in the order reports list them (see :mod:`prune_attattr.importance`).
METHODS: tuple[str, ...] = ("attattr", "taylor", "accuracy_difference", "attention", "random")
