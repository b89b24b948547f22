"""The attention function through which every method here reads or changes attention probabilities.

transformers 5 removed ``head_mask``; its supported hook is the attention interface. We register one
attention implementation, ``"prune_attattr"``, and its mask function (the eager, additive one: without
``AttentionMaskInterface.register`` a custom attention name silently ignores padding).

A forward pass without an :class:`AttentionControl` takes PyTorch's fused
``scaled_dot_product_attention`` (the fast path used for training and evaluation). A forward pass
given ``attention_control=AttentionControl(...)`` (a keyword argument that transformers forwards
unchanged to the attention function) computes the attention probabilities explicitly,

    A = softmax(Q K^T * scaling + mask)        # [batch, heads, query, key]

and then, for the layers the control names, in this order:

1. ``replace``: uses a given tensor instead of ``A`` (integrated gradients scale ``A`` by alpha,
   Hao et al. 2021, Eq. 1-2);
2. ``connection_mask``: multiplies ``A`` entry-wise (pruning single connections, paper section 4.1);
3. ``head_mask``: multiplies each head's ``A`` by a scalar (Michel et al. 2019, Eq. 2, the head mask xi_h);
4. ``record``: stores the resulting probabilities in ``control.recorded[layer]``.

The same control carries the feed-forward neurons' instructions (``neuron_mask``, ``neuron_replace``,
``neuron_record``): a forward pre-hook on each layer's second feed-forward map (installed by
:func:`prune_attattr.models.prepare`) applies them to the intermediate activations.

Every forward here passes the control through a context variable: ``with controlled(control): ...``
makes it the :func:`active_control` that the attention function (when no ``attention_control``
keyword is given), DeBERTa's attention hook (:mod:`prune_attattr.disentangled`) and the neuron hooks
read, so no family needs its layers to forward extra keyword arguments.

Head and neuron indices in a control refer to the *current* units of a layer, i.e. positions after
pruning; :func:`prune_attattr.models.kept_heads` / :func:`prune_attattr.models.kept_neurons` map them
to the original numbers.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

ATTN_IMPLEMENTATION = "prune_attattr"

__all__ = ["ATTN_IMPLEMENTATION", "AttentionControl", "register_attention", "attention_forward", "controlled", "active_control"]


@dataclass
class AttentionControl:
    """Per-forward instructions for the ``prune_attattr`` attention function.

    Attributes:
        replace: layer -> attention probabilities ``[batch, heads, seq, seq]`` used in place of the
            computed ones (same shape, same dtype). Gradients flow into this tensor.
        connection_mask: layer -> multiplicative mask broadcastable to ``[batch, heads, seq, seq]``.
        head_mask: layer -> multiplicative mask of shape ``[heads]`` or ``[batch, heads]``
            (1 keeps a head, 0 masks it; any real value is allowed for gradients).
        record: layers whose final probabilities are stored in :attr:`recorded`; ``True`` means all.
        recorded: filled during the forward: layer -> ``[batch, heads, seq, seq]`` probabilities
            (still attached to the autograd graph).
        neuron_mask: layer -> multiplicative mask of the intermediate activations, ``[neurons]``,
            ``[batch, neurons]`` or ``[batch, seq, neurons]`` (the neuron mask of Kwon et al. 2022;
            any real value is allowed for gradients).
        neuron_replace: layer -> activations ``[batch, seq, neurons]`` used in place of the computed
            ones (integrated gradients scale them by alpha; Dai et al. 2022, Eq. 3). Applied before
            ``neuron_mask``.
        neuron_record: layers whose final activations are stored in :attr:`neuron_recorded`.
        neuron_recorded: filled during the forward: layer -> ``[batch, seq, neurons]``.
        sublayer_gate: ``(layer, "attention" | "ffn")`` -> gate of that whole sublayer, a scalar or
            ``[batch]`` (1 keeps it, 0 makes it the identity, as its structural removal does; any real
            value is allowed for gradients). Applied by hooks that :func:`prune_attattr.models.prepare`
            installs where the family table's :class:`~prune_attattr.families.Sublayer` says.
    """

    replace: dict[int, torch.Tensor] = field(default_factory=dict)
    connection_mask: dict[int, torch.Tensor] = field(default_factory=dict)
    head_mask: dict[int, torch.Tensor] = field(default_factory=dict)
    record: set[int] | bool = False
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)
    neuron_mask: dict[int, torch.Tensor] = field(default_factory=dict)
    neuron_replace: dict[int, torch.Tensor] = field(default_factory=dict)
    neuron_record: set[int] | bool = False
    neuron_recorded: dict[int, torch.Tensor] = field(default_factory=dict)
    sublayer_gate: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    sublayer_inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def gate_sublayer(self, key: tuple[int, str], out: torch.Tensor, residual: bool) -> torch.Tensor:
        """The output of sublayer ``key`` under its gate ``g``: ``h + g (out - h)`` when ``out`` holds the
        residual (post-norm; ``h`` recorded on entry), ``g out`` when it is the update added to ``h`` (pre-norm)."""
        g = self.sublayer_gate[key]
        g = g.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1))) if g.dim() else g.to(out.dtype)
        if not residual:
            return g * out
        h = self.sublayer_inputs.pop(key)
        return h + g * (out - h)

    def touches(self, layer: int) -> bool:
        """Whether this control needs the explicit (eager) computation in ``layer``."""
        return (
            layer in self.replace
            or layer in self.connection_mask
            or layer in self.head_mask
            or self.record is True
            or (isinstance(self.record, set) and layer in self.record)
        )

    def wants_record(self, layer: int) -> bool:
        return self.record is True or (isinstance(self.record, set) and layer in self.record)

    def apply_neurons(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        """The intermediate activations ``acts [batch, seq, neurons]`` of ``layer`` after this control's
        ``neuron_replace``, ``neuron_mask`` and ``neuron_record`` (unchanged when none names the layer)."""
        if layer in self.neuron_replace:
            replacement = self.neuron_replace[layer]
            if replacement.shape != acts.shape:
                raise ValueError(
                    f"replacement activations for layer {layer} have shape {tuple(replacement.shape)}, expected {tuple(acts.shape)}"
                )
            acts = replacement
        if layer in self.neuron_mask:
            m = self.neuron_mask[layer]
            if m.dim() == 2:
                m = m[:, None, :]
            acts = acts * m.to(acts.dtype)
        if self.neuron_record is True or (isinstance(self.neuron_record, set) and layer in self.neuron_record):
            self.neuron_recorded[layer] = acts
        return acts

    def touches_neurons(self, layer: int) -> bool:
        """Whether this control changes or records the feed-forward neurons of ``layer``."""
        return (
            layer in self.neuron_replace
            or layer in self.neuron_mask
            or self.neuron_record is True
            or (isinstance(self.neuron_record, set) and layer in self.neuron_record)
        )


_ACTIVE: ContextVar[AttentionControl | None] = ContextVar("prune_attattr_attention_control", default=None)


@contextlib.contextmanager
def controlled(control: AttentionControl | None):
    """Make ``control`` the :func:`active_control` inside the block (for hooks that get no keyword argument)."""
    token = _ACTIVE.set(control)
    try:
        yield control
    finally:
        _ACTIVE.reset(token)


def active_control() -> AttentionControl | None:
    """The control set by the innermost :func:`controlled` block, or None."""
    return _ACTIVE.get()


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attention_control: AttentionControl | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for one layer, optionally read or changed by an :class:`AttentionControl`.

    Args:
        module: the self-attention module (has ``layer_idx``).
        query, key, value: ``[batch, heads, seq, head_dim]``.
        attention_mask: additive float mask broadcastable to ``[batch, heads, seq, seq]`` or None.
        scaling: multiplier of ``Q K^T``; default ``head_dim ** -0.5``.
        dropout: attention-probability dropout (only used in training mode).
        attention_control: see the module docstring; default: :func:`active_control`.

    Returns:
        ``(output [batch, seq, heads, head_dim], probabilities [batch, heads, seq, seq] or None)``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    layer = getattr(module, "layer_idx", None)
    ctrl = attention_control if attention_control is not None else _ACTIVE.get()
    if ctrl is None or layer is None or not ctrl.touches(layer):
        if attention_mask is not None and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout if module.training else 0.0,
            scale=scaling,
        )
        return out.transpose(1, 2).contiguous(), None

    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if layer in ctrl.replace:
        replacement = ctrl.replace[layer]
        if replacement.shape != probs.shape:
            raise ValueError(
                f"replacement attention for layer {layer} has shape {tuple(replacement.shape)}, "
                f"expected {tuple(probs.shape)}"
            )
        probs = replacement
    if layer in ctrl.connection_mask:
        probs = probs * ctrl.connection_mask[layer]
    if layer in ctrl.head_mask:
        hm = ctrl.head_mask[layer]
        hm = hm.view(1, -1, 1, 1) if hm.dim() == 1 else hm.view(hm.shape[0], -1, 1, 1)
        probs = probs * hm.to(probs.dtype)
    if ctrl.wants_record(layer):
        ctrl.recorded[layer] = probs
    probs_dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs_dropped, value)
    return out.transpose(1, 2).contiguous(), probs


_REGISTERED = False


def register_attention() -> str:
    """Register the ``prune_attattr`` attention and mask functions with transformers (idempotent).

    Returns:
        The implementation name to pass as ``attn_implementation`` or to ``set_attn_implementation``.
    """
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
        _REGISTERED = True
    return ATTN_IMPLEMENTATION
