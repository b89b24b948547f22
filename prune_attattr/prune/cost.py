"""Analytic inference cost of a (pruned) encoder classifier: FLOPs per token at a sequence length, in
total and per prunable unit (attention head, feed-forward neuron).

Conventions (every function here): a multiply-add is 2 FLOPs; costs are per token of a sequence of
``L = seq_len`` tokens (a real number, e.g. a task's mean evaluation length); what is computed once per
sequence (the classification head, DeBERTa's relative-embedding projections) is spread over its ``L``
tokens. For layer ``l`` with hidden size ``H``, head size ``d`` and ``I`` feed-forward neurons:

- one attention head: ``2*H*3*d`` (its Q, K, V rows) ``+ 2*d*L`` (scores ``Q K^T``) ``+ 2*d*L``
  (``A V``) ``+ 2*d*H`` (its output-projection columns) ``= 8*H*d + 4*d*L``, i.e. ``4*H*d + 2*L*d``
  multiply-adds (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers",
  ``efficiency/mac.py`` of their code);
- one feed-forward neuron: ``2*H`` (its row of the first map) ``+ 2*H`` (its column of the second)
  ``= 4*H`` (``2*H`` multiply-adds, Kwon et al. 2022); a gated first map (GLU, ModernBERT) has two rows
  per neuron: ``6*H``;
- classifier head, once per sequence: ``(2*H*H + 2*H*C) / L`` (pooler and classifier; ``C`` classes);
- an embedding projection where the embedding size ``E`` differs from ``H`` (ELECTRA-small): ``2*E*H``.

DeBERTa's relative-position attention adds, per head and per position term used (c2p, p2c),
``2*d*2S`` per token (scores against the ``2S`` relative embeddings) and ``2*2S*H*d / L`` (their
projection, once per sequence), ``S`` = ``position_buckets`` (or ``max_relative_positions``).

Softmax, LayerNorm, activations, biases and embeddings (lookups) are left out: they are linear in
``H`` or ``L`` per token and below 1% of the total for BERT-family sizes (Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", section 2.1, counts the same way). What is counted is
exactly what ``torch.utils.flop_counter`` counts for the explicit-attention forward at batch 1
(tests/test_neuron_pruning.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..models import intermediate_size, kept_heads, kept_neurons, prepare

__all__ = ["UnitCosts", "unit_flops", "flops_per_token"]


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs per token of each prunable unit of a model at one sequence length (module docstring).

    Attributes:
        seq_len: the sequence length ``L`` the costs are for.
        head: ``[layers]``: FLOPs per token of one attention head of each layer (with DeBERTa's
            relative terms included; every layer of the families here has the same).
        neuron: ``[layers]``: FLOPs per token of one feed-forward neuron of each layer.
        fixed: FLOPs per token of what no pruning removes (the classification head, an embedding projection).
        heads_kept, neurons_kept: ``[layers]``: the units the model has now.
        heads_total, neurons_total: units per layer of the unpruned architecture.
        total: the model's FLOPs per token, ``fixed + Σ_l heads_kept[l] * head[l] + Σ_l neurons_kept[l] * neuron[l]``.
    """

    seq_len: float
    head: list[float]
    neuron: list[float]
    fixed: float
    heads_kept: list[int]
    neurons_kept: list[int]
    heads_total: int
    neurons_total: int
    total: float

    def flops(self, heads_kept: Sequence[int], neurons_kept: Sequence[int]) -> float:
        """FLOPs per token of the same architecture keeping ``heads_kept[l]`` heads and
        ``neurons_kept[l]`` neurons in layer ``l`` (``[layers]`` each).

        Raises:
            ValueError: a list of the wrong length.
        """
        n = len(self.head)
        if len(heads_kept) != n or len(neurons_kept) != n:
            raise ValueError(f"heads_kept and neurons_kept need one count per layer ({n}), got {len(heads_kept)} and {len(neurons_kept)}")
        attention = sum(h * c for h, c in zip(heads_kept, self.head))
        ffn = sum(k * c for k, c in zip(neurons_kept, self.neuron))
        return self.fixed + attention + ffn

    @property
    def unpruned(self) -> float:
        """FLOPs per token of the unpruned architecture (the denominator of "FLOPs kept")."""
        n = len(self.head)
        return self.flops([self.heads_total] * n, [self.neurons_total] * n)

    @property
    def attention(self) -> float:
        """FLOPs per token of the kept heads."""
        return sum(h * c for h, c in zip(self.heads_kept, self.head))

    @property
    def feed_forward(self) -> float:
        """FLOPs per token of the kept feed-forward neurons."""
        return sum(k * c for k, c in zip(self.neurons_kept, self.neuron))


def _head_size(config) -> int:
    return getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads


def unit_flops(model: nn.Module, seq_len: float) -> UnitCosts:
    """FLOPs per token of each head, each feed-forward neuron and the fixed part of ``model`` on
    sequences of ``seq_len`` tokens (formulas and conventions in the module docstring).

    Args:
        model: a sequence classifier of a supported family, pruned or not
            (:mod:`prune_attattr.prune.heads`, :mod:`prune_attattr.prune.neurons`).
        seq_len: tokens per sequence ``L`` (>= 1), e.g. the mean evaluation length.

    Returns:
        :class:`UnitCosts`; unit costs do not depend on what is pruned, ``total`` does.

    Raises:
        ValueError: ``seq_len < 1``.
        prune_attattr.models.ModelError: an unsupported model.
    """
    if not seq_len >= 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    fam = prepare(model)
    c = model.config
    H, L, d = c.hidden_size, float(seq_len), _head_size(c)
    layers = c.num_hidden_layers
    head = 8 * H * d + 4 * d * L
    if getattr(c, "relative_attention", False):
        terms = sum(t in (c.pos_att_type or []) for t in ("c2p", "p2c"))
        span = c.position_buckets if getattr(c, "position_buckets", -1) > 0 else (c.max_relative_positions if c.max_relative_positions > 0 else c.max_position_embeddings)
        head += terms * (2 * d * 2 * span + 2 * 2 * span * H * d / L)
    neuron = (6 if fam.glu else 4) * H
    fixed = (2 * H * H + 2 * H * c.num_labels) / L
    embedding = getattr(c, "embedding_size", None) or H
    if embedding != H:
        fixed += 2 * embedding * H
    heads_kept = [len(h) for h in kept_heads(model)]
    neurons_kept = [len(k) for k in kept_neurons(model)]
    heads = [float(head)] * layers
    neurons = [float(neuron)] * layers
    total = fixed + sum(h * x for h, x in zip(heads_kept, heads)) + sum(k * x for k, x in zip(neurons_kept, neurons))
    return UnitCosts(
        seq_len=L,
        head=heads,
        neuron=neurons,
        fixed=float(fixed),
        heads_kept=heads_kept,
        neurons_kept=neurons_kept,
        heads_total=int(c.num_attention_heads),
        neurons_total=intermediate_size(model),
        total=float(total),
    )


def flops_per_token(model: nn.Module, seq_len: float) -> dict[str, float]:
    """Forward FLOPs per token of ``model`` on sequences of ``seq_len`` tokens (module docstring): the
    kept heads, the kept feed-forward neurons and the classifier head.

    Args:
        model: a sequence classifier of a supported family, pruned or not.
        seq_len: tokens per sequence ``L`` (>= 1), e.g. the evaluation length.

    Returns:
        ``{"attention": FLOPs, "feed_forward": FLOPs, "total": FLOPs}`` per token
        (``total`` includes the classifier head).

    Raises:
        ValueError: ``seq_len < 1``.
    """
    costs = unit_flops(model, seq_len)
    return {"attention": float(costs.attention), "feed_forward": float(costs.feed_forward), "total": costs.total}
