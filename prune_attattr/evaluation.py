"""Evaluation with Accelerate and `evaluate`: predictions gathered across processes, GLUE metrics, and the
loyalty of a compressed model to the unpruned one (Xu et al. 2021, :func:`loyalty`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch
from torch import nn

from .attention import AttentionControl
from .models import forward_logits
from .precision import autocast, resolve_precision
from .progress import progress

__all__ = ["load_metric", "predict", "compute_metrics", "loyalty", "Evaluation", "evaluate_outputs", "evaluate_model"]


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


def loyalty(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float] | None:
    """Label and probability loyalty of ``logits`` to ``reference`` (Xu et al. 2021, "Beyond Preserved
    Accuracy", arXiv 2109.03228, section 2): how closely a compressed model mimics the original one.

    - ``label``: the share of examples whose predicted class (argmax) equals the reference's.
    - ``probability``: ``1 - mean_i JS_2(softmax(reference_i), softmax(logits_i))``, with ``JS_2`` the
      Jensen-Shannon *distance* (the square root of the divergence) in base 2, so each term lies in [0, 1].
      The distance is taken per example and averaged over the examples, as the authors' code does
      (their repository recommends ``scipy.spatial.distance.jensenshannon`` on one pair of softmax
      outputs); ``jensenshannon(p, q, base=2)`` gives the same per-example figure. Computed in float64.

    Args:
        logits: ``[N, C]`` of the compressed model; reference: ``[N, C]`` of the unpruned model, same order.

    Returns:
        ``{"label": fraction, "probability": fraction}``, or None for a regression head (``C == 1``):
        loyalty is defined on class distributions.

    Raises:
        ValueError: shapes that differ, or no examples.
    """
    if logits.shape != reference.shape or logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"loyalty needs two [N, C] logit tensors of one shape with N > 0, got {tuple(logits.shape)} and {tuple(reference.shape)}")
    if logits.shape[1] == 1:
        return None
    p = torch.softmax(reference.double(), -1)
    q = torch.softmax(logits.double(), -1)
    m = (p + q) / 2
    kl_pm = torch.special.xlogy(p, p / m).sum(-1)  # 0 * log(0 / m) = 0
    kl_qm = torch.special.xlogy(q, q / m).sum(-1)
    divergence = ((kl_pm + kl_qm) / 2 / math.log(2)).clamp(min=0.0)  # bits; rounding can go a hair below 0
    label = (logits.argmax(-1) == reference.argmax(-1)).double().mean()
    return {"label": float(label), "probability": float(1 - divergence.sqrt().mean())}


@dataclass
class Evaluation:
    """One evaluation pass: ``metrics`` (fractions, plus ``loss``: mean cross-entropy), the gathered
    ``logits [N, C]`` (CPU, float32, dataloader order) and ``loyalty`` to a reference (:func:`loyalty`;
    None without a reference or for a regression head)."""

    metrics: dict[str, float]
    logits: torch.Tensor
    loyalty: dict[str, float] | None = None


def evaluate_outputs(
    model: nn.Module, dataloader, accelerator, metrics: Sequence[str], *, reference: torch.Tensor | None = None, **kwargs
) -> Evaluation:
    """Metrics of ``model`` on ``dataloader``, its logits, and (``reference``: the unpruned model's
    ``logits [N, C]`` on the same dataloader, in its order) its loyalty, all from one pass
    (:func:`predict`: gathered across processes, so every process gets the same figures).

    Raises:
        ValueError: a ``reference`` whose shape differs from the logits (another dataloader).
    """
    logits, labels, loss = predict(model, dataloader, accelerator, **kwargs)
    out = compute_metrics(metrics, logits.argmax(-1), labels)
    out["loss"] = float(loss.mean())
    return Evaluation(out, logits, loyalty(logits, reference.to(logits.device)) if reference is not None else None)


def evaluate_model(model: nn.Module, dataloader, accelerator, metrics: Sequence[str], **kwargs) -> dict[str, float]:
    """Metrics of ``model`` on ``dataloader`` (e.g. ``{"accuracy": 0.87}``) plus ``loss`` (mean cross-entropy)."""
    return evaluate_outputs(model, dataloader, accelerator, metrics, **kwargs).metrics
