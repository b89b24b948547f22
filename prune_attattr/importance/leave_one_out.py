"""Leave-one-out: the exact effect of removing one unit, the ground truth importance criteria estimate.

For every head (and for the chosen feed-forward neurons) the unit alone is masked
(:class:`~prune_attattr.attention.AttentionControl` ``head_mask`` / ``neuron_mask`` set to 0 for that
unit, which is what structural pruning removes) and the model is evaluated on the examples. Reported,
per unit: the change of the mean cross-entropy loss against the gold label (masked minus unmasked;
positive = the unit helps) and the drop of the primary metric (unmasked minus masked). This is the
quantity Michel et al. 2019 (section 3.1) measure for heads; integrated gradients over one unit's gate
alone, from 0 to 1, equals it by completeness (Sundararajan et al. 2017), and circuit-finding work
uses it as the reference for attribution patching (EAP-IG, Hanna et al. 2024).

Masking a unit of layer ``l`` changes nothing below ``l``, so each length group runs the lower layers
once and the units of a layer together (one copy of the group per unit, as many copies per forward as
``max_tokens_per_forward`` allows), the last layer for [CLS] only, as
:func:`prune_attattr.importance.accuracy_difference_importance` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import AttentionControl
from ..evaluation import compute_metrics
from ..models import (
    classify,
    embed,
    encoder_layers,
    evaluating,
    kept_heads,
    kept_neurons,
    logits_from_layer,
    repeat_batch,
    run_layers,
)
from ..precision import autocast, resolve_precision
from .attattr import _pad_id
from .batching import over_batches, split_evenly, sub_batches, token_budget

__all__ = ["LeaveOneOut", "leave_one_out", "sample_neurons"]


@dataclass
class LeaveOneOut:
    """Exact effects of masking one unit at a time (see the module docstring).

    Attributes:
        base_loss: mean cross-entropy (nats) of the unmasked model on the examples.
        base_metric: its primary metric (fraction).
        head_loss: ``[layers, num_attention_heads]`` float32, loss change when the head alone is masked
            (nats; positive = worse without it); heads already pruned: NaN. None when heads were not asked.
        head_metric: same shape, metric drop (fraction; positive = worse without it); pruned: NaN.
        neurons: ``{layer: [original neuron ids]}`` measured.
        neuron_loss: ``{layer: float32 [len(neurons[layer])]}`` loss change per measured neuron.
        neuron_metric: ``{layer: float32 [len(neurons[layer])]}`` metric drop per measured neuron.
    """

    base_loss: float
    base_metric: float
    head_loss: torch.Tensor | None
    head_metric: torch.Tensor | None
    neurons: dict[int, list[int]]
    neuron_loss: dict[int, torch.Tensor]
    neuron_metric: dict[int, torch.Tensor]


def sample_neurons(model: nn.Module, per_layer: int, seed: int = 0) -> dict[int, list[int]]:
    """``per_layer`` present neurons of each layer drawn without replacement (seeded), sorted; all of a
    layer's present neurons when it has fewer. Original neuron ids.

    Raises:
        ValueError: ``per_layer < 1``.
    """
    if per_layer < 1:
        raise ValueError(f"per_layer must be >= 1, got {per_layer}")
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for layer, ids in enumerate(kept_neurons(model)):
        pick = torch.randperm(len(ids), generator=gen)[:per_layer].tolist()
        out[layer] = sorted(ids[i] for i in pick)
    return out


@torch.no_grad()
def leave_one_out(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    heads: bool = True,
    neurons: Mapping[int, Sequence[int]] | None = None,
    metrics: Sequence[str] = ("accuracy",),
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "leave-one-out",
) -> LeaveOneOut:
    """The exact loss change and metric drop of masking each head, and each listed neuron, alone.

    Args:
        model: sequence classifier of a supported family (possibly pruned); not changed.
        dataloader: prepared dataloader of batches with ``labels`` (gathered across processes).
        heads: measure every present head.
        neurons: ``{layer: original neuron ids}`` to measure (e.g. :func:`sample_neurons`); None: none.
        metrics: metric names; the first is reported.
        max_tokens_per_forward: at most this many tokens (copies included) per forward; default 16384.
        mixed_precision: ``"no"``, ``"bf16"``, ``"fp16"``; default the accelerator's.

    Returns:
        :class:`LeaveOneOut`.

    Raises:
        ValueError: a listed neuron that is not present (pruned, or out of range), a layer out of range,
            a batch without ``labels``, or bad token bound / precision.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    head_ids = kept_heads(model)
    neuron_ids = kept_neurons(model)
    n_layers = len(encoder_layers(model))
    chosen: dict[int, list[int]] = {}
    positions: dict[int, list[int]] = {}  # index of each chosen neuron among the layer's present ones
    for layer, ids in (neurons or {}).items():
        layer = int(layer)
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers")
        where = {n: i for i, n in enumerate(neuron_ids[layer])}
        missing = [int(n) for n in ids if int(n) not in where]
        if missing:
            raise ValueError(f"neurons {missing[:5]} of layer {layer} are not present (pruned or out of range)")
        if ids:
            chosen[layer] = [int(n) for n in ids]
            positions[layer] = [where[int(n)] for n in ids]
    n_units = [(len(head_ids[layer]) if heads else 0) + len(positions.get(layer, [])) for layer in range(n_layers)]
    width = max(n_units + [1])
    n_labels = model.config.num_labels

    def work(batch):
        if batch.get("labels") is None:
            raise ValueError("leave-one-out needs gold labels ('labels') in every batch")
        bsz, device = batch["input_ids"].shape[0], batch["input_ids"].device
        base = torch.zeros(bsz, n_labels, device=device)
        out = torch.zeros(bsz, n_layers, width, n_labels, device=device)
        for index, sub in sub_batches(batch, max_tokens, _pad_id(model)):
            r, w = sub["input_ids"].shape
            rows = torch.tensor(index, device=device)
            per = max(1, max_tokens // (r * w))  # unit copies per forward
            with autocast(device, precision):
                hidden, mask = embed(model, sub)
                for layer in range(n_layers):
                    kh = len(head_ids[layer]) if heads else 0
                    units = [("head", i) for i in range(kh)] + [("neuron", p) for p in positions.get(layer, [])]
                    for start, stop in split_evenly(len(units), per) if units else ():
                        c = stop - start
                        control = AttentionControl()
                        if any(kind == "head" for kind, _ in units[start:stop]):
                            hm = torch.ones(c, r, len(head_ids[layer]), device=device)
                        else:
                            hm = None
                        nm = torch.ones(c, r, len(neuron_ids[layer]), device=device) if layer in positions else None
                        for copy, (kind, i) in enumerate(units[start:stop]):
                            (hm if kind == "head" else nm)[copy, :, i] = 0
                        if hm is not None:
                            control.head_mask[layer] = hm.view(c * r, -1)
                        if nm is not None and any(kind == "neuron" for kind, _ in units[start:stop]):
                            control.neuron_mask[layer] = nm.view(c * r, -1)
                        logits = logits_from_layer(model, repeat_batch(hidden, c), repeat_batch(mask, c), layer, control)
                        out[rows[:, None], layer, torch.arange(start, stop, device=device)[None, :]] = (
                            logits.float().view(c, r, -1).transpose(0, 1)
                        )
                    hidden = run_layers(model, hidden, mask, layer, layer + 1)
                base[rows] = classify(model, hidden).float()
        return base, out, batch["labels"]

    with evaluating(model):
        base, masked, labels = over_batches(dataloader, accelerator, description, work)
    primary = metrics[0]
    labels = labels.long()

    def effects(lg: torch.Tensor) -> tuple[float, float]:
        loss = float(nn.functional.cross_entropy(lg, labels))
        metric = compute_metrics([primary], lg.argmax(-1), labels)[primary]
        return loss - base_loss, base_metric - metric

    base_loss = float(nn.functional.cross_entropy(base, labels))
    base_metric = compute_metrics([primary], base.argmax(-1), labels)[primary]
    head_loss = head_metric = None
    if heads:
        head_loss = torch.full((n_layers, model.config.num_attention_heads), float("nan"))
        head_metric = head_loss.clone()
        for layer, hs in enumerate(head_ids):
            for i, h in enumerate(hs):
                head_loss[layer, h], head_metric[layer, h] = effects(masked[:, layer, i])
    neuron_loss, neuron_metric = {}, {}
    for layer, pos in positions.items():
        offset = len(head_ids[layer]) if heads else 0
        pairs = [effects(masked[:, layer, offset + j]) for j in range(len(pos))]
        neuron_loss[layer] = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
        neuron_metric[layer] = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    return LeaveOneOut(base_loss, base_metric, head_loss, head_metric, chosen, neuron_loss, neuron_metric)
