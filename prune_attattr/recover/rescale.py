"""Least-squares mask tuning: retraining-free recovery of a pruned classifier (Kwon et al. 2022, section 4.3).

Kwon et al. ("A Fast Post-Training Pruning Framework for Transformers", arXiv 2204.09656; ``prune/rescale.py``
of their code) keep the pruned units' masks at 0 and turn the kept units' masks into real-valued scales,
layer by layer from the bottom: the scales of layer ``l`` are the linear least-squares fit of the
unpruned (teacher) model's sublayer output, computed on the teacher's own input, by the pruned
(student) model's sublayer output, computed on the student's input (which already carries the scales of
the layers below). A head's scale multiplies its contribution ``W_O,h ctx_h`` through the attention
output projection, a neuron's scale its contribution ``a_i w_i`` through the second feed-forward map, so
both sublayers are linear in their scales:

    heads:    x_S + sum_h s_h W_O,h ctx_S,h + b_O        ~  x_T + attn_out_T
    neurons:  r_S + sum_i s_i a_S,i w_i + b_2            ~  r_T + ffn_out_T

where ``x`` is the layer input and ``r`` the feed-forward block's residual (post-norm families: the
attention block's normalised output; pre-norm: the sum ``x + attn_out``). Matching the sums *before* a
post-norm LayerNorm, as Kwon et al. do, keeps the problem linear; each token contributes ``hidden``
equations. Padded tokens are left out; in the last layer only position 0 counts (the classifier reads
only it; Kwon et al. do this for the last feed-forward block of classification tasks). The student's
residual is its own, so the fit also compensates what pruning changed below.

Choices here:

* **Normal equations, damped towards "no change".** The statistics are Gram matrices (sums over
  tokens), so they add over batches and over processes (``accelerator.reduce``): one process gives the
  result of two. For heads ``G = sum_t U U^T`` with ``U = [W_O,h ctx_h]``; for neurons
  ``G = (a^T a) * (W^T W)`` (entry-wise, Kwon et al.'s form). We solve
  ``(G + lambda I) s = c + lambda s_0`` in float64, with ``s_0`` the current scales (1) and
  ``lambda = damping * mean(diag G)``: a unit the data says nothing about keeps its scale instead of being
  shrunk to 0 (a ridge towards 0, which LSMR from 0 amounts to in their code, would prune it further).
* **Bounds.** As in their code, a solution with a scale outside ``[-max_scale, max_scale]`` (10) or not
  finite is not used; where they stop tuning altogether we only keep that sublayer's scales unchanged
  and go on (listed in ``skipped``).
* **Optional bias** (``bias=True``, not in Kwon et al.): the sublayer's output bias (``b_O``, ``b_2``) is
  fitted jointly (the solve on token-centred statistics), absorbing the mean that pruned units removed.
  It lowers every layer's fit error and helps random tiny models, but on the fine-tuned MiniLM it costs
  dev accuracy (random masks at 50% FLOPs: 70.30% without, 60.32% with), so it is off by default.
* **Exact folding.** Afterwards every head's scale multiplies its ``head_dim`` columns of ``W_O`` and
  every neuron's scale its column of the second map (pruned units: 0), so the model computes, with no
  control, what the masked model computed: structural pruning of the zeroed units changes nothing.

Units are found through the family table (:func:`prune_attattr.models.output_projection`,
:func:`prune_attattr.models.feed_forward`); masks are those of
:class:`~prune_attattr.attention.AttentionControl` (current unit positions). A structurally pruned model
works too (its present units are all kept); its teacher must then be given.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import AttentionControl
from ..models import (
    embed,
    encoder_layers,
    feed_forward,
    head_dim,
    intermediate_size,
    kept_heads,
    kept_neurons,
    output_projection,
    prepare,
    run_layers,
    self_attention,
)
from .distill import RecoveryError

__all__ = ["LeastSquaresResult", "masks_from_pruned", "least_squares", "fold_scales"]


@dataclass
class LeastSquaresResult:
    """What :func:`least_squares` did.

    Attributes:
        head_scales: layer -> ``[current heads]`` scales folded into ``W_O`` (0 for masked heads).
        neuron_scales: layer -> ``[current neurons]`` scales folded into the second map (0 for masked).
        errors: ``"layer L heads"``/``"layer L neurons"`` -> ``(before, after)``: squared error of the
            sublayer's fit target (teacher sum minus student residual and bias) relative to its squared
            norm, with the scales before and after the solve (summed over all processes' tokens).
        skipped: sublayers whose solution was out of bounds or not finite, left unscaled.
        tokens: unpadded tokens fitted per layer (all processes; the last layer, with ``cls_last``, fits
            position 0 of each example only).
        seconds: wall time.
    """

    head_scales: dict[int, torch.Tensor] = field(default_factory=dict)
    neuron_scales: dict[int, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def masks_from_pruned(
    model: nn.Module, pruned_heads: Mapping[int, Sequence[int]] | None = None, pruned_neurons: Mapping[int, Sequence[int]] | None = None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``(head_mask, neuron_mask)`` for an :class:`~prune_attattr.attention.AttentionControl`: layer ->
    float ``[current units]`` with 0 at the given *original* ids still present and 1 elsewhere (ids
    already removed structurally are ignored; layers with nothing to mask are omitted). Takes the
    pruned sets of :func:`prune_attattr.prune.search.search_units`."""
    out = []
    for pruned, kept in ((pruned_heads, kept_heads(model)), (pruned_neurons, kept_neurons(model) if pruned_neurons else None)):
        masks = {}
        for layer, ids in (pruned or {}).items():
            present = kept[int(layer)]
            gone = set(int(i) for i in ids) & set(present)
            if gone:
                m = torch.ones(len(present))
                m[[present.index(i) for i in sorted(gone)]] = 0.0
                masks[int(layer)] = m
        out.append(masks)
    return out[0], out[1]


class _Capture:
    """Hooks on one layer: input and output of the attention output projection, input of the first
    feed-forward map, output of the second. Removed by :meth:`close`."""

    def __init__(self, model: nn.Module, layer: int):
        block = encoder_layers(model)[layer]
        first, second = feed_forward(model, layer)
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = [
            output_projection(block).register_forward_hook(self._keep("ctx", "attn_out")),
            first.register_forward_pre_hook(lambda m, args: self.seen.__setitem__("normed", args[0])),
            second.register_forward_hook(lambda m, args, out: self.seen.__setitem__("ffn_out", out)),
        ]

    def _keep(self, name_in: str, name_out: str):
        def hook(module, args, out):
            self.seen[name_in] = args[0]
            self.seen[name_out] = out

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _run_layer(model, layer, hidden, mask, control=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Layer ``layer`` on ``hidden [B, T, hidden]``: ``(output, captured pieces)`` (see :class:`_Capture`)."""
    cap = _Capture(model, layer)
    try:
        out = run_layers(model, hidden, mask, layer, layer + 1, control)
    finally:
        cap.close()
    return out, cap.seen


def _residual_is_sum(teacher: nn.Module, layer: int, hidden_size: int, device) -> bool:
    """Whether the feed-forward block's residual is the sum ``x + attn_out`` with no norm after it
    (pre-norm layers: output = sum + ffn_out) rather than the attention block's normalised output
    (post-norm: output = LN(normed + ffn_out)); probed on a random input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, hidden_size, generator=g).to(device)
    out, seen = _run_layer(teacher, layer, x, None)
    return torch.allclose(out, x + seen["attn_out"] + seen["ffn_out"], rtol=1e-4, atol=1e-5)


def _bias(linear: nn.Module, size: int) -> torch.Tensor:
    b = getattr(linear, "bias", None)
    return b.detach() if b is not None else linear.weight.new_zeros(size)


class _Stats:
    """Sums over tokens for one sublayer's fit: ``G [k,k]``, ``c [k]``, ``bb``, ``n``, ``Su [k, hidden]``
    (sum of each unit's contribution), ``SB [hidden]`` (sum of the target); float64."""

    def __init__(self, k: int, hidden: int, device):
        z = dict(dtype=torch.float64, device=device)
        self.t = {"G": torch.zeros(k, k, **z), "c": torch.zeros(k, **z), "bb": torch.zeros((), **z), "n": torch.zeros((), **z),
                  "Su": torch.zeros(k, hidden, **z), "SB": torch.zeros(hidden, **z)}

    def add(self, **parts: torch.Tensor) -> None:
        for key, value in parts.items():
            self.t[key] += value.double()

    def reduced(self, accelerator) -> dict[str, torch.Tensor]:
        if accelerator is None or accelerator.num_processes == 1:
            return self.t
        return accelerator.reduce(self.t, reduction="sum")


def _solve(t: dict[str, torch.Tensor], *, damping: float, bias: bool, max_scale: float):
    """``(scales [k] or None if out of bounds, bias shift [hidden] or None, error before, error after)``."""
    G, c, bb, n = t["G"], t["c"], float(t["bb"]), float(t["n"])
    k = G.shape[0]
    ones = torch.ones(k, dtype=G.dtype, device=G.device)
    err = lambda s, G_, c_, bb_: float(bb_ - 2 * s @ c_ + s @ G_ @ s)  # noqa: E731
    before = err(ones, G, c, bb) / bb if bb > 0 else 0.0
    if n == 0 or bb == 0:
        return None, None, before, before
    if bias:  # centred statistics: the optimal bias shift for any scales is (SB - Su^T s) / n
        G_, c_, bb_ = G - t["Su"] @ t["Su"].T / n, c - t["Su"] @ t["SB"] / n, bb - float(t["SB"] @ t["SB"]) / n
    else:
        G_, c_, bb_ = G, c, bb
    lam = damping * float(G_.diagonal().mean()) if k else 0.0
    try:
        s = torch.linalg.solve(G_ + lam * torch.eye(k, dtype=G.dtype, device=G.device), c_ + lam * ones)
    except RuntimeError:  # singular even with damping (e.g. damping 0 and a dead unit)
        return None, None, before, before
    if not torch.isfinite(s).all() or float(s.abs().max()) > max_scale:
        return None, None, before, before
    shift = (t["SB"] - t["Su"].T @ s) / n if bias else None
    return s, shift, before, err(s, G_, c_, bb_) / bb


def _selected(attention_mask: torch.Tensor | None, shape, cls_only: bool, device) -> torch.Tensor:
    """Boolean ``[B, T]`` of the tokens that count: unpadded ones (position 0 only in the last layer)."""
    keep = torch.ones(shape, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.to(device).bool()
    if cls_only:
        first = torch.zeros_like(keep)
        first[:, 0] = True
        keep = keep & first
    return keep


@torch.no_grad()
def least_squares(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    head_mask: Mapping[int, torch.Tensor] | None = None,
    neuron_mask: Mapping[int, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    damping: float = 1e-3,
    max_scale: float = 10.0,
    bias: bool = False,
    cls_last: bool = True,
    accelerator=None,
) -> LeastSquaresResult:
    """Tune the kept heads' and neurons' scales of ``model`` layer by layer and fold them into its weights, in place.

    Args:
        model: the pruned classifier (student): masked (``head_mask``/``neuron_mask``), structurally
            pruned, or both; put in eval mode.
        batches: this process's calibration batches (``input_ids [B, T]``, ``attention_mask [B, T]``,
            optional ``token_type_ids``; a few thousand training tokens in all, e.g.
            :func:`prune_attattr.recover.distill.recovery_dataloader` batches of this process's share).
        head_mask: layer -> ``[current heads]`` mask (0 pruned, 1 kept; other values are taken as
            current scales); layers not named keep every present head.
        neuron_mask: layer -> ``[current neurons]``, the same way.
        teacher: the unpruned classifier (same family, same hidden size). Default: a copy of ``model``
            taken before any change (valid only when nothing is pruned structurally).
        damping: relative ridge strength towards the current scales (module docstring), ``>= 0``.
        max_scale: solutions with ``|scale| > max_scale`` are not used.
        bias: also fit each sublayer's output bias (not in Kwon et al.; the map must have a bias).
        cls_last: fit the last layer at position 0 only (the classifier reads only it).
        accelerator: an ``accelerate.Accelerator``; the statistics are summed over its processes, so
            every process gets the same scales (each passes its own share of the batches).

    Returns:
        :class:`LeastSquaresResult`. ``model``'s output projections and second feed-forward maps (and,
        with ``bias``, their biases) are changed; run it without masks afterwards.

    Raises:
        RecoveryError: no teacher for a structurally pruned model, a teacher whose layer count or hidden
            size differs, a mask of the wrong length, ``damping < 0`` or ``max_scale <= 0``.
    """
    start = time.perf_counter()
    if damping < 0 or max_scale <= 0:
        raise RecoveryError(f"least squares needs damping >= 0 and max_scale > 0, got {damping} and {max_scale}")
    prepare(model)
    model.eval()
    hm_all = {i: torch.ones(len(h)) for i, h in enumerate(kept_heads(model))}
    nm_all = {i: torch.ones(len(n)) for i, n in enumerate(kept_neurons(model))}
    for name, given, full in (("head_mask", head_mask, hm_all), ("neuron_mask", neuron_mask, nm_all)):
        for layer, m in (given or {}).items():
            layer = int(layer)
            if layer not in full or tuple(m.shape) != tuple(full[layer].shape):
                raise RecoveryError(
                    f"least squares: {name} of layer {layer} has shape {tuple(m.shape)}, the model's layer has "
                    f"{tuple(full[layer].shape) if layer in full else 'no such layer'}"
                )
            full[layer] = m.detach().float().cpu().clone()
    if teacher is None:
        heads, neurons = model.config.num_attention_heads, intermediate_size(model)
        if any(len(h) != heads for h in kept_heads(model)) or any(len(n) != neurons for n in kept_neurons(model)):
            raise RecoveryError("least squares on a structurally pruned model needs the unpruned model as teacher")
        teacher = copy.deepcopy(model)
    prepare(teacher)
    teacher.eval()
    layers = len(encoder_layers(model))
    if len(encoder_layers(teacher)) != layers or teacher.config.hidden_size != model.config.hidden_size:
        raise RecoveryError("least squares: the teacher's layers or hidden size differ from the pruned model's")
    device = next(model.parameters()).device
    hidden_size = model.config.hidden_size
    batches = [{k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches]
    student_in = [embed(model, b) for b in batches]
    teacher_in = [embed(teacher, b) for b in batches]
    result = LeastSquaresResult()

    def control() -> AttentionControl:
        return AttentionControl(
            head_mask={i: m.to(device) for i, m in hm_all.items()}, neuron_mask={i: m.to(device) for i, m in nm_all.items()}
        )

    for layer in range(layers):
        last = cls_last and layer == layers - 1
        residual_sum = _residual_is_sum(teacher, layer, hidden_size, device)
        sel, t_attn, t_ffn = [], [], []
        for i, (x, mask) in enumerate(teacher_in):
            keep = _selected(batches[i].get("attention_mask"), x.shape[:2], last, device)
            out, seen = _run_layer(teacher, layer, x, mask)
            summed = x + seen["attn_out"]
            res = summed if residual_sum else seen["normed"]
            sel.append(keep)
            t_attn.append(summed[keep])
            t_ffn.append((res + seen["ffn_out"])[keep])
            teacher_in[i] = (out, mask)
        if layer == 0:
            result.tokens = int(_total(sum(int(k.sum()) for k in sel), accelerator, device))

        block = encoder_layers(model)[layer]
        proj = output_projection(block)
        kept_h = (hm_all[layer] != 0).nonzero().flatten().tolist()
        if kept_h:
            d = head_dim(self_attention(model, layer))
            w = proj.weight.detach().view(hidden_size, -1, d)[:, kept_h]  # [hidden, k, d]
            b_o = _bias(proj, hidden_size)
            stats = _Stats(len(kept_h), hidden_size, device)
            for i, (x, mask) in enumerate(student_in):
                _, seen = _run_layer(model, layer, x, mask, control())
                keep = sel[i]
                ctx = seen["ctx"][keep].view(-1, len(hm_all[layer]), d)[:, kept_h]  # [n, k, d]
                u = torch.einsum("nkd,okd->kno", ctx, w)  # each head's contribution [k, n, hidden]
                target = t_attn[i] - x[keep] - b_o
                flat = u.reshape(len(kept_h), -1)
                stats.add(G=flat @ flat.T, c=flat @ target.flatten(), bb=(target * target).sum(), n=torch.tensor(target.shape[0]),
                          Su=u.sum(1), SB=target.sum(0))
            _apply(result, stats.reduced(accelerator), hm_all, layer, kept_h, "heads", proj if bias else None, damping, max_scale)

        second = feed_forward(model, layer)[1]
        kept_n = (nm_all[layer] != 0).nonzero().flatten().tolist()
        if kept_n:
            w2 = second.weight.detach()[:, kept_n]  # [hidden, k]
            wtw = w2.T @ w2
            b_2 = _bias(second, hidden_size)
            stats = _Stats(len(kept_n), hidden_size, device)
            for i, (x, mask) in enumerate(student_in):
                ctrl = control()
                ctrl.neuron_record = {layer}
                _, seen = _run_layer(model, layer, x, mask, ctrl)
                keep = sel[i]
                a = ctrl.neuron_recorded[layer][keep][:, kept_n]  # [n, k], current scales included
                res = (x + seen["attn_out"]) if residual_sum else seen["normed"]
                target = t_ffn[i] - res[keep] - b_2
                sa = a.sum(0)
                stats.add(G=(a.T @ a) * wtw, c=(a * (target @ w2)).sum(0), bb=(target * target).sum(),
                          n=torch.tensor(target.shape[0]), Su=sa[:, None] * w2.T, SB=target.sum(0))
            _apply(result, stats.reduced(accelerator), nm_all, layer, kept_n, "neurons", second if bias else None, damping, max_scale)

        ctrl = control()
        for i, (x, mask) in enumerate(student_in):
            student_in[i] = (run_layers(model, x, mask, layer, layer + 1, ctrl), mask)

    fold_scales(model, hm_all, nm_all)
    result.head_scales = hm_all
    result.neuron_scales = nm_all
    result.seconds = time.perf_counter() - start
    return result


def _total(value: int, accelerator, device) -> float:
    if accelerator is None or accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.reduce(torch.tensor(float(value), device=device), reduction="sum"))


def _apply(result, t, masks, layer, kept, kind, biased: nn.Module | None, damping, max_scale) -> None:
    """Solve one sublayer, multiply its masks by the scales; with ``biased`` (the sublayer's output map,
    when the bias is fitted) add the bias shift to that map's bias now, so the rest of the layer and the
    layers above see it."""
    fit_bias = biased is not None and getattr(biased, "bias", None) is not None
    s, shift, before, after = _solve(t, damping=damping, bias=fit_bias, max_scale=max_scale)
    name = f"layer {layer} {kind}"
    result.errors[name] = (before, after)
    if s is None:
        if float(t["bb"]) > 0 and float(t["n"]) > 0:
            result.skipped.append(name)
        return
    masks[layer][kept] = masks[layer][kept] * s.float().cpu()
    if shift is not None:
        biased.bias.add_(shift.to(biased.bias))


@torch.no_grad()
def fold_scales(model: nn.Module, head_scales: Mapping[int, torch.Tensor], neuron_scales: Mapping[int, torch.Tensor]) -> nn.Module:
    """Multiply each head's ``head_dim`` input columns of the attention output projection and each
    neuron's input column of the second feed-forward map by its scale, in place (layer -> ``[current
    units]``; a scale of 0 silences the unit exactly as a mask of 0 does). Returns ``model``.

    Raises:
        RecoveryError: a scale vector whose length is not the layer's present units.
    """
    layers = encoder_layers(model)
    for layer, s in head_scales.items():
        block = layers[int(layer)]
        proj = output_projection(block)
        n = len(kept_heads(model)[int(layer)])
        if s.numel() != n:
            raise RecoveryError(f"head scales of layer {layer} have {s.numel()} entries, the layer has {n} heads")
        if n == 0:
            continue
        d = head_dim(self_attention(model, int(layer)))
        proj.weight.mul_(s.to(proj.weight).repeat_interleave(d)[None, :])
    for layer, s in neuron_scales.items():
        second = feed_forward(model, int(layer))[1]
        n = len(kept_neurons(model)[int(layer)])
        if s.numel() != n:
            raise RecoveryError(f"neuron scales of layer {layer} have {s.numel()} entries, the layer has {n} neurons")
        if n == 0:  # every neuron pruned: the map is its bias alone (prune_attattr.prune.heads._BiasOnly)
            continue
        second.weight.mul_(s.to(second.weight)[None, :])
    return model
