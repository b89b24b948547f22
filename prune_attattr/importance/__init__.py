"""Head importance: AttAttr (Hao et al. 2021) and the baselines of Michel et al. 2019.

Every method maps ``(model, prepared dataloader, accelerator)`` to a float32 tensor
``[num_layers, num_attention_heads]`` indexed by *original* head numbers (higher = more important;
heads already pruned score 0 and are never chosen again). Per-example scores are gathered across
processes with ``gather_for_metrics`` and summed, so N processes give the scores of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attention import AttentionControl
from ..evaluation import compute_metrics
from ..models import encoder_layers, forward_logits, frozen, kept_heads
from ..progress import progress
from .attattr import attention_attribution, attribution_head_scores, iter_layer_attributions, quadrature_nodes

from ..registry import METHODS

__all__ = [
    "METHODS",
    "attention_attribution",
    "quadrature_nodes",
    "attattr_importance",
    "taylor_importance",
    "accuracy_difference_importance",
    "attention_importance",
    "random_importance",
]


def _scatter(model: nn.Module, per_layer: dict[int, torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
    """Place per-layer ``[*lead, kept]`` scores at their original head indices: ``[*lead, L, H]``."""
    heads = kept_heads(model)
    out = torch.zeros(*lead, len(heads), model.config.num_attention_heads)
    for layer, scores in per_layer.items():
        out[..., layer, heads[layer]] = scores.float().cpu()
    return out


def _sum_gathered(per_example: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(per_example).sum(0) if per_example else torch.zeros(0)


def attattr_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    steps: int = 20,
    target: str = "gold",
    mode: str = "fast",
    quadrature: str = "left",
    chunk_size: int = 256,
    description: str | None = "AttAttr importance",
) -> torch.Tensor:
    """Head importance by self-attention attribution (Hao et al. 2021, section 4.1).

    For each example and head: the max of the head's attribution matrix (Eq. 3) over valid token
    pairs; summed over examples. Unit: target-class probability. Returns ``[layers, heads]``.

    Sample YAML::

        importance:
          methods: [attattr]
          attattr: {steps: 20, target: gold, mode: fast, quadrature: left}
    """
    gathered = []
    it = progress(dataloader, description, accelerator) if description else dataloader
    for batch in it:
        per_layer = {}
        for layer, attr, _ in iter_layer_attributions(
            model, batch, steps=steps, target=target, mode=mode, quadrature=quadrature, chunk_size=chunk_size
        ):
            per_layer[layer] = attribution_head_scores(attr, batch["attention_mask"])
        scores = _scatter(model, per_layer, (batch["input_ids"].shape[0],)).to(batch["input_ids"].device)
        gathered.append(accelerator.gather_for_metrics(scores).cpu())
    return _sum_gathered(gathered)


def taylor_importance(
    model: nn.Module, dataloader, accelerator, *, normalize: bool = True, description: str | None = "Taylor importance"
) -> torch.Tensor:
    """Head importance by first-order Taylor expansion (Michel et al. 2019, Eq. 4).

    ``I_h = |Σ_tokens A_h ⊙ ∂L/∂A_h|`` per example with the cross-entropy loss ``L`` (computed as the
    gradient of a per-example head mask xi_h = 1), summed over examples, then divided per layer by
    the layer's L2 norm (Michel et al., section 4.2). Returns ``[layers, heads]``.
    """
    gathered = []
    was_training = model.training
    model.eval()
    it = progress(dataloader, description, accelerator) if description else dataloader
    with frozen(model):
        for batch in it:
            bsz = batch["input_ids"].shape[0]
            masks = {
                layer: torch.ones(bsz, len(h), device=batch["input_ids"].device, requires_grad=True)
                for layer, h in enumerate(kept_heads(model))
                if h
            }
            with torch.enable_grad():
                logits = forward_logits(model, batch, AttentionControl(head_mask=masks))
                loss = nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                grads = torch.autograd.grad(loss, list(masks.values()))
            per_layer = {layer: g.abs() for layer, g in zip(masks, grads)}
            scores = _scatter(model, per_layer, (bsz,)).to(batch["input_ids"].device)
            gathered.append(accelerator.gather_for_metrics(scores).cpu())
    model.train(was_training)
    total = _sum_gathered(gathered)
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
    description: str | None = "accuracy difference",
) -> torch.Tensor:
    """Head importance as the metric drop when that head alone is masked (Michel et al. 2019, section 3.1).

    ``I_h = metric(all heads) - metric(head h masked)`` on the importance examples, in metric units
    (fractions). Equal drops are ordered by the mean cross-entropy increase, added with weight 1e-6
    (below one example's share of the metric for up to 10^5 examples). Returns ``[layers, heads]``.

    Masking a head of layer l changes nothing below l, so each batch runs the lower layers once and
    all heads of a layer in one forward (one copy of the batch per head), the last layer for [CLS] only.
    """
    from ..models import classify, embed, logits_from_layer, repeat_batch, run_layers

    primary = metrics[0]
    heads = kept_heads(model)
    n_layers, n_heads = len(heads), model.config.num_attention_heads
    was_training = model.training
    model.eval()
    base_logits, masked_logits, all_labels = [], [], []
    it = progress(dataloader, description, accelerator) if description else dataloader
    for batch in it:
        bsz = batch["input_ids"].shape[0]
        hidden, mask = embed(model, batch)
        out = torch.zeros(bsz, n_layers, n_heads, model.config.num_labels, device=hidden.device)
        for layer, hs in enumerate(heads):
            if hs:
                k = len(hs)
                hm = torch.ones(k, bsz, k, device=hidden.device)
                hm[torch.arange(k), :, torch.arange(k)] = 0  # copy i masks head i
                control = AttentionControl(head_mask={layer: hm.view(k * bsz, k)})
                logits = logits_from_layer(model, repeat_batch(hidden, k), repeat_batch(mask, k), layer, control)
                out[:, layer, hs] = logits.view(k, bsz, -1).transpose(0, 1).float()
            hidden = run_layers(model, hidden, mask, layer, layer + 1)
        base = classify(model, hidden).float()
        base, out, labels = accelerator.gather_for_metrics((base, out, batch["labels"]))
        base_logits.append(base.cpu())
        masked_logits.append(out.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    base, masked, labels = torch.cat(base_logits), torch.cat(masked_logits), torch.cat(all_labels)
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
    model: nn.Module, dataloader, accelerator, *, description: str | None = "attention-score importance"
) -> torch.Tensor:
    """Reference curve: a head's max attention probability over valid token pairs, summed over examples.

    The paper's contrast between attention scores and attribution scores (Hao et al. 2021, section 4.1).
    Returns ``[layers, heads]``.
    """
    gathered = []
    model.eval()
    it = progress(dataloader, description, accelerator) if description else dataloader
    for batch in it:
        control = AttentionControl(record=True)
        forward_logits(model, batch, control)
        per_layer = {
            layer: attribution_head_scores(probs.float(), batch["attention_mask"]) for layer, probs in control.recorded.items()
        }
        scores = _scatter(model, per_layer, (batch["input_ids"].shape[0],)).to(batch["input_ids"].device)
        gathered.append(accelerator.gather_for_metrics(scores).cpu())
    return _sum_gathered(gathered)


def random_importance(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Reference curve: uniform random scores ``[layers, heads]`` from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(encoder_layers(model)), model.config.num_attention_heads, generator=gen)
    heads = kept_heads(model)
    for layer, hs in enumerate(heads):
        gone = [h for h in range(model.config.num_attention_heads) if h not in hs]
        scores[layer, gone] = 0
    return scores

