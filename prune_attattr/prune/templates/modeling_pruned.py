"""A pruned __BASE__ written by prune-attattr; loads with stock transformers, no prune-attattr needed.

    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

``config.json`` lists the removed heads under ``prune_attattr_pruned_heads`` ({layer: [heads]},
original head indices) and the removed feed-forward neurons under ``prune_attattr_pruned_neurons``
({layer: [neurons]}, original neuron indices). This class builds the stock architecture, removes
those heads (rows of the query/key/value projections, columns of the attention output projection; a
layer with no heads left keeps only the output projection's bias) and neurons (rows of the first
feed-forward map and its bias, both halves of a gated one; columns of the second; a layer with no
neurons left keeps only the second map's bias), makes the whole sublayers listed under
``prune_attattr_removed_sublayers`` ({layer: ["attention", "ffn"]}) the identity, and from_pretrained
then loads the weights.

``config.json`` names :class:`PrunedTextClassificationPipeline` under ``custom_pipelines``, so
``pipeline("text-classification", model=folder, trust_remote_code=True)`` builds transformers' own
text-classification pipeline for this model (transformers' "share a custom pipeline" mechanism),
labels from ``config.id2label``.
"""

import operator
import warnings

import torch
from torch import nn
from transformers import TextClassificationPipeline
from transformers import __BASE__ as _Base
from transformers.pytorch_utils import prune_linear_layer

# where this family keeps its attention heads and feed-forward neurons (written from prune_attattr's family table)
STRUCTURE = __STRUCTURE__


def _get(root, path):
    return operator.attrgetter(path)(root) if path else root


def _set(root, path, value):
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, value)


class _BiasOnly(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])


class _NoHeads(nn.Module):
    def __init__(self, layer_idx, out_name=None, out=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_ids = []
        self.num_attention_heads = 0
        self._out_name = out_name
        if out_name is not None:
            setattr(self, out_name, out)

    def forward(self, hidden_states, *args, **kwargs):
        empty = hidden_states[..., :0]
        if self._out_name is not None:
            return getattr(self, self._out_name)(empty), None
        return empty, None


def _prune(model, pruned):
    s = STRUCTURE
    layers = _get(model, s["layers"])
    n = model.config.num_attention_heads
    for key, gone in pruned.items():
        layer = int(key)
        block = layers[layer]
        keep = [h for h in range(n) if h not in {int(g) for g in gone}]
        attn = _get(block, s["attention"])
        out = _get(block, s["output"])
        if not keep:
            bias = out.bias if out.bias is not None else torch.zeros(out.out_features, dtype=out.weight.dtype, device=out.weight.device)
            if s["output"].startswith(s["attention"] + "."):
                _set(block, s["attention"], _NoHeads(layer, s["output"][len(s["attention"]) + 1 :], _BiasOnly(bias)))
            else:
                _set(block, s["attention"], _NoHeads(layer))
                _set(block, s["output"], _BiasOnly(bias))
            continue
        d = getattr(attn, "attention_head_size", None) or attn.head_dim
        index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep]).to(out.weight.device)
        if s["fused_qkv"]:
            fused = torch.cat([index + part * n * d for part in range(3)])
            _set(attn, s["fused_qkv"], prune_linear_layer(_get(attn, s["fused_qkv"]), fused, dim=0))
        else:
            for name in s["qkv"]:
                if hasattr(attn, name):  # optional per-head projections (DeBERTa's pos_key_proj) may be absent
                    _set(attn, name, prune_linear_layer(_get(attn, name), index, dim=0))
        _set(block, s["output"], prune_linear_layer(out, index, dim=1))
        for count in ("num_attention_heads", "n_heads", "num_heads"):
            if hasattr(attn, count):
                setattr(attn, count, len(keep))
        if hasattr(attn, "all_head_size"):
            attn.all_head_size = d * len(keep)
        attn.head_ids = keep


def _prune_neurons(model, pruned):
    s = STRUCTURE
    layers = _get(model, s["layers"])
    n = int(getattr(model.config, s["intermediate_key"]))
    for key, gone in pruned.items():
        block = layers[int(key)]
        keep = [j for j in range(n) if j not in {int(g) for g in gone}]
        first, second = _get(block, s["ffn_in"]), _get(block, s["ffn_out"])
        index = torch.tensor(keep, dtype=torch.long, device=first.weight.device)
        rows = torch.cat([index, index + n]) if s["glu"] else index  # a gated map holds [x; gate]
        with warnings.catch_warnings():  # a layer without neurons: a first map with no rows
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            _set(block, s["ffn_in"], prune_linear_layer(first, rows, dim=0))
        if keep:
            second = prune_linear_layer(second, index, dim=1)
        else:
            bias = second.bias if second.bias is not None else torch.zeros(second.out_features, dtype=second.weight.dtype, device=second.weight.device)
            second = _BiasOnly(bias)
        second.neuron_ids = keep
        _set(block, s["ffn_out"], second)


class _Residual(nn.Module):
    """A removed sublayer whose output module took (hidden_states, input_tensor): returns input_tensor."""

    _prune_attattr_bypass = True

    def __init__(self, children):
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)

    def forward(self, hidden_states, input_tensor, *args, **kwargs):
        return input_tensor


class _Zero(nn.Module):
    """A removed sublayer whose output the layer adds to its input: returns 0 (with no attention weights)."""

    _prune_attattr_bypass = True

    def __init__(self, children, pair, **attrs):
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)
        self.pair = pair
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, *args, **kwargs):
        return (0, None) if self.pair else 0


def _remove_sublayers(model, removed):
    s = STRUCTURE
    layers = _get(model, s["layers"])
    for key, names in removed.items():
        block = layers[int(key)]
        for which in names:
            sub = s["sublayers"][which]
            old = _get(block, sub["bypass"])
            children = {name: getattr(old, name) for name in sub["keep"]}
            if sub["kind"] == "residual":
                _set(block, sub["bypass"], _Residual(children))
            else:
                attrs = {k: getattr(old, k) for k in ("head_ids", "layer_idx", "num_attention_heads") if hasattr(old, k)}
                _set(block, sub["bypass"], _Zero(children, sub["pair"], **attrs))
                _set(block, sub["norm"], nn.Identity())


class PrunedForSequenceClassification(_Base):
    """__BASE__ with the heads in ``config.prune_attattr_pruned_heads`` and the feed-forward neurons in
    ``config.prune_attattr_pruned_neurons`` removed."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _prune(self, getattr(config, "prune_attattr_pruned_heads", None) or {})
        _prune_neurons(self, getattr(config, "prune_attattr_pruned_neurons", None) or {})
        _remove_sublayers(self, getattr(config, "prune_attattr_removed_sublayers", None) or {})


class PrunedTextClassificationPipeline(TextClassificationPipeline):
    """transformers' text-classification pipeline, unchanged, for :class:`PrunedForSequenceClassification`.

    The stock pipeline checks the model's class name against the classes it lists for the task and logs
    "The model 'PrunedForSequenceClassification' is not supported for text-classification" otherwise.
    A pruned __BASE__ is a __BASE__ (a subclass with fewer heads and neurons, the same inputs and
    ``logits [batch, labels]``), so the check is made on that class.
    """

    def check_model_type(self, supported_models):
        if isinstance(self.model, _Base):
            return
        super().check_model_type(supported_models)
