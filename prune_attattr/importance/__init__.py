"""Head importance: AttAttr (Hao et al. 2021) and the baselines of Michel et al. 2019.

Every method maps ``(model, prepared dataloader, accelerator)`` to a float32 tensor
``[num_layers, num_attention_heads]`` indexed by *original* head numbers (higher = more important;
heads already pruned score 0 and are never chosen again). Per-example scores are gathered across
processes with ``gather_for_metrics`` and summed, so N processes give the scores of one.

Every method cuts its batches the same way (:mod:`prune_attattr.importance.batching`): rows grouped
by length and run without padding columns, at most ``max_tokens_per_forward`` tokens per forward
(copies of a row included), so neither speed nor peak memory depends on the caller's batch order
or size. ``mixed_precision`` (default: the accelerator's, i.e. ``runtime.mixed_precision``) runs
the forwards under autocast on the accelerator's device type; scores are summed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attention import AttentionControl
from ..evaluation import compute_metrics
from ..models import (
    classify,
    embed,
    encoder_layers,
    forward_logits,
    frozen,
    kept_heads,
    logits_from_layer,
    repeat_batch,
    run_layers,
)
from ..precision import autocast, resolve_precision
from ..registry import METHODS
from .attattr import (
    attention_attribution,
    attribution_head_scores,
    iter_group_attributions,
    iter_layer_attributions,
    quadrature_nodes,
)
from .batching import (
    DEFAULT_MAX_TOKENS,
    compact,
    length_groups,
    over_batches,
    row_spans,
    split_evenly,
    token_budget,
)

__all__ = [
    "METHODS",
    "DEFAULT_MAX_TOKENS",
    "attention_attribution",
    "iter_layer_attributions",
    "quadrature_nodes",
    "attattr_importance",
    "taylor_importance",
    "accuracy_difference_importance",
    "attention_importance",
    "random_importance",
]


def _head_table(model: nn.Module, bsz: int, device) -> torch.Tensor:
    """Zeros ``[B, layers, heads]`` float32: per-example scores at original head indices."""
    return torch.zeros(bsz, len(encoder_layers(model)), model.config.num_attention_heads, device=device)


def _put(table: torch.Tensor, index: list[int], layer: int, heads: list[int], scores: torch.Tensor) -> None:
    """Write group scores ``[len(index), len(heads)]`` into ``table [B, layers, heads]`` at the caller's rows."""
    rows = torch.tensor(index, device=table.device)
    cols = torch.tensor(heads, device=table.device)
    table[rows[:, None], layer, cols[None, :]] = scores.float().to(table.device)


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _sub_batches(model: nn.Module, batch: dict, max_tokens: int):
    """``(caller rows, compacted sub-batch)`` per length group of ``batch`` (at most ``max_tokens`` tokens each)."""
    rows = row_spans(batch["attention_mask"])
    pad = _pad_id(model)
    for index in length_groups(rows.length, max_tokens):
        yield index, compact(batch, rows, index, pad)


def attattr_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    steps: int = 20,
    target: str = "gold",
    mode: str = "fast",
    quadrature: str = "left",
    chunk_size: int | None = None,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "AttAttr importance",
) -> torch.Tensor:
    """Head importance by self-attention attribution (Hao et al. 2021, section 4.1).

    For each example and head: the max of the head's attribution matrix (Eq. 3) over valid token
    pairs; summed over examples. Unit: target-class probability. Returns ``[layers, heads]``.
    ``chunk_size`` (deprecated) additionally caps rows per forward; see the module docstring for
    ``max_tokens_per_forward`` and ``mixed_precision``.

    Sample YAML::

        importance:
          methods: [attattr]
          max_tokens_per_forward: 16384
          attattr: {steps: 20, target: gold, mode: fast, quadrature: left}
    """
    precision = resolve_precision(mixed_precision, accelerator)
    heads = kept_heads(model)

    def work(batch):
        table = _head_table(model, batch["input_ids"].shape[0], batch["input_ids"].device)
        for layer, groups in iter_group_attributions(
            model, batch, steps=steps, target=target, mode=mode, quadrature=quadrature,
            max_tokens_per_forward=max_tokens_per_forward, chunk_size=chunk_size, mixed_precision=precision,
        ):
            for g in groups:
                _put(table, g.index, layer, heads[layer], attribution_head_scores(g.attr, g.attention_mask))
        return table

    (per_example,) = over_batches(dataloader, accelerator, description, work)
    return per_example.sum(0)


def taylor_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    normalize: bool = True,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "Taylor importance",
) -> torch.Tensor:
    """Head importance by first-order Taylor expansion (Michel et al. 2019, Eq. 4).

    ``I_h = |Σ_tokens A_h ⊙ ∂L/∂A_h|`` per example with the cross-entropy loss ``L`` (computed as the
    gradient of a per-example head mask xi_h = 1), summed over examples, then divided per layer by
    the layer's L2 norm (Michel et al., section 4.2). Returns ``[layers, heads]``.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    heads = kept_heads(model)

    def work(batch):
        device = batch["input_ids"].device
        table = _head_table(model, batch["input_ids"].shape[0], device)
        for index, sub in _sub_batches(model, batch, max_tokens):
            r = len(index)
            masks = {layer: torch.ones(r, len(h), device=device, requires_grad=True) for layer, h in enumerate(heads) if h}
            with torch.enable_grad():
                with autocast(device, precision):
                    logits = forward_logits(model, sub, AttentionControl(head_mask=masks))
                loss = nn.functional.cross_entropy(logits.float(), sub["labels"], reduction="sum")
                grads = torch.autograd.grad(loss, list(masks.values()))
            for layer, g in zip(masks, grads):
                _put(table, index, layer, heads[layer], g.abs())
        return table

    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            (per_example,) = over_batches(dataloader, accelerator, description, work)
    finally:
        model.train(was_training)
    total = per_example.sum(0)
    if normalize:
        total = total / (total.norm(p=2, dim=-1, keepdim=True) + 1e-20)
    return total


@torch.no_grad()
def accuracy_difference_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    metrics: Sequence[str] = ("accuracy",),
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "accuracy difference",
) -> torch.Tensor:
    """Head importance as the metric drop when that head alone is masked (Michel et al. 2019, section 3.1).

    ``I_h = metric(all heads) - metric(head h masked)`` on the importance examples, in metric units
    (fractions). Equal drops are ordered by the mean cross-entropy increase, added with weight 1e-6
    (below one example's share of the metric for up to 10^5 examples). Returns ``[layers, heads]``.

    Masking a head of layer l changes nothing below l, so each length group runs the lower layers
    once and the heads of a layer together (one copy of the group per head, as many copies per
    forward as ``max_tokens_per_forward`` allows), the last layer for [CLS] only.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    primary = metrics[0]
    heads = kept_heads(model)
    n_layers, n_heads = len(heads), model.config.num_attention_heads

    def work(batch):
        bsz = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        base = torch.zeros(bsz, model.config.num_labels, device=device)
        out = torch.zeros(bsz, n_layers, n_heads, model.config.num_labels, device=device)
        for index, sub in _sub_batches(model, batch, max_tokens):
            r, width = sub["input_ids"].shape
            rows = torch.tensor(index, device=device)
            per = max(1, max_tokens // (r * width))  # head copies per forward
            with autocast(device, precision):
                hidden, mask = embed(model, sub)
                for layer, hs in enumerate(heads):
                    k = len(hs)
                    for start, stop in split_evenly(k, per) if k else ():
                        c = stop - start
                        hm = torch.ones(c, r, k, device=device)
                        hm[torch.arange(c), :, torch.arange(start, stop)] = 0  # copy i masks head start + i
                        control = AttentionControl(head_mask={layer: hm.view(c * r, k)})
                        logits = logits_from_layer(model, repeat_batch(hidden, c), repeat_batch(mask, c), layer, control)
                        cols = torch.tensor(hs[start:stop], device=device)
                        out[rows[:, None], layer, cols[None, :]] = logits.float().view(c, r, -1).transpose(0, 1)
                    hidden = run_layers(model, hidden, mask, layer, layer + 1)
                base[rows] = classify(model, hidden).float()
        return base, out, batch["labels"]

    was_training = model.training
    model.eval()
    try:
        base, masked, labels = over_batches(dataloader, accelerator, description, work)
    finally:
        model.train(was_training)
    base_metric = compute_metrics([primary], base.argmax(-1), labels)[primary]
    base_loss = float(nn.functional.cross_entropy(base, labels))
    scores = torch.zeros(n_layers, n_heads)
    for layer, hs in enumerate(heads):
        for h in hs:
            lg = masked[:, layer, h]
            drop = base_metric - compute_metrics([primary], lg.argmax(-1), labels)[primary]
            loss_up = float(nn.functional.cross_entropy(lg, labels)) - base_loss
            scores[layer, h] = drop + 1e-6 * loss_up
    return scores


@torch.no_grad()
def attention_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "attention-score importance",
) -> torch.Tensor:
    """Reference curve: a head's max attention probability over valid token pairs, summed over examples.

    The paper's contrast between attention scores and attribution scores (Hao et al. 2021, section 4.1).
    Returns ``[layers, heads]``.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    heads = kept_heads(model)

    def work(batch):
        device = batch["input_ids"].device
        table = _head_table(model, batch["input_ids"].shape[0], device)
        for index, sub in _sub_batches(model, batch, max_tokens):
            control = AttentionControl(record=True)
            with autocast(device, precision):
                forward_logits(model, sub, control)
            for layer, probs in control.recorded.items():
                _put(table, index, layer, heads[layer], attribution_head_scores(probs, sub["attention_mask"]))
        return table

    was_training = model.training
    model.eval()
    try:
        (per_example,) = over_batches(dataloader, accelerator, description, work)
    finally:
        model.train(was_training)
    return per_example.sum(0)


def random_importance(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Reference curve: uniform random scores ``[layers, heads]`` from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(encoder_layers(model)), model.config.num_attention_heads, generator=gen)
    heads = kept_heads(model)
    for layer, hs in enumerate(heads):
        gone = [h for h in range(model.config.num_attention_heads) if h not in hs]
        scores[layer, gone] = 0
    return scores
