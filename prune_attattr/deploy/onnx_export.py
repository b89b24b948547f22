"""ONNX export of a (pruned) classifier, checked against PyTorch, and its latency.

:func:`export_onnx_folder` writes a self-contained folder: ``model.onnx`` with ``config.json`` and the
tokenizer files beside it (the layout ONNX Runtime users and optimum's
``ORTModelForSequenceClassification`` expect). The graph's inputs are the model's tokenizer inputs
(``input_ids``, ``attention_mask`` and, for families with segment ids, ``token_type_ids``; int64
``[batch, sequence]``), its output ``logits [batch, labels]``. Checkpoint I/O is in
:mod:`prune_attattr.prune.checkpoint`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import forward_logits, input_names

__all__ = ["export_onnx", "export_onnx_folder", "check_onnx", "onnx_latency", "onnx_input_names"]


def onnx_input_names(model: nn.Module, example: dict | None = None) -> tuple[str, ...]:
    """The graph inputs for ``model``: its family's tokenizer inputs, in order; with ``example``, only the
    optional ones it carries (a BERT tokenizer without segment ids gives a graph without ``token_type_ids``)."""
    names = input_names(model)
    if example is None:
        return names
    return tuple(k for k in names if k in ("input_ids", "attention_mask") or k in example)


class _OnnxWrapper(nn.Module):
    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(**inputs).logits


def export_onnx(model: nn.Module, path: str | Path, example: dict[str, torch.Tensor], opset: int = 18) -> Path:
    """Export logits ``[batch, labels]`` to ONNX with dynamic batch and sequence axes.

    Args:
        model: classifier (pruned or not).
        path: output ``.onnx`` file.
        example: a batch with the model's inputs (:func:`onnx_input_names`, ``[B, T]`` int64),
            with at least 2 rows and some padding so that no shape specialises; other keys are ignored.
        opset: ONNX opset version.

    Raises:
        RuntimeError: the exporter failed (message from torch.onnx).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = onnx_input_names(model, example)
    missing = [k for k in names if k not in example]
    if missing:
        raise ValueError(f"the ONNX example batch lacks {missing}; the model takes {list(names)}")
    wrapper = _OnnxWrapper(model.cpu().eval(), names)
    args = tuple(example[k].cpu().long() for k in names)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=model.config.max_position_embeddings)
    shapes = {k: {0: batch, 1: seq} for k in names}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=list(names),
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    os.chmod(path, 0o644)
    return path


def export_onnx_folder(
    model: nn.Module, directory: str | Path, example: dict[str, torch.Tensor], tokenizer=None, opset: int = 18
) -> Path:
    """A self-contained ONNX folder: ``model.onnx``, ``config.json`` (stock, no pruning keys needed) and the tokenizer.

    Returns:
        The path of ``model.onnx``. Files are world-readable.

    Raises:
        RuntimeError: the exporter failed.
    """
    import copy

    from ..families import PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = export_onnx(model, directory / "model.onnx", example, opset=opset)
    config = copy.deepcopy(model.config)
    for key in (PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    os.chmod(directory, 0o755)
    for f in directory.iterdir():
        os.chmod(f, 0o644)
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
        feeds = {i.name: b[i.name].cpu().numpy().astype(np.int64) for i in sess.get_inputs()}
        (got,) = sess.run(["logits"], feeds)
        with torch.no_grad():
            want = forward_logits(model, {k: b[k].cpu() for k in feeds}).numpy()
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
