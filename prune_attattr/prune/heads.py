"""Structural head pruning for the encoder families of :mod:`prune_attattr.families`, and the incremental pruning loop.

transformers 5 removed ``PreTrainedModel.prune_heads``; :func:`prune_heads` does the same job and
also handles a layer that loses every head (stock code crashes on ``view(..., -1, head_dim)`` of an
empty projection). Removing head ``h`` deletes rows ``h*d:(h+1)*d`` of the query, key and value
projections and the same columns of the attention output projection (Michel et al. 2019, section 2).
A layer with no heads left keeps only the output projection's bias: its attention block computes
``LayerNorm(hidden + b_O)``, exactly what a fully masked layer computes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from ..families import get_path, set_path
from ..models import PRUNED_HEADS_KEY, encoder_layers, head_dim, kept_heads, num_heads_total, prepare

__all__ = ["prune_heads", "pruned_heads_of", "heads_to_prune", "PruningStep", "pruning_curve", "count_parameters"]


class _NoHeads(nn.Module):
    """Attention module of a layer whose heads were all pruned: contributes nothing but its shape.

    When the family's output projection lives inside the attention module (DistilBERT ``out_lin``,
    ModernBERT ``Wo``), it is kept under its own name as a :class:`_BiasOnly` and applied here.
    """

    def __init__(self, layer_idx: int, out_name: str | None = None, out: nn.Module | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_ids: list[int] = []
        self.num_attention_heads = 0
        self._out_name = out_name
        if out_name is not None:
            setattr(self, out_name, out)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        empty = hidden_states[..., :0]
        if self._out_name is not None:
            return getattr(self, self._out_name)(empty), None
        return empty, None


class _BiasOnly(nn.Module):
    """A linear map with no input features left (an attention output projection without heads, a second
    feed-forward map without neurons): returns its bias, ``[..., hidden]``, for any input ``[..., 0]``."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])


def _bias_of(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)


def pruned_heads_of(model: nn.Module) -> dict[int, list[int]]:
    """Original indices of the heads already pruned, ``{layer: [heads]}`` (layers with none omitted)."""
    n = model.config.num_attention_heads
    out = {}
    for layer, kept in enumerate(kept_heads(model)):
        gone = sorted(set(range(n)) - set(kept))
        if gone:
            out[layer] = gone
    return out


def prune_heads(model: nn.Module, heads: Mapping[int | str, Sequence[int]]) -> nn.Module:
    """Remove attention heads from ``model`` in place (structural pruning).

    Args:
        model: a sequence classifier of a supported family (see :mod:`prune_attattr.families`).
        heads: ``{layer: [head, ...]}`` with *original* head indices (0 .. num_attention_heads-1).
            Heads already pruned are ignored; a layer may lose all its heads.

    Returns:
        The same model, with smaller q/k/v and output projections, ``module.head_ids`` recording the
        original index of every kept head, and ``config.prune_attattr_pruned_heads`` updated.

    Raises:
        ValueError: a layer or head index out of range.
    """
    fam = prepare(model)
    layers = encoder_layers(model)
    n_heads = model.config.num_attention_heads
    for key, hs in heads.items():
        layer = int(key)
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
        bad = [h for h in hs if not 0 <= int(h) < n_heads]
        if bad:
            raise ValueError(f"head(s) {bad} of layer {layer} out of range: layers have {n_heads} heads")
        block = layers[layer]
        current = kept_heads(model)[layer]
        drop = {int(h) for h in hs} & set(current)
        if not drop:
            continue
        keep = [h for h in current if h not in drop]
        attn = get_path(block, fam.attention)
        out = get_path(block, fam.output)
        if not keep:
            bias_only = _BiasOnly(_bias_of(out))
            if fam.output_inside_attention:
                inner = fam.output[len(fam.attention) + 1 :]
                set_path(block, fam.attention, _NoHeads(layer, inner, bias_only))
            else:
                set_path(block, fam.attention, _NoHeads(layer))
                set_path(block, fam.output, bias_only)
            continue
        d = head_dim(attn)
        positions = [current.index(h) for h in keep]
        index = torch.cat([torch.arange(p * d, (p + 1) * d) for p in positions]).to(out.weight.device)
        if fam.fused_qkv is not None:  # Q, K, V as three row blocks of [current heads * d]
            width = len(current) * d
            fused = torch.cat([index + part * width for part in range(3)])
            set_path(attn, fam.fused_qkv, prune_linear_layer(get_path(attn, fam.fused_qkv), fused, dim=0))
        else:
            for name in (fam.query, fam.key, fam.value, *fam.extra_proj):
                if name in fam.extra_proj and not hasattr(attn, name):
                    continue  # e.g. DeBERTa without p2c, or with shared position keys
                set_path(attn, name, prune_linear_layer(get_path(attn, name), index, dim=0))
        set_path(block, fam.output, prune_linear_layer(out, index, dim=1))
        for count in ("num_attention_heads", "n_heads", "num_heads"):
            if hasattr(attn, count):
                setattr(attn, count, len(keep))
        if hasattr(attn, "all_head_size"):
            attn.all_head_size = d * len(keep)
        attn.head_ids = keep
    setattr(model.config, PRUNED_HEADS_KEY, {str(k): v for k, v in pruned_heads_of(model).items()})
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements) in ``model``."""
    return sum(p.numel() for p in model.parameters())


def heads_to_prune(scores: torch.Tensor, count: int, already: Mapping[int, Sequence[int]] | None = None):
    """The ``count`` lowest-scored heads not yet pruned, as ``{layer: [heads]}``.

    Args:
        scores: head importance ``[layers, heads]`` (higher = more important).
        count: how many more heads to select.
        already: heads pruned before (excluded from the choice).

    Ties are broken by (layer, head) order, so the choice is deterministic.
    """
    already = already or {}
    done = {(int(layer), int(h)) for layer, hs in already.items() for h in hs}
    n_layers, n_heads = scores.shape
    order = sorted(
        ((float(scores[layer, h]), layer, h) for layer in range(n_layers) for h in range(n_heads)),
        key=lambda t: (t[0], t[1], t[2]),
    )
    out: dict[int, list[int]] = {}
    for _, layer, h in order:
        if count <= 0:
            break
        if (layer, h) in done:
            continue
        out.setdefault(layer, []).append(h)
        count -= 1
    return out


@dataclass
class PruningStep:
    """One point of a pruning curve.

    ``flops_fraction``: FLOPs per token kept, as a fraction of the unpruned model's
    (:func:`prune_attattr.prune.cost.unit_flops`; filled by the caller for head curves), ``budget``: the
    FLOPs fraction a budgeted step was searched for (None for head-count steps), ``loyalty``:
    ``{"label", "probability"}`` against the unpruned model (:func:`prune_attattr.evaluation.loyalty`;
    filled by the caller, None when not measured), ``removed_sublayers``: whole sublayers removed
    (``{layer: ["attention", "ffn"]}``, :mod:`prune_attattr.prune.sublayers`).
    """

    heads_pruned: int
    heads_kept: int
    parameters: int
    metrics: dict[str, float]
    pruned_heads: dict[str, list[int]]
    neurons_kept: int | None = None
    pruned_neurons: dict[str, list[int]] = field(default_factory=dict)
    flops_fraction: float | None = None
    budget: float | None = None
    loyalty: dict[str, float] | None = None
    removed_sublayers: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def pruning_curve(
    model: nn.Module,
    scores: torch.Tensor,
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    *,
    step_fraction: float = 0.1,
    rescore_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    on_step: Callable[[PruningStep], None] | None = None,
) -> list[PruningStep]:
    """Prune heads incrementally by importance and evaluate after every step (Hao et al. 2021, section 4.1).

    Steps remove ``round(k * step_fraction * total_heads)`` heads for ``k = 0, 1, ...`` up to all
    heads. The model is copied; the caller's model is unchanged.

    Args:
        model: unpruned (or partly pruned) classifier.
        scores: head importance ``[layers, heads]`` used to rank heads once.
        evaluate_fn: model -> metrics (e.g. ``{"accuracy": 0.91}``, fractions in [0, 1]).
        step_fraction: fraction of all heads removed per step, in (0, 1].
        rescore_fn: if given, called on the pruned model after each step to re-rank the remaining
            heads (``[layers, heads]``; entries of pruned heads are ignored).
        on_step: callback after each evaluated step (progress display).

    Returns:
        One :class:`PruningStep` per step, starting with 0 heads pruned.
    """
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    total = num_heads_total(model)
    work = copy.deepcopy(model)
    n_steps = int(round(1 / step_fraction))
    targets = sorted({min(total, int(round(k * step_fraction * total))) for k in range(n_steps + 1)} | {total})
    current_scores = scores
    steps: list[PruningStep] = []
    for target in targets:
        already = pruned_heads_of(work)
        have = sum(len(v) for v in already.values())
        if target > have:
            prune_heads(work, heads_to_prune(current_scores, target - have, already))
        metrics = evaluate_fn(work)
        step = PruningStep(
            heads_pruned=target,
            heads_kept=total - target,
            parameters=count_parameters(work),
            metrics=metrics,
            pruned_heads={str(k): v for k, v in pruned_heads_of(work).items()},
        )
        steps.append(step)
        if on_step is not None:
            on_step(step)
        if rescore_fn is not None and target < total:
            current_scores = rescore_fn(work)
    return steps
