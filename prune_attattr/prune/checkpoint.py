"""Checkpoint I/O for pruned classifiers: a folder that stock transformers and :func:`load_pruned` both load.

``save_pruned`` writes ``model.safetensors``, ``config.json`` (the pruned heads under
``prune_attattr_pruned_heads``, {layer: [heads]} with original head indices, the pruned feed-forward
neurons under ``prune_attattr_pruned_neurons``, {layer: [neurons]} likewise, and an ``auto_map``
entry), the tokenizer, and ``modeling_pruned.py``: a self-contained modeling file (torch and
transformers only) that rebuilds the pruned architecture. So, without prune-attattr installed::

    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

and with it::

    from prune_attattr import load_pruned
    model = load_pruned(folder)

Every file is written world-readable (0644, folder 0755). ONNX export lives in :mod:`prune_attattr.deploy.onnx_export`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from ..families import PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY, family_of, layers_path

__all__ = ["save_pruned", "load_pruned", "MODELING_FILE", "AUTO_CLASS"]

MODELING_FILE = "modeling_pruned.py"
AUTO_CLASS = "PrunedForSequenceClassification"
_TEMPLATE = Path(__file__).parent / "templates" / "modeling_pruned.py"


def _structure(model: nn.Module) -> dict:
    fam = family_of(model)
    return {
        "layers": layers_path(fam, model),
        "attention": fam.attention,
        "output": fam.output,
        "qkv": [fam.query, fam.key, fam.value, *fam.extra_proj] if fam.fused_qkv is None else [],
        "fused_qkv": fam.fused_qkv,
        "ffn_in": fam.ffn_in,
        "ffn_out": fam.ffn_out,
        "glu": fam.glu,
        "intermediate_key": fam.intermediate_key,
    }


def modeling_source(model: nn.Module) -> str:
    """The text of ``modeling_pruned.py`` for ``model``'s class and family."""
    base = type(model).__name__
    import transformers

    if getattr(transformers, base, None) is not type(model):
        bases = [c.__name__ for c in type(model).__mro__ if getattr(transformers, c.__name__, None) is c]
        if not bases:
            raise TypeError(f"{base} is not a transformers class; cannot write a stock-loadable checkpoint")
        base = bases[0]
    return _TEMPLATE.read_text().replace("__BASE__", base).replace("__STRUCTURE__", repr(_structure(model)))


def _readable(directory: Path) -> None:
    os.chmod(directory, 0o755)
    for f in directory.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


def save_pruned(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write a pruned (or unpruned) classifier so that stock transformers and :func:`load_pruned` load it.

    Args:
        model: a classifier of a supported family, possibly pruned by :func:`prune_attattr.prune_heads`
            and :func:`prune_attattr.prune.neurons.prune_neurons`.
        directory: output folder (created).
        tokenizer: saved beside the weights when given.

    Returns:
        ``directory``. ``model`` and its config are not changed.

    Raises:
        prune_attattr.families.ModelError: unsupported family.
    """
    from safetensors.torch import save_file

    from .neurons import pruned_neurons_of
    from .heads import pruned_heads_of

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = modeling_source(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    setattr(config, PRUNED_HEADS_KEY, {str(k): v for k, v in pruned_heads_of(model).items()})
    setattr(config, PRUNED_NEURONS_KEY, {str(k): v for k, v in pruned_neurons_of(model).items()})
    config.auto_map = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{AUTO_CLASS}"}
    config.architectures = [AUTO_CLASS]
    config.save_pretrained(directory)
    (directory / MODELING_FILE).write_text(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    _readable(directory)
    return directory


def load_pruned(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned`: architecture re-pruned (heads and feed-forward
    neurons), weights loaded strictly.

    Returns:
        The classifier in eval mode, float32, using the ``prune_attattr`` attention implementation.

    Raises:
        FileNotFoundError: no ``config.json`` / ``model.safetensors`` in ``directory``.
        RuntimeError: the weights do not match the recorded pruned architecture.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..attention import register_attention
    from ..models import prepare
    from .neurons import prune_units

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} has no config.json and model.safetensors written by save_pruned")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    heads = getattr(config, PRUNED_HEADS_KEY, None) or {}
    neurons = getattr(config, PRUNED_NEURONS_KEY, None) or {}
    config._attn_implementation = register_attention()
    if hasattr(config, "auto_map"):
        del config.auto_map  # the stock class; prune_units below does what modeling_pruned.py does
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation)
    prepare(model)
    prune_units(model, heads={int(k): v for k, v in heads.items()}, neurons={int(k): v for k, v in neurons.items()})
    state = load_file(str(weights))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise RuntimeError(f"{weights}: weights do not match the pruned architecture in config.json ({str(exc).splitlines()[-1].strip()})") from None
    # buffers that save_pretrained also omits (position ids) may be missing; parameters may not
    params = {n for n, _ in model.named_parameters()}
    bad_missing = [k for k in missing if k in params]
    if bad_missing or unexpected:
        raise RuntimeError(f"{weights}: weights do not match the pruned architecture (missing {bad_missing[:3]}, unexpected {unexpected[:3]})")
    return model.float().eval()
