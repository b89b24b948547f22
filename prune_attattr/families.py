"""The one table of encoder families: where each architecture keeps what head and neuron pruning touch.

In the spirit of TextPruner's structure table (Yang et al. 2022): every other module (running layer
by layer, attention control, AttAttr's fast path, structural pruning, checkpoint and ONNX export)
talks to a :class:`Family` only, so adding an encoder family is one entry here plus its tests.

Paths are dotted attribute paths:

* ``layers``: from the classifier to the ``nn.ModuleList`` of encoder layers;
* ``attention``: from a layer to the module that calls the transformers attention interface
  (it carries ``layer_idx`` and the head bookkeeping);
* ``query``/``key``/``value`` or ``fused_qkv``: projections inside the attention module (a fused
  projection holds Q, K and V as three consecutive ``[heads * head_dim]`` row blocks, ModernBERT's ``Wqkv``);
* ``output``: from a layer to the attention output projection (whose input columns are the heads);
* ``ffn_in``/``ffn_out``: from a layer to the feed-forward block's first linear map (its output rows are
  the intermediate neurons; with ``glu``, two row blocks ``[x; gate]`` of ``intermediate_size`` each,
  ModernBERT's ``Wi``) and second linear map (its input columns are the neurons). The input of
  ``ffn_out`` is the intermediate activations: neuron masks and attributions act there.

What cannot be a path (embeddings, finishing a layer from its attention context, the classification
head) is a small function per family. Every family but DeBERTa-v2 is on the transformers 5 attention
interface; DeBERTa-v2's disentangled attention gets its own hook (``install``, :mod:`prune_attattr.disentangled`).
All classification heads read position 0 ([CLS]/<s>) only.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["PRUNED_HEADS_KEY", "PRUNED_NEURONS_KEY", "REMOVED_SUBLAYERS_KEY", "SUBLAYERS", "ModelError", "Family", "FeedForwardSplit", "Sublayer", "FAMILIES", "REFUSED", "UnsupportedModel", "family_for_type", "family_of", "get_path", "set_path", "mask_channel", "layers_path"]


PRUNED_HEADS_KEY = "prune_attattr_pruned_heads"  # config key: {layer: [original head indices]} removed
PRUNED_NEURONS_KEY = "prune_attattr_pruned_neurons"  # config key: {layer: [original neuron indices]} removed
REMOVED_SUBLAYERS_KEY = "prune_attattr_removed_sublayers"  # config key: {layer: ["attention", "ffn"]} bypassed
SUBLAYERS = ("attention", "ffn")  # the two sublayers of an encoder layer, in order


class ModelError(ValueError):
    """A model path, type or configuration this tool cannot use (message says which and what to do)."""


UnsupportedModel = ModelError  # a model type or configuration no family entry handles


def get_path(root: nn.Module, path: str):
    """``root.a.b.c`` for ``path="a.b.c"`` (empty path: ``root``)."""
    return operator.attrgetter(path)(root) if path else root


def set_path(root: nn.Module, path: str, value) -> None:
    """Set ``root.a.b.c = value`` for ``path="a.b.c"``."""
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent), name, value)


# ---- per-family pieces that are code, not paths ------------------------------------------------


def _bert_embed(model, base, batch):
    kwargs = {"input_ids": batch["input_ids"]}
    if batch.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    hidden = base.embeddings(**kwargs)
    project = getattr(base, "embeddings_project", None)  # ELECTRA with embedding_size != hidden_size
    return project(hidden) if project is not None else hidden


def _distilbert_embed(model, base, batch):
    return base.embeddings(batch["input_ids"])


def _modernbert_embed(model, base, batch):
    return base.embeddings(input_ids=batch["input_ids"])


def _bert_finish(layer, attn_out, residual):
    """BERT-style post-norm layer: ``LN(residual + dropout(W_O ctx))`` then the feed-forward block."""
    out = layer.attention.output.LayerNorm(layer.attention.output.dropout(attn_out) + residual)
    return layer.output(layer.intermediate(out), out)


def _distilbert_finish(layer, attn_out, residual):
    out = layer.sa_layer_norm(attn_out + residual)
    return layer.output_layer_norm(layer.ffn(out) + out)


def _modernbert_finish(layer, attn_out, residual):
    """Pre-norm layer: ``h = x + W_O ctx``, then ``h + MLP(LN(h))``."""
    hidden = residual + attn_out
    return hidden + layer.mlp(layer.mlp_norm(hidden))


@dataclass(frozen=True)
class FeedForwardSplit:
    """An encoder layer after its attention output, split at the feed-forward block's first linear map
    and at its intermediate activations (the feed-forward neurons).

    With ``s = residual + attn_out`` (what the layer's ``finish`` starts from):
    ``finish(layer, attn_out, residual) == second(activate(first(norm(s))), norm(s), s)``.

    Attributes:
        norm: the ``nn.LayerNorm`` in front of the feed-forward block (post-norm: the attention
            block's norm; pre-norm: the feed-forward's own).
        first: the feed-forward's first ``nn.Linear`` (hidden -> intermediate, GLU: 2 x intermediate).
        activate: ``pre [N, T, F] -> acts [N, T, I]``: the activation function (GLU: ``act(x) * gate``
            of the two halves), i.e. the intermediate activations whose channels are the neurons.
        second: ``(acts [N, T, I], normed [N, T, hidden], summed [N, T, hidden]) -> [N, T, hidden]``: the
            layer from the intermediate activations on (second linear map, residual, norm).
    """

    norm: nn.Module
    first: nn.Module
    activate: Callable
    second: Callable

    def rest(self, pre: torch.Tensor, normed: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        """The layer from ``first``'s output ``pre [N, T, F]`` on: ``second(activate(pre), normed, summed)``."""
        return self.second(self.activate(pre), normed, summed)


def _bert_split(layer):
    return FeedForwardSplit(
        layer.attention.output.LayerNorm,
        layer.intermediate.dense,
        layer.intermediate.intermediate_act_fn,
        lambda acts, normed, summed: layer.output(acts, normed),
    )


def _distilbert_split(layer):
    ffn = layer.ffn
    return FeedForwardSplit(
        layer.sa_layer_norm,
        ffn.lin1,
        ffn.activation,
        lambda acts, normed, summed: layer.output_layer_norm(ffn.dropout(ffn.lin2(acts)) + normed),
    )


def _modernbert_split(layer):
    mlp = layer.mlp

    def activate(pre):
        x, gate = pre.chunk(2, dim=-1)
        return mlp.act(x) * gate

    return FeedForwardSplit(layer.mlp_norm, mlp.Wi, activate, lambda acts, normed, summed: summed + mlp.Wo(mlp.drop(acts)))


def _modernbert_attn_input(layer, hidden):
    return layer.attn_norm(hidden)


_ROPE_CACHE: dict[int, tuple[object, nn.Module]] = {}


def _modernbert_rotate(layer, query, key, q_positions, k_positions):
    """Rotary embedding of ``query``/``key`` ``[N, heads, T, d]`` at the given positions, as ModernBERT does.

    The layer's own type of rotary frequencies (global or local theta) is used.
    """
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding, apply_rotary_pos_emb

    config = layer.config
    cached = _ROPE_CACHE.get(id(config))
    if cached is None or cached[0] is not config:
        cached = (config, ModernBertRotaryEmbedding(config))
        _ROPE_CACHE[id(config)] = cached
    rope = cached[1].to(query.device)
    cos_q, sin_q = rope(query, q_positions.view(1, -1), layer.attention_type)
    cos_k, sin_k = rope(key, k_positions.view(1, -1), layer.attention_type)
    q, _ = apply_rotary_pos_emb(query, query, cos_q, sin_q, unsqueeze_dim=1)
    _, k = apply_rotary_pos_emb(key, key, cos_k, sin_k, unsqueeze_dim=1)
    return q, k


def _modernbert_call(model, base, layer, hidden, masks):
    """One ModernBERT layer: its mask (global or sliding window) and rotary embedding of its type."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1)
    pe = base.rotary_emb(hidden, positions, layer.attention_type)
    mask = None if masks is None else masks[:, _mask_channel(layer) : _mask_channel(layer) + 1]
    return layer(hidden, attention_mask=mask, position_embeddings=pe)


def _mask_channel(layer) -> int:
    """Channel of the packed mask ``[B, 2, T, T]``: 0 global attention, 1 sliding window."""
    return 1 if getattr(layer, "attention_type", "full_attention") == "sliding_attention" else 0


def _deberta_embed(model, base, batch):
    """DeBERTa's embeddings also zero padded positions (``mask=``), as its own forward does."""
    kwargs = {"input_ids": batch["input_ids"], "mask": batch.get("attention_mask")}
    if batch.get("token_type_ids") is not None and base.embeddings.token_type_embeddings is not None:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return base.embeddings(**kwargs)


def _deberta_call(model, base, layer, hidden, mask):
    """One DeBERTa layer with the encoder's relative embeddings."""
    keep = None if mask is None else mask == 0  # embed()'s additive mask -> DeBERTa's 0/1 form
    return layer(hidden, keep, rel_embeddings=base.encoder.get_rel_embedding())


def _deberta_bias(model, base, layer, query, key, q_positions, k_positions):
    from .disentangled import relative_bias

    attn = layer.attention.self
    return relative_bias(attn, query, key, q_positions, k_positions, base.encoder.get_rel_embedding())


def _deberta_scaling(attn):
    from .disentangled import score_scale

    return score_scale(attn)


def _deberta_install(attn):
    from .disentangled import install

    install(attn)


def _deberta_head(model, base, hidden):
    return model.classifier(model.dropout(model.pooler(hidden)))  # ContextPooler reads [:, 0]


def _deberta_check(config) -> None:
    if getattr(config, "conv_kernel_size", 0) > 0:
        raise UnsupportedModel(
            f"DeBERTa-v2 with conv_kernel_size={config.conv_kernel_size} (a convolution beside the first layer, "
            "as in deberta-v2-xlarge) is not supported; DeBERTa-v3 and deberta-v2 models without it are"
        )


def _bert_head(model, base, hidden):
    pooler = getattr(base, "pooler", None)
    if pooler is None:
        raise UnsupportedModel(
            f"{type(model).__name__} has no pooler (add_pooling_layer=False); its classifier cannot run"
        )
    return model.classifier(model.dropout(pooler(hidden)))


def _roberta_head(model, base, hidden):
    return model.classifier(hidden)  # RobertaClassificationHead / ElectraClassificationHead read [:, 0]


def _distilbert_head(model, base, hidden):
    pooled = torch.relu(model.pre_classifier(hidden[:, 0]))
    return model.classifier(model.dropout(pooled))


def _modernbert_head(model, base, hidden):
    hidden = base.final_norm(hidden)
    return model.classifier(model.drop(model.head(hidden[:, 0])))


def _modernbert_check(config) -> None:
    if getattr(config, "classifier_pooling", "cls") != "cls":
        raise UnsupportedModel(
            f"ModernBERT with classifier_pooling='{config.classifier_pooling}' is not supported: the attribution "
            "fast path and head masking assume a head that reads [CLS] only; use a model with classifier_pooling='cls'"
        )


@dataclass(frozen=True)
class Sublayer:
    """Where one sublayer of an encoder layer (its attention block or its feed-forward block, with the
    residual connection and norm that belong to it) begins and ends, and how it is removed.

    A removed sublayer is the identity: the layer's hidden states pass it unchanged (CoFi, Xia et al.
    2022, section 3.1, removes whole multi-head-attention and feed-forward layers the same way). Its gate
    ``g`` (1 keeps it, 0 removes it) is, for scoring:

    * post-norm (``residual=True``): the sublayer maps ``h`` to ``y = LN(h + f(h))``; gated,
      ``y' = h + g (y - h)``;
    * pre-norm (``residual=False``): the layer adds the sublayer's update ``d = f(LN(h))`` to ``h``;
      gated, ``h + g d``.

    Attributes:
        enter: path from the layer to the module whose first input (or ``hidden_states``) is the
            sublayer's input ``h`` (``""``: the layer itself); None for pre-norm sublayers.
        exit: path to the module whose output (its first element, if a tuple) is ``y`` (post-norm) or ``d`` (pre-norm).
        bypass: path to the module that removal replaces.
        kind: ``"residual"``: the bypass module is called ``(hidden, input_tensor)`` and adds the residual
            itself (BERT's ``BertSelfOutput``/``BertOutput``): replaced by one returning ``input_tensor``;
            ``"zero"``: the bypass module's output is added to ``h`` by the layer: replaced by one returning
            0 (``(0, None)`` when ``pair``), and ``norm`` by the identity.
        norm: for ``"zero"``: the norm applied to ``h + output`` (post-norm) or to the sublayer's input (pre-norm).
        pair: the bypass module returns ``(output, attention weights)``.
    """

    exit: str
    bypass: str
    kind: str
    enter: str | None = None
    norm: str | None = None
    pair: bool = False

    @property
    def residual(self) -> bool:
        """Whether ``exit``'s output already holds the residual (post-norm): see the class docstring."""
        return self.enter is not None


@dataclass(frozen=True)
class Family:
    """How one encoder family is laid out (see the module docstring for the path conventions).

    Attributes:
        name: the family's name (its first ``model_type``).
        model_types: ``config.model_type`` values served by this entry.
        layers, attention, query, key, value, fused_qkv, output: dotted paths (see module docstring).
        embed: ``(model, base, batch) -> hidden [B, T, hidden]`` (embeddings incl. any projection).
        finish: ``(layer, attn_out [N, T, hidden], residual [N, T, hidden]) -> [N, T, hidden]``: the layer
            after its attention output projection (residual, norms, feed-forward).
        head: ``(model, base, last_hidden [N, T>=1, hidden]) -> logits [N, labels]``.
        attn_input: ``(layer, hidden) -> hidden`` fed to Q/K/V (a pre-norm, or identity).
        logits_layer: path from the classifier to its final ``nn.Linear`` (rows = classes).
        token_type_ids: whether the model takes segment ids (and ONNX exports them as an input).
        cls_only: whether the classification head reads position 0 only (AttAttr's fast path relies on it).
        sliding_window: layers may use local (sliding-window) attention: the mask is packed as
            ``[B, 2, T, T]`` (global, sliding) and each layer takes its channel (:func:`mask_channel`).
        rotate: ``(layer, q, k, q_positions, k_positions) -> (q, k)``: rotary position embedding, if any.
        call_layer: ``(model, base, layer, hidden, mask) -> hidden``: one whole layer, when the layer
            needs more than ``layer(hidden, mask)`` (the control is the context's, :func:`prune_attattr.attention.controlled`).
        extra_proj: further projections inside the attention module whose output rows are per head
            (DeBERTa's ``pos_key_proj``/``pos_query_proj``), pruned like Q/K/V where the model has them.
        score_bias: ``(model, base, layer, q, k, q_positions, k_positions) -> [N, heads, T_q, T_k]`` additive
            scores besides ``Q K^T`` (DeBERTa's relative-position terms), or None.
        scaling: ``(attention module) -> float``, the multiplier of ``Q K^T`` (default ``head_dim ** -0.5``).
        install: ``(attention module) -> None``: puts the family's own attention hook in place, for a
            family whose attention module does not call the transformers attention interface.
        ffn_split: ``(layer) -> FeedForwardSplit``: the layer after its attention output split at the
            feed-forward's first linear map (AttAttr's fast path applies that map once per group of
            rows instead of once per alpha step), or None.
        ffn_in, ffn_out, glu: where the feed-forward neurons live (see the module docstring).
        intermediate_key: the config attribute holding the number of neurons per layer.
        additive_mask: the layers take the eager additive mask ``[B, 1, T, T]`` built from the padding
            mask (a family whose attention does not go through the transformers mask interface).
        sublayers: ``{"attention": Sublayer, "ffn": Sublayer}``: where each whole sublayer begins and
            ends and how it is removed (:class:`Sublayer`, :mod:`prune_attattr.prune.sublayers`).
        check: raises :class:`UnsupportedModel` for a configuration of the family that is not handled.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    output: str
    embed: Callable
    finish: Callable
    head: Callable
    logits_layer: str = "classifier"
    query: str | None = None
    key: str | None = None
    value: str | None = None
    fused_qkv: str | None = None
    attn_input: Callable | None = None
    token_type_ids: bool = True
    cls_only: bool = True
    sliding_window: bool = False
    rotate: Callable | None = None
    call_layer: Callable | None = None
    extra_proj: tuple[str, ...] = ()
    score_bias: Callable | None = None
    scaling: Callable | None = None
    install: Callable | None = None
    ffn_split: Callable | None = None
    ffn_in: str | None = None
    ffn_out: str | None = None
    glu: bool = False
    intermediate_key: str = "intermediate_size"
    additive_mask: bool = False
    sublayers: dict = field(default_factory=dict, compare=False)
    check: Callable | None = field(default=None, compare=False)

    @property
    def output_inside_attention(self) -> bool:
        """Whether the output projection belongs to the attention module (replaced with it when all heads go)."""
        return self.output.startswith(self.attention + ".")

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model's tokenizer inputs, in ONNX input order."""
        return ("input_ids", "attention_mask", "token_type_ids") if self.token_type_ids else ("input_ids", "attention_mask")


_BERT_SUBLAYERS = {
    "attention": Sublayer(enter="attention", exit="attention", bypass="attention.output", kind="residual"),
    "ffn": Sublayer(enter="intermediate", exit="output", bypass="output", kind="residual"),
}
_BERT_LIKE = dict(attention="attention.self", query="query", key="key", value="value", output="attention.output.dense", finish=_bert_finish, ffn_split=_bert_split,
                  ffn_in="intermediate.dense", ffn_out="output.dense", sublayers=_BERT_SUBLAYERS)

FAMILIES: dict[str, Family] = {}
for _fam in (
    Family("bert", ("bert",), layers="bert.encoder.layer", embed=_bert_embed, head=_bert_head, **_BERT_LIKE),
    Family(
        "roberta",
        ("roberta", "xlm-roberta", "camembert"),
        layers="<prefix>.encoder.layer",
        embed=_bert_embed,
        head=_roberta_head,
        logits_layer="classifier.out_proj",
        token_type_ids=False,
        **_BERT_LIKE,
    ),
    Family(
        "electra",
        ("electra",),
        layers="electra.encoder.layer",
        embed=_bert_embed,
        head=_roberta_head,
        logits_layer="classifier.out_proj",
        **_BERT_LIKE,
    ),
    Family(
        "distilbert",
        ("distilbert",),
        layers="distilbert.transformer.layer",
        attention="attention",
        query="q_lin",
        key="k_lin",
        value="v_lin",
        output="attention.out_lin",
        embed=_distilbert_embed,
        finish=_distilbert_finish,
        head=_distilbert_head,
        ffn_split=_distilbert_split,
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        intermediate_key="hidden_dim",
        sublayers={
            "attention": Sublayer(enter="", exit="sa_layer_norm", bypass="attention", kind="zero", norm="sa_layer_norm", pair=True),
            "ffn": Sublayer(enter="ffn", exit="output_layer_norm", bypass="ffn", kind="zero", norm="output_layer_norm"),
        },
        token_type_ids=False,
    ),
    Family(
        "modernbert",
        ("modernbert",),
        layers="model.layers",
        attention="attn",
        fused_qkv="Wqkv",
        output="attn.Wo",
        embed=_modernbert_embed,
        finish=_modernbert_finish,
        head=_modernbert_head,
        ffn_split=_modernbert_split,
        ffn_in="mlp.Wi",
        ffn_out="mlp.Wo",
        glu=True,
        sublayers={
            "attention": Sublayer(exit="attn", bypass="attn", kind="zero", norm="attn_norm", pair=True),
            "ffn": Sublayer(exit="mlp", bypass="mlp", kind="zero", norm="mlp_norm"),
        },
        attn_input=_modernbert_attn_input,
        token_type_ids=False,
        sliding_window=True,
        rotate=_modernbert_rotate,
        call_layer=_modernbert_call,
        check=_modernbert_check,
    ),
    Family(
        "deberta-v2",
        ("deberta-v2",),
        layers="deberta.encoder.layer",
        attention="attention.self",
        query="query_proj",
        key="key_proj",
        value="value_proj",
        extra_proj=("pos_key_proj", "pos_query_proj"),
        output="attention.output.dense",
        embed=_deberta_embed,
        finish=_bert_finish,
        head=_deberta_head,
        ffn_split=_bert_split,
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        sublayers=_BERT_SUBLAYERS,
        call_layer=_deberta_call,
        score_bias=_deberta_bias,
        scaling=_deberta_scaling,
        install=_deberta_install,
        additive_mask=True,
        check=_deberta_check,
    ),
):
    for _t in _fam.model_types:
        FAMILIES[_t] = _fam

REFUSED = {
    "albert": "ALBERT shares one layer's weights across all layers, so removing a head from one layer is ill-defined",
}


def family_for_type(model_type: str, where: str = "the model") -> Family:
    """The :class:`Family` for ``config.model_type``.

    Raises:
        UnsupportedModel: a refused type (with the reason) or an unknown one (naming the supported types).
    """
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED:
        raise UnsupportedModel(f"model type '{model_type}' of {where} is not supported: {REFUSED[model_type]}")
    raise UnsupportedModel(
        f"model type '{model_type}' of {where} is not supported; supported: {', '.join(sorted(FAMILIES))}"
    )


def family_of(model: nn.Module) -> Family:
    """The family of a sequence classifier (from ``model.config``), its configuration checked.

    Raises:
        UnsupportedModel: see :func:`family_for_type`; also a configuration the family does not handle.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModel(f"{type(model).__name__} is not a transformers model (no .config)")
    fam = family_for_type(config.model_type, type(model).__name__)
    if fam.check is not None:
        fam.check(config)
    return fam


def mask_channel(layer: nn.Module) -> int:
    """Which channel of a packed sliding-window mask ``[B, 2, T, T]`` ``layer`` uses (0 global, 1 local)."""
    return _mask_channel(layer)


def layers_path(fam: Family, model: nn.Module) -> str:
    """``fam.layers`` with ``<prefix>`` replaced by the model's ``base_model_prefix``."""
    return fam.layers.replace("<prefix>", model.base_model_prefix)
