"""Load a classifier, pruned or not: the one loader the stages and users call.

It sits above :mod:`prune_attattr.models` (unpruned loading, running layer by layer) and
:mod:`prune_attattr.prune.checkpoint` (pruned checkpoints), so neither imports the other's loader and no
import circle forms (ARCHITECTURE.md: checkpoint I/O above models and pruning).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .prune.checkpoint import load_pruned
from .families import PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY
from .models import load_unpruned

__all__ = ["load_classifier"]


def load_classifier(
    path: str | Path,
    *,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    require_trained_head: bool = False,
) -> nn.Module:
    """Load a sequence classifier from a local directory, in eval mode, float32, with our attention function.

    A directory written by :func:`prune_attattr.prune.checkpoint.save_pruned` (its config records pruned heads
    or neurons) is rebuilt with those units removed before its weights are loaded
    (:func:`~prune_attattr.prune.checkpoint.load_pruned`); any other goes to :func:`prune_attattr.models.load_unpruned`.

    Args:
        path: local model directory (see :func:`prune_attattr.models.resolve_model_path` for hub ids).
        num_labels, id2label: classifier size / labels when the checkpoint has no trained classifier
            (``id2label`` replaces the checkpoint's labels: use it only before fine-tuning; not for a
            pruned checkpoint, whose classifier is kept).
        require_trained_head: refuse a checkpoint whose classification head is newly initialised.

    Raises:
        ModelError: unsupported ``model_type``, an untrained head with ``require_trained_head``.
        FileNotFoundError, RuntimeError: a pruned checkpoint whose files do not match its config.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(path), local_files_only=True)
    if getattr(config, PRUNED_HEADS_KEY, None) or getattr(config, PRUNED_NEURONS_KEY, None):
        return load_pruned(path)
    return load_unpruned(path, num_labels=num_labels, id2label=id2label, require_trained_head=require_trained_head)
