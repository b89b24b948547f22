"""Evaluation with Accelerate and `evaluate`: predictions gathered across processes, GLUE metrics."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import torch
from torch import nn

from .attention import AttentionControl
from .models import forward_logits
from .precision import autocast, resolve_precision
from .progress import progress

__all__ = ["load_metric", "predict", "compute_metrics", "evaluate_model"]


@lru_cache(maxsize=None)
def load_metric(names: tuple[str, ...]):
    """An `evaluate` metric (combined when several) from the local modules in ``prune_attattr/metrics``.

    Raises:
        ValueError: a metric name with no local module.
    """
    import evaluate

    modules = []
    for name in names:
        path = resources.files("prune_attattr") / "metrics" / f"{name}.py"
        if not path.is_file():
            raise ValueError(f"unknown metric '{name}'; available: accuracy, f1")
        modules.append(evaluate.load(str(path)))
    return modules[0] if len(modules) == 1 else evaluate.combine(modules)


def compute_metrics(names: Sequence[str], predictions: torch.Tensor, references: torch.Tensor) -> dict[str, float]:
    """Metrics (fractions in [0, 1]) of ``predictions [N]`` against ``references [N]``."""
    metric = load_metric(tuple(names))
    return {k: float(v) for k, v in metric.compute(predictions=predictions.tolist(), references=references.tolist()).items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    control: AttentionControl | None = None,
    description: str | None = None,
    mixed_precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model`` over a prepared ``dataloader`` on every process and gather the results.

    ``mixed_precision`` (``"no"``, ``"bf16"``, ``"fp16"``; default: the accelerator's, i.e.
    ``runtime.mixed_precision``) runs the forward under autocast on the accelerator's device type;
    logits and losses are float32.

    Returns:
        ``(logits [N, labels] float32, labels [N], loss per example [N] float32)`` on CPU, in
        dataloader order, duplicates added by sharding removed (``gather_for_metrics``).

    Raises:
        ValueError: a precision the device cannot autocast to.
    """
    model.eval()
    precision = resolve_precision(mixed_precision, accelerator)
    all_logits, all_labels, all_loss = [], [], []
    it = progress(dataloader, description, accelerator) if description else dataloader
    for batch in it:
        with autocast(batch["input_ids"].device, precision):
            logits = forward_logits(model, batch, control)
        logits = logits.float()
        loss = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        logits, labels, loss = accelerator.gather_for_metrics((logits, batch["labels"], loss))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        all_loss.append(loss.cpu())
    return torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_loss)


def evaluate_model(model: nn.Module, dataloader, accelerator, metrics: Sequence[str], **kwargs) -> dict[str, float]:
    """Metrics of ``model`` on ``dataloader`` (e.g. ``{"accuracy": 0.87}``) plus ``loss`` (mean cross-entropy)."""
    logits, labels, loss = predict(model, dataloader, accelerator, **kwargs)
    out = compute_metrics(metrics, logits.argmax(-1), labels)
    out["loss"] = float(loss.mean())
    return out
