"""Every encoder family of the family table, on tiny random models built in code.

Per family: AttAttr fast == reference == a plain loop over alphas; the importance baselines against
their definitions; pruned == masked logits (a whole layer included); save/reload == original with
prune_attattr and with stock transformers alone; ONNX == PyTorch. Refused types give one line.
"""

import copy

import pytest
import torch
from accelerate import Accelerator
from conftest import FAMILY_KINDS, NO_SEGMENTS, load_with_stock_transformers, tiny_batch, tiny_config, tiny_model

from prune_attattr import AttentionControl, attention_attribution, load_classifier, load_pruned, prune_heads, save_pruned
from prune_attattr import importance as imp
from prune_attattr.deploy.onnx_export import check_onnx, export_onnx_folder
from prune_attattr.importance.attattr import quadrature_nodes
from prune_attattr.models import ModelError, forward_logits, input_names, kept_heads, prepare
from prune_attattr.tasks import Encoded, make_dataloader

PRUNE = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}  # layer 1 loses every head


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _brute_force(model, batch, layer, steps):
    """Eq. 3 written out: one example, one alpha, one forward and backward at a time."""
    alphas, weights = quadrature_nodes(steps)
    out = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        one = {k: v[b : b + 1, :n] for k, v in batch.items() if k != "labels"}
        rec = AttentionControl(record=True)
        with torch.no_grad():
            target = forward_logits(model, one, rec).argmax(-1)
        probs = rec.recorded[layer].detach()
        total = torch.zeros_like(probs)
        for a, w in zip(alphas.tolist(), weights.tolist()):
            scaled = (a * probs).requires_grad_(True)
            logits = forward_logits(model, one, AttentionControl(replace={layer: scaled}))
            p = torch.softmax(logits, -1)[0, target]
            (g,) = torch.autograd.grad(p.sum(), scaled)
            total += w * g
        attr = torch.zeros(probs.shape[1], *batch["input_ids"].shape[1:2] * 2)
        attr[:, :n, :n] = (probs * total)[0]
        out.append(attr)
    return torch.stack(out)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_attribution_fast_reference_brute_force(kind):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind, batch=3)
    fast = attention_attribution(model, batch, steps=3, mode="fast")
    ref = attention_attribution(model, batch, steps=3, mode="reference")
    assert fast.abs().max() > 1e-3  # far from the silent zeros of an ignored control
    assert torch.allclose(fast, ref, atol=1e-5), float((fast - ref).abs().max())
    for layer in (0, 2):  # a middle layer and the last ([CLS]-only) layer
        brute = _brute_force(model, batch, layer, 3)
        assert torch.allclose(fast[:, layer], brute, atol=1e-5), float((fast[:, layer] - brute).abs().max())


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_feed_forward_split_is_the_layer(kind, monkeypatch):
    """The fast path's linearised feed-forward input (``_ScaledTargetLayer``) is exact with non-trivial norms:
    the family's split recomposes the layer, and the attribution matches the per-alpha path and Eq. 3."""
    from prune_attattr import models
    from prune_attattr.models import encoder_layers, feed_forward_split, layer_from_attention_output

    model = tiny_model(kind)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random init leaves every norm at gamma 1, beta 0, which would hide a misplaced gamma or beta
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                if mod.bias is not None:
                    mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    x, attn_out = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    for layer in encoder_layers(model):
        split = feed_forward_split(layer)
        assert split is not None, kind
        with torch.no_grad():
            s = x + attn_out
            recomposed = split.rest(split.first(split.norm(s)), split.norm(s), s)
            assert torch.allclose(recomposed, layer_from_attention_output(layer, attn_out, x), atol=1e-6)
    batch = tiny_batch(kind=kind, batch=3)
    fast = attention_attribution(model, batch, steps=4, mode="fast")
    monkeypatch.setattr(models, "feed_forward_split", lambda layer: None)
    per_alpha = attention_attribution(model, batch, steps=4, mode="fast")
    assert fast.abs().max() > 1e-3
    assert torch.allclose(fast, per_alpha, atol=1e-5), float((fast - per_alpha).abs().max())
    brute = _brute_force(model, batch, 0, 4)
    assert torch.allclose(fast[:, 0], brute, atol=1e-5), float((fast[:, 0] - brute).abs().max())


def _loader(model, batch, accelerator, batch_size=2):
    keep = batch["attention_mask"].bool()
    ids = [row[m].tolist() for row, m in zip(batch["input_ids"], keep)]
    types = [row[m].tolist() for row, m in zip(batch["token_type_ids"], keep)] if "token_type_ids" in batch else None
    pad = model.config.pad_token_id or 0
    return accelerator.prepare(make_dataloader(Encoded(ids, types, batch["labels"].tolist()), batch_size=batch_size, pad_id=pad))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_importance_methods(kind, accelerator):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind, batch=6, seq=9)
    with torch.no_grad():
        batch["labels"] = forward_logits(model, batch).argmax(-1)  # unpruned accuracy 100%
    loader = _loader(model, batch, accelerator, 3)
    scores = {
        "attattr": imp.attattr_importance(model, loader, accelerator, steps=3, description=None),
        "taylor": imp.taylor_importance(model, loader, accelerator, description=None),
        "accuracy_difference": imp.accuracy_difference_importance(model, loader, accelerator, description=None),
        "attention": imp.attention_importance(model, loader, accelerator, description=None),
        "random": imp.random_importance(model),
    }
    for name, s in scores.items():
        assert s.shape == (3, 4), name
        assert torch.isfinite(s).all(), name
    for name in ("attattr", "taylor", "attention"):
        assert scores[name].abs().sum() > 0, name
    # accuracy difference of two heads (one in the last, [CLS]-only layer) by masking the whole model
    for layer, head in ((0, 2), (2, 1)):
        hm = torch.ones(4)
        hm[head] = 0
        with torch.no_grad():
            masked = forward_logits(model, batch, AttentionControl(head_mask={layer: hm}))
            base = forward_logits(model, batch)
        drop = 1.0 - float((masked.argmax(-1) == batch["labels"]).float().mean())
        loss_up = float(torch.nn.functional.cross_entropy(masked, batch["labels"]) - torch.nn.functional.cross_entropy(base, batch["labels"]))
        assert abs(float(scores["accuracy_difference"][layer, head]) - (drop + 1e-6 * loss_up)) < 5e-8  # float32 spacing at 1/6


def _masked_logits(model, batch, heads):
    n = model.config.num_attention_heads
    hm = {layer: torch.tensor([0.0 if h in hs else 1.0 for h in range(n)]) for layer, hs in heads.items()}
    with torch.no_grad():
        return forward_logits(model, batch, AttentionControl(head_mask=hm))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_pruned_equals_masked(kind):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind)
    for heads in (PRUNE, {2: [0, 1, 2, 3]}):
        pruned = prune_heads(copy.deepcopy(model), heads)
        with torch.no_grad():
            got = forward_logits(pruned, batch)
        want = _masked_logits(model, batch, heads)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        assert not torch.allclose(got, forward_logits(model, batch).detach(), atol=1e-4)
    # attributions of the pruned model: kept heads only, zeros where heads were removed
    pruned = prune_heads(copy.deepcopy(model), PRUNE)
    attr = attention_attribution(pruned, batch, steps=2)
    assert attr[:, 1].abs().max() == 0 and attr[:, 0, [1, 3]].abs().max() == 0
    assert attr[:, 0, [0, 2]].abs().max() > 0


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_save_reload_and_onnx(kind, tmp_path):
    model = prune_heads(tiny_model(kind), PRUNE)
    batch = tiny_batch(kind=kind)
    save_pruned(model, tmp_path / "model")
    for name in ("model.safetensors", "config.json", "modeling_pruned.py"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o044 == 0o044, name  # readable by others
    for loader in (load_pruned, load_classifier):
        again = loader(tmp_path / "model")
        assert kept_heads(again) == kept_heads(model)
        with torch.no_grad():
            assert torch.allclose(forward_logits(again, batch), forward_logits(model, batch), atol=1e-6)
    onnx = export_onnx_folder(model, tmp_path / "onnx", tiny_batch(kind=kind, batch=2, seq=7))
    assert (tmp_path / "onnx" / "config.json").is_file()
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx))
    assert [i.name for i in graph.graph.input] == list(input_names(model))
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert ("token_type_ids" in input_names(model)) == (kind not in NO_SEGMENTS)
    batches = [tiny_batch(seed=s, batch=b, seq=t, kind=kind) for s, b, t in ((2, 1, 5), (3, 5, 19), (4, 3, 11))]
    assert check_onnx(model, onnx, batches) <= 1e-4


def test_stock_transformers_loads_every_family_without_prune_attattr(tmp_path):
    folders, want = [], {}
    for kind in FAMILY_KINDS:
        model = prune_heads(tiny_model(kind), PRUNE)
        batch = tiny_batch(kind=kind)
        batch = {k: batch[k] for k in input_names(model)}
        folder = str(tmp_path / kind)
        save_pruned(model, folder)
        torch.save(batch, folder + "/batch.pt")
        with torch.no_grad():
            want[folder] = forward_logits(model, batch)
        folders.append(folder)
    got = load_with_stock_transformers(folders, tmp_path)
    for folder in folders:
        diff = float((torch.tensor(got[folder]["logits"]) - want[folder]).abs().max())
        assert diff <= 1e-5, (folder, diff)


@pytest.mark.parametrize(
    "kind, message",
    [("albert", "shares one layer's weights"), ("gpt2", "supported: bert, camembert, deberta-v2")],
)
def test_refused_types_give_one_line(kind, message, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(kind).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=message) as err:
        load_classifier(tmp_path)
    assert "\n" not in str(err.value)


def test_deberta_with_convolution_refused(tmp_path):
    """deberta-v2-xlarge's convolution beside the first layer is outside the hook: one line, not wrong numbers."""
    config = tiny_config("deberta-v2")
    config.conv_kernel_size = 3
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="conv_kernel_size=3") as err:
        load_classifier(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["deberta-v2", "deberta-v2-separate"])
def test_deberta_hook_equals_stock_attention(kind):
    """The hook computes DeBERTa's own probabilities and logits (stock module = reference), pruned or not,
    and the own position projections of DeBERTa-v2 (``pos_key_proj``/``pos_query_proj``) lose the pruned rows."""
    stock = tiny_model(kind)  # never prepared: stock DisentangledSelfAttention
    ours = copy.deepcopy(stock)
    prepare(ours)
    batch = tiny_batch(kind="bert" if kind == "deberta-v2-separate" else kind)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = stock(**inputs, output_attentions=True)
        got = ours(**inputs, output_attentions=True)
    assert type(ours.deberta.encoder.layer[0].attention.self).__name__.startswith("Controlled")
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    keep = inputs["attention_mask"].bool()
    for a, b in zip(got.attentions, want.attentions):  # real (unpadded) query rows
        assert torch.allclose(a.permute(0, 2, 1, 3)[keep], b.permute(0, 2, 1, 3)[keep], atol=1e-6)
    pruned = prune_heads(copy.deepcopy(ours), PRUNE)
    attn = pruned.deberta.encoder.layer[0].attention.self
    for name in ("query_proj", "key_proj", "value_proj") + (("pos_key_proj", "pos_query_proj") if kind.endswith("separate") else ()):
        assert getattr(attn, name).out_features == 2 * attn.attention_head_size, name
    stock_pruned = prune_heads(copy.deepcopy(ours), PRUNE)
    for layer in stock_pruned.deberta.encoder.layer:  # back to the stock module, same weights
        if hasattr(layer.attention.self, "query_proj"):
            layer.attention.self.__class__ = type(stock.deberta.encoder.layer[0].attention.self)
    with torch.no_grad():
        assert torch.allclose(pruned(**inputs).logits, stock_pruned(**inputs).logits, atol=1e-5)


def test_deberta_hook_edge_cases(tmp_path):
    """Relative attention off (the score scale still counts pos_att_type, as stock does), a float 0/1
    attention mask (still a mask, not an additive bias), and a switched model that pickles and reloads."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("deberta-v2")
    config.relative_attention = False
    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_config(config).eval()
    ours = copy.deepcopy(stock)
    prepare(ours)
    inputs = {k: v for k, v in tiny_batch(kind="deberta-v2").items() if k != "labels"}
    floats = {**inputs, "attention_mask": inputs["attention_mask"].float()}
    with torch.no_grad():
        want = stock(**inputs).logits
        for got in (ours(**inputs).logits, ours(**floats).logits, forward_logits(ours, floats)):
            assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    torch.save(ours, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, ours(**inputs).logits)


def test_modernbert_mean_pooling_refused():
    model = tiny_model("modernbert")
    model.config.classifier_pooling = "mean"
    with pytest.raises(ModelError, match="classifier_pooling='mean'"):
        prepare(model)


def test_stock_loaded_model_is_switched_not_zero(tmp_path):
    """A model loaded by stock transformers (sdpa attention) gives the same attributions, never zeros."""
    from transformers import AutoModelForSequenceClassification

    ours = tiny_model("bert")
    batch = tiny_batch()
    ours.save_pretrained(tmp_path)
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert stock.config._attn_implementation != "prune_attattr"
    want = attention_attribution(ours, batch, steps=3)
    got = attention_attribution(stock, batch, steps=3)
    assert got.abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_scores_in_float32(dtype, tmp_path):
    model = tiny_model("roberta")
    model.to(dtype).save_pretrained(tmp_path)
    loaded = load_classifier(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    reference = tiny_model("roberta").to(dtype).float()  # the same rounded weights, computed in float32
    batch = tiny_batch(kind="roberta")
    with torch.no_grad():
        assert torch.allclose(forward_logits(loaded, batch), forward_logits(reference, batch), atol=1e-6)
    attr = attention_attribution(loaded, batch, steps=3)
    assert attr.dtype == torch.float32 and torch.isfinite(attr).all() and attr.abs().max() > 1e-3
    with pytest.raises(ModelError, match="call model.float"):
        attention_attribution(tiny_model("roberta").to(dtype), batch, steps=3)


def test_untrained_head_refused_when_asked(tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(tmp_path)  # encoder only, no classifier
    load_classifier(tmp_path, num_labels=2)  # fine before fine-tuning
    with pytest.raises(ModelError, match="no trained classification head"):
        load_classifier(tmp_path, num_labels=2, require_trained_head=True)


def test_onnx_inputs_follow_the_tokenizer(tmp_path):
    """A BERT whose tokenizer gives no segment ids: the graph takes input_ids and attention_mask only."""
    model = tiny_model("bert")
    example = {k: v for k, v in tiny_batch(batch=2, seq=7).items() if k != "token_type_ids"}
    path = export_onnx_folder(model, tmp_path, example)
    import onnx as onnx_lib

    assert [i.name for i in onnx_lib.load(str(path)).graph.input] == ["input_ids", "attention_mask"]
    batches = [{k: v for k, v in tiny_batch(seed=s).items() if k != "token_type_ids"} for s in (2, 3)]
    assert check_onnx(model, path, batches) <= 1e-4


def test_classifier_for_other_labels_is_replaced_before_fine_tuning(tmp_path):
    tiny_model("bert", labels=3).save_pretrained(tmp_path)
    model = load_classifier(tmp_path, id2label={0: "neg", 1: "pos"})
    assert forward_logits(model, tiny_batch()).shape == (4, 2)
