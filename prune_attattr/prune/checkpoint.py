"""Checkpoint I/O for pruned classifiers: a folder that stock transformers and :func:`load_pruned` both load.

``save_pruned`` writes ``model.safetensors``, ``config.json`` (the pruned heads under
``prune_attattr_pruned_heads``, {layer: [heads]} with original head indices, the pruned feed-forward
neurons under ``prune_attattr_pruned_neurons``, {layer: [neurons]} likewise, the removed whole sublayers
under ``prune_attattr_removed_sublayers``, {layer: ["attention", "ffn"]}, an ``auto_map`` entry, a
``custom_pipelines`` entry and the task's class names in ``id2label``), the tokenizer, and
``modeling_pruned.py``: a self-contained modeling file (torch and transformers only) that rebuilds the
pruned architecture and holds the text-classification pipeline class transformers builds for it. So,
without prune-attattr installed::

    from transformers import AutoModelForSequenceClassification, pipeline
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    classify = pipeline("text-classification", model=folder, trust_remote_code=True)  # labels by name

and with it::

    from prune_attattr import load_pruned
    model = load_pruned(folder)

Every file is written world-readable (0644, folder 0755). ONNX export lives in :mod:`prune_attattr.deploy.onnx_export`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..families import PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY, REMOVED_SUBLAYERS_KEY, family_of, layers_path

__all__ = ["save_pruned", "load_pruned", "set_label_names", "MODELING_FILE", "AUTO_CLASS", "PIPELINE_CLASS"]

MODELING_FILE = "modeling_pruned.py"
AUTO_CLASS = "PrunedForSequenceClassification"
PIPELINE_CLASS = "PrunedTextClassificationPipeline"  # in MODELING_FILE; config.json's custom_pipelines names it
_TEMPLATE = Path(__file__).parent / "templates" / "modeling_pruned.py"


def _structure(model: nn.Module) -> dict:
    from .sublayers import bypass_children

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
        "sublayers": {
            which: {"bypass": sub.bypass, "kind": sub.kind, "norm": sub.norm, "pair": sub.pair, "keep": bypass_children(fam, which)}
            for which, sub in fam.sublayers.items()
        },
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


def set_label_names(config, names: Sequence[str] | None):
    """Set ``config.id2label`` / ``label2id`` to ``names`` (class id = position), in place; returns ``config``.

    What ``pipeline("text-classification")``, optimum and the Hub show as the labels. ``None`` leaves
    the config as it is.

    Raises:
        ValueError: ``names`` not one per class of the config (``num_labels``), or repeated.
    """
    if names is None:
        return config
    names = [str(n) for n in names]
    if len(names) != config.num_labels or len(set(names)) != len(names):
        raise ValueError(f"label names {names} are not {config.num_labels} distinct names, one per class of the model")
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    return config


def save_pruned(model: nn.Module, directory: str | Path, tokenizer=None, *, label_names: Sequence[str] | None = None) -> Path:
    """Write a pruned (or unpruned) classifier so that stock transformers and :func:`load_pruned` load it.

    Args:
        model: a classifier of a supported family, possibly pruned by :func:`prune_attattr.prune_heads`
            and :func:`prune_attattr.prune.neurons.prune_neurons`.
        directory: output folder (created).
        tokenizer: saved beside the weights when given.
        label_names: the classes' names, class id = position (e.g. ``["negative", "positive"]``), written
            as the saved config's ``id2label``/``label2id``; None keeps the model's.

    Returns:
        ``directory``. ``model`` and its config are not changed.

    Raises:
        prune_attattr.families.ModelError: unsupported family.
        ValueError: ``label_names`` not one distinct name per class.
    """
    from safetensors.torch import save_file

    from .heads import pruned_heads_of
    from .neurons import pruned_neurons_of
    from .sublayers import removed_sublayers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = modeling_source(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    setattr(config, PRUNED_HEADS_KEY, {str(k): v for k, v in pruned_heads_of(model).items()})
    setattr(config, PRUNED_NEURONS_KEY, {str(k): v for k, v in pruned_neurons_of(model).items()})
    setattr(config, REMOVED_SUBLAYERS_KEY, {str(k): v for k, v in removed_sublayers(model).items()})
    set_label_names(config, label_names)
    config.auto_map = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{AUTO_CLASS}"}
    config.architectures = [AUTO_CLASS]
    # transformers' custom-pipeline entry (what Pipeline.save_pretrained writes for a registered pipeline): the
    # stock text-classification pipeline, without the "not supported" message for the custom class
    config.custom_pipelines = {
        "text-classification": {"impl": f"{MODELING_FILE[:-3]}.{PIPELINE_CLASS}", "pt": ["AutoModelForSequenceClassification"], "tf": [], "type": "text"}
    }
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
    from .units import prune_units

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} has no config.json and model.safetensors written by save_pruned")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    heads = getattr(config, PRUNED_HEADS_KEY, None) or {}
    neurons = getattr(config, PRUNED_NEURONS_KEY, None) or {}
    sublayers = getattr(config, REMOVED_SUBLAYERS_KEY, None) or {}
    config._attn_implementation = register_attention()
    for key in ("auto_map", "custom_pipelines"):  # the stock class; prune_units below does what modeling_pruned.py does
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation)
    prepare(model)
    prune_units(model, heads=heads, neurons=neurons, sublayers=sublayers)
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
