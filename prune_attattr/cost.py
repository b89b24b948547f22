"""Analytic inference cost of a (pruned) BERT-family classifier: FLOPs per token at a sequence length."""

from __future__ import annotations

from torch import nn

from .models import kept_heads

__all__ = ["flops_per_token"]


def flops_per_token(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of ``model`` on sequences of ``seq_len`` tokens (a multiply-add = 2 FLOPs).

    For layer ``l`` with ``h_l`` kept heads of size ``d``, hidden size ``H``, intermediate size ``I``
    and ``L = seq_len``, per token:

    - attention: ``2*H*3*h_l*d`` (Q, K, V projections) ``+ 2*h_l*d*L`` (scores ``Q K^T``)
      ``+ 2*h_l*d*L`` (``A V``) ``+ 2*h_l*d*H`` (output projection) ``= 8*H*h_l*d + 4*h_l*d*L``;
    - feed-forward: ``4*H*I`` (two projections);
    - classifier head, once per sequence, spread over its ``L`` tokens: ``(2*H*H + 2*H*C) / L``
      (pooler and classifier; ``C`` classes).

    DeBERTa's relative-position attention adds, per kept head and per position term used (c2p, p2c),
    ``2*d*2S`` per token (scores against the ``2S`` relative embeddings) and ``2*2S*H*d / L`` (their
    projection, once per sequence), ``S`` = ``position_buckets`` (or ``max_relative_positions``).

    Softmax, LayerNorm, activations, biases and embeddings (lookups) are left out: they are linear in
    ``H`` or ``L`` per token and below 1% of the total for BERT-family sizes (Kaplan et al. 2020,
    "Scaling Laws for Neural Language Models", section 2.1, counts the same way).

    Args:
        model: a BERT-family sequence classifier, pruned or not (see :mod:`prune_attattr.pruning`).
        seq_len: tokens per sequence ``L`` (>= 1), e.g. the evaluation length.

    Returns:
        ``{"attention": FLOPs, "total": FLOPs}`` per token.

    Raises:
        ValueError: ``seq_len < 1``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    c = model.config
    H, I, L = c.hidden_size, c.intermediate_size, seq_len
    d = H // c.num_attention_heads
    d = getattr(c, "attention_head_size", None) or d
    attention = sum(8 * H * len(h) * d + 4 * len(h) * d * L for h in kept_heads(model))
    if getattr(c, "relative_attention", False):
        terms = sum(t in (c.pos_att_type or []) for t in ("c2p", "p2c"))
        span = c.position_buckets if getattr(c, "position_buckets", -1) > 0 else (c.max_relative_positions if c.max_relative_positions > 0 else c.max_position_embeddings)
        attention += sum(terms * len(h) * (2 * d * 2 * span + 2 * 2 * span * H * d / L) for h in kept_heads(model))
    ffn = 4 * H * I * c.num_hidden_layers
    head = (2 * H * H + 2 * H * c.num_labels) / L
    return {"attention": float(attention), "total": float(attention + ffn + head)}
