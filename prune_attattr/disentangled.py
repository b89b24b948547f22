"""DeBERTa-v2/v3 disentangled attention, routed through prune_attattr's attention function.

DeBERTa-v2 does not call the transformers attention interface: ``DisentangledSelfAttention`` computes
its probabilities itself. :func:`install` switches each such module, in place, to
:class:`ControlledDisentangledSelfAttention` (a subclass: same parameters, same state-dict keys, so
saving, loading and stock transformers are unaffected). Its forward computes DeBERTa's scores
(He et al. 2021, *DeBERTa*, Eq. 4, with the v2 log-bucketed relative positions)

    S = (Q K^T + C2P + P2C) / sqrt(d * s)        s = 1 + [c2p used] + [p2c used]
    C2P[i, j] = Q_i . K^r_{delta(i, j)}           P2C[i, j] = K_j . Q^r_{delta(j, i)}

and hands ``Q``, ``K``, ``V`` with the additive bias ``(C2P + P2C) / sqrt(d s) + padding mask`` and the
scaling ``1 / sqrt(d s)`` to :func:`prune_attattr.attention.attention_forward`, so that every
:class:`~prune_attattr.attention.AttentionControl` (IG's ``replace``, ``head_mask``, ``record``, ...)
acts on DeBERTa's attention probabilities exactly as on the other families'. Stock DeBERTa layers do
not pass extra keyword arguments down, so the control is read from
:func:`prune_attattr.attention.active_control` (set by :func:`prune_attattr.attention.controlled`).

:func:`relative_bias` takes query and key *positions*, so the last layer can be computed for the
[CLS] query alone (AttAttr's fast path) with the same bias rows the full layer uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, make_log_bucket_position

from .attention import AttentionControl, active_control, attention_forward

__all__ = ["ControlledDisentangledSelfAttention", "install", "relative_bias", "score_scale", "padding_bias"]


def _scale_factor(attn: nn.Module) -> int:
    """``s``: 1 for content-to-content plus one per relative-position term named in ``pos_att_type``
    (counted even when ``relative_attention`` is off, as the stock module does)."""
    return 1 + int("c2p" in attn.pos_att_type) + int("p2c" in attn.pos_att_type)


def score_scale(attn: nn.Module) -> float:
    """The multiplier of ``Q K^T``: ``1 / sqrt(head_dim * s)``."""
    return 1.0 / math.sqrt(attn.attention_head_size * _scale_factor(attn))


def _bucket(relative: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """DeBERTa-v2's log-bucketed relative positions (``make_log_bucket_position``), int64."""
    if attn.position_buckets > 0 and attn.max_relative_positions > 0:
        relative = make_log_bucket_position(relative, attn.position_buckets, attn.max_relative_positions)
    return relative.long()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[N, T, heads * d] -> [N, heads, T, d]``."""
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)


def relative_bias(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    rel_embeddings: torch.Tensor,
) -> torch.Tensor | None:
    """DeBERTa's relative-position scores ``(C2P + P2C) / sqrt(d s)`` for the given positions.

    Args:
        attn: a ``DisentangledSelfAttention`` (possibly head-pruned: its current heads are used).
        query, key: content projections ``[N, heads, T_q, d]`` and ``[N, heads, T_k, d]``.
        q_positions, k_positions: absolute positions ``[T_q]``, ``[T_k]`` (int64) of those rows.
        rel_embeddings: the encoder's relative embeddings (``encoder.get_rel_embedding()``), ``[2S', hidden]``.

    Returns:
        ``[N, heads, T_q, T_k]`` (float, same dtype as ``query``), or None when the model has no
        relative attention.
    """
    if not getattr(attn, "relative_attention", False) or not attn.pos_att_type:
        return None
    heads = query.shape[1]
    span = attn.pos_ebd_size
    rel = attn.pos_dropout(rel_embeddings[: 2 * span]).unsqueeze(0)  # [1, 2S, hidden]
    scale = math.sqrt(attn.attention_head_size * _scale_factor(attn))
    delta = _bucket(q_positions.view(-1, 1) - k_positions.view(1, -1), attn)  # [T_q, T_k]: bucket(i - j)
    n, _, tq, _ = query.shape
    tk = key.shape[2]
    score = query.new_zeros(n, heads, tq, tk)
    if "c2p" in attn.pos_att_type:
        pos_key = _heads(attn.key_proj(rel) if attn.share_att_key else attn.pos_key_proj(rel), heads)  # [1, H, 2S, d]
        c2p = torch.matmul(query, pos_key.transpose(-1, -2))  # [N, H, T_q, 2S]
        index = torch.clamp(delta + span, 0, 2 * span - 1).expand(n, heads, tq, tk)
        score = score + torch.gather(c2p, -1, index)
    if "p2c" in attn.pos_att_type:
        pos_query = _heads(attn.query_proj(rel) if attn.share_att_key else attn.pos_query_proj(rel), heads)
        p2c = torch.matmul(key, pos_query.transpose(-1, -2))  # [N, H, T_k, 2S]
        back = _bucket(k_positions.view(-1, 1) - q_positions.view(1, -1), attn)  # [T_k, T_q]: bucket(j - i)
        index = torch.clamp(-back + span, 0, 2 * span - 1).expand(n, heads, tk, tq)
        score = score + torch.gather(p2c, -1, index).transpose(-1, -2)
    return score / scale


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key mask ``[B, 1, 1, T_k]`` (0 or the dtype's minimum) from DeBERTa's 0/1 mask.

    ``mask``: ``[B, T_k]``, ``[B, T_q, T_k]`` or ``[B, 1, T_q, T_k]``, any dtype, nonzero = attend (as
    the stock module reads it). A key is kept when any query may attend to it: DeBERTa's outer-product
    mask also masks whole padded query rows, which would leave rows of ``-inf`` under fp16 and give
    NaN; the rows of real tokens are the same either way.
    """
    if mask is None:
        return None
    keep = mask.bool()
    if keep.dim() == 2:
        keep = keep[:, None, None, :]
    elif keep.dim() == 3:
        keep = keep.unsqueeze(1)
    keep = keep.any(-2, keepdim=True)
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, torch.finfo(dtype).min)


class _ControlledForward(nn.Module):
    """The forward that :func:`install` gives a ``DisentangledSelfAttention`` (mixed in before its class)."""

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None, rel_embeddings=None):
        """Same arguments and results as the stock module.

        Args:
            hidden_states: ``[B, T, hidden]``; ``query_states`` (``[B, T, hidden]``) replaces it for queries.
            attention_mask: DeBERTa's 0/1 mask (``[B, 1, T, T]``, nonzero = attend, any dtype) or None.
            relative_pos: ignored (recomputed from positions; equal to the encoder's for self-attention).
            rel_embeddings: ``[2S', hidden]`` relative embeddings.

        Returns:
            ``(context [B, T, heads * d], probabilities [B, heads, T, T] or None)``.
        """
        q_in = hidden_states if query_states is None else query_states
        heads = self.num_attention_heads
        query = _heads(self.query_proj(q_in), heads)
        key = _heads(self.key_proj(hidden_states), heads)
        value = _heads(self.value_proj(hidden_states), heads)
        tq, tk = query.shape[2], key.shape[2]
        bias = padding_bias(attention_mask, query.dtype)
        if rel_embeddings is not None:
            positions = torch.arange(max(tq, tk), device=query.device)
            rel = relative_bias(self, query, key, positions[:tq], positions[:tk], rel_embeddings)
            if rel is not None:
                bias = rel if bias is None else rel + bias
        control = active_control()
        layer = getattr(self, "layer_idx", None)
        if output_attentions and (control is None or not control.touches(layer)):
            control = AttentionControl(record={layer})  # the explicit path, nothing changed: probabilities returned
        out, probs = attention_forward(
            self, query, key, value, bias, scaling=score_scale(self), dropout=self.dropout.p, attention_control=control
        )
        context = out.reshape(out.shape[0], tq, -1)
        return context, (probs if output_attentions else None)


class ControlledDisentangledSelfAttention(_ControlledForward, DisentangledSelfAttention):
    """``DisentangledSelfAttention`` whose probabilities go through :func:`~prune_attattr.attention.attention_forward`.

    Never constructed: :func:`install` sets an existing module's ``__class__`` to it. A module-level
    class, so a switched module pickles (``torch.save(model)``, spawned processes).
    """


_CLASSES: dict[type, type] = {DisentangledSelfAttention: ControlledDisentangledSelfAttention}


def install(attn: nn.Module) -> None:
    """Switch one ``DisentangledSelfAttention`` to :class:`ControlledDisentangledSelfAttention` in place (idempotent).

    A subclass of the stock module gets its own switched class, registered in this module under
    ``<name>WithControl``.
    """
    cls = type(attn)
    if issubclass(cls, _ControlledForward) or not hasattr(attn, "query_proj"):
        return  # already switched, or a layer with no heads left (its stand-in module)
    new = _CLASSES.get(cls)
    if new is None:
        name = f"{cls.__name__}WithControl"
        new = type(name, (_ControlledForward, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _CLASSES[cls] = new
    attn.__class__ = new
