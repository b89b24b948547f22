"""Universality of important heads (Hao et al. 2021, section 4.2).

AttAttr head importance (``[layers, heads]``) of one model on several example sets of the same
task, or of another task for contrast, and the Pearson correlation of every pair of maps. The
paper's claim: maps from datasets of the same task correlate strongly.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..importance import attattr_importance
from ..tasks import Encoded, make_dataloader

__all__ = ["pearson", "importance_maps"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two importance maps (flattened)."""
    x, y = a.flatten().double().numpy(), b.flatten().double().numpy()
    return float(np.corrcoef(x, y)[0, 1])


def importance_maps(model, sets: dict[str, tuple[Encoded, str]], accelerator, *, pad_id: int, steps: int, quadrature: str, mode: str, batch_size: int = 16) -> dict:
    """AttAttr importance per named set and the pairwise Pearson correlations.

    Args:
        sets: name -> (encoded examples, target ``"gold"`` or ``"predicted"``).

    Returns:
        ``{"maps": {name: [[...]]}, "examples": {name: n}, "pearson": [{"a", "b", "r"}]}``.
    """
    maps = {}
    for name, (data, target) in sets.items():
        loader = accelerator.prepare(make_dataloader(data, batch_size=batch_size, pad_id=pad_id))
        maps[name] = attattr_importance(model, loader, accelerator, steps=steps, quadrature=quadrature, mode=mode, target=target, description=f"importance on {name}")
    pairs = [{"a": a, "b": b, "r": pearson(maps[a], maps[b])} for a, b in itertools.combinations(maps, 2)]
    return {"maps": {k: v.tolist() for k, v in maps.items()}, "examples": {k: len(v[0]) for k, v in sets.items()}, "pearson": pairs}
