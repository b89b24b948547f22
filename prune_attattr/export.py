"""Exporting a pruned classifier: a reloadable safetensors checkpoint and an ONNX graph checked against PyTorch.

Reload a checkpoint with one call::

    from prune_attattr import load_pruned
    model = load_pruned("exported/<run>/model")

Its ``config.json`` records the pruned heads under ``prune_attattr_pruned_heads`` ({layer: [heads]},
original head indices); :func:`load_pruned` rebuilds the pruned architecture and loads the weights
strictly. Plain ``AutoModelForSequenceClassification.from_pretrained`` cannot load it (the weight
shapes differ from the config's), which is why this call exists.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import PRUNED_HEADS_KEY, forward_logits
from .pruning import prune_heads

__all__ = ["save_pruned", "load_pruned", "export_onnx", "check_onnx", "onnx_latency"]

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def save_pruned(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model.safetensors``, ``config.json`` (with the pruned heads) and the tokenizer to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if not getattr(config, PRUNED_HEADS_KEY, None):
        setattr(config, PRUNED_HEADS_KEY, {})
    config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_pruned(directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned`: architecture re-pruned, weights loaded strictly.

    Returns:
        The classifier in eval mode, using the ``prune_attattr`` attention implementation.

    Raises:
        FileNotFoundError: no ``config.json`` / ``model.safetensors`` in ``directory``.
        RuntimeError: the weights do not match the recorded pruned architecture.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .attention import register_attention

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} has no config.json and model.safetensors written by save_pruned")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    pruned = getattr(config, PRUNED_HEADS_KEY, None) or {}
    config._attn_implementation = register_attention()
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation)
    prune_heads(model, {int(k): v for k, v in pruned.items()})
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
    return model.eval()


class _OnnxWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def export_onnx(model: nn.Module, path: str | Path, example: dict[str, torch.Tensor], opset: int = 18) -> Path:
    """Export logits ``[batch, labels]`` to ONNX with dynamic batch and sequence axes.

    Args:
        model: classifier (pruned or not).
        path: output ``.onnx`` file.
        example: a batch with ``input_ids``, ``attention_mask``, ``token_type_ids`` (``[B, T]`` int64),
            with at least 2 rows and some padding so that no shape specialises.
        opset: ONNX opset version.

    Raises:
        RuntimeError: the exporter failed (message from torch.onnx).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _OnnxWrapper(model.cpu().eval())
    args = tuple(example[k].cpu() for k in ONNX_INPUTS)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=model.config.max_position_embeddings)
    shapes = {k: {0: batch, 1: seq} for k in ONNX_INPUTS}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=list(ONNX_INPUTS),
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    return path


def check_onnx(model: nn.Module, path: str | Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """Validate ``path`` with ``onnx.checker`` and compare onnxruntime's logits with PyTorch's.

    Returns:
        The max absolute logit difference over ``batches``.

    Raises:
        onnx.checker.ValidationError: the graph is invalid.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    model = model.cpu().eval()
    for b in batches:
        feeds = {k: b[k].cpu().numpy().astype(np.int64) for k in ONNX_INPUTS}
        (got,) = sess.run(["logits"], feeds)
        with torch.no_grad():
            want = forward_logits(model, {k: b[k].cpu() for k in ONNX_INPUTS}).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def onnx_latency(path: str | Path, feeds: dict[str, np.ndarray], repeats: int = 20, threads: int | None = None) -> dict[str, float]:
    """Median and p90 latency (milliseconds) of one onnxruntime call on ``feeds``, after 3 warm-up runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(["logits"], feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(["logits"], feeds)
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}
