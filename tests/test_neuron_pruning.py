"""Structural feed-forward neuron pruning beside head pruning, in every family: pruned == masked logits
(a layer losing every neuron and one losing every head included); save/reload with prune_attattr and
with stock transformers alone; ONNX == PyTorch; the per-unit cost model adds up and equals torch's count."""

import copy
import json

import pytest
import torch
from conftest import FAMILY_KINDS, load_with_stock_transformers, tiny_batch, tiny_model

from prune_attattr import AttentionControl, load_classifier, load_pruned, save_pruned
from prune_attattr.prune.cost import flops_per_token, unit_flops
from prune_attattr.deploy.onnx_export import check_onnx, export_onnx_folder
from prune_attattr.families import PRUNED_HEADS_KEY, PRUNED_NEURONS_KEY
from prune_attattr.models import feed_forward, forward_logits, input_names, intermediate_size, kept_heads, kept_neurons
from prune_attattr.prune.neurons import prune_neurons, pruned_neurons_of
from prune_attattr.prune.units import prune_units
from prune_attattr.prune.heads import count_parameters

HEADS = {0: [1, 3], 1: [0, 1, 2, 3]}  # layer 1 loses every head


def _neurons(model):
    """Layer 0 loses every third neuron, layer 1 a block, layer 2 every neuron."""
    n = intermediate_size(model)
    return {0: list(range(0, n, 3)), 1: list(range(5, n // 2)), 2: list(range(n))}


def _masked_logits(model, batch, heads, neurons):
    n, heads_per_layer = intermediate_size(model), model.config.num_attention_heads
    hm = {layer: torch.tensor([0.0 if h in hs else 1.0 for h in range(heads_per_layer)]) for layer, hs in heads.items()}
    nm = {layer: torch.tensor([0.0 if j in js else 1.0 for j in range(n)]) for layer, js in neurons.items()}
    with torch.no_grad():
        return forward_logits(model, batch, AttentionControl(head_mask=hm, neuron_mask=nm))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_pruned_equals_masked(kind):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind)
    neurons = _neurons(model)
    n = intermediate_size(model)
    pruned = prune_units(copy.deepcopy(model), heads=HEADS, neurons=neurons)
    with torch.no_grad():
        got = forward_logits(pruned, batch)
        plain = forward_logits(model, batch)
    want = _masked_logits(model, batch, HEADS, neurons)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(got, plain, atol=1e-3)  # pruning changed something
    only_heads = _masked_logits(model, batch, HEADS, {})
    assert not torch.allclose(got, only_heads, atol=1e-3)  # and the neurons were part of it
    assert kept_heads(pruned) == [[0, 2], [], [0, 1, 2, 3]]
    assert kept_neurons(pruned) == [[j for j in range(n) if j not in neurons[layer]] for layer in range(3)]
    assert pruned_neurons_of(pruned) == {k: sorted(v) for k, v in neurons.items()}
    assert getattr(pruned.config, PRUNED_NEURONS_KEY) == {str(k): sorted(v) for k, v in neurons.items()}
    assert getattr(pruned.config, PRUNED_HEADS_KEY) == {"0": [1, 3], "1": [0, 1, 2, 3]}
    # the parameters really went: rows of the first map (GLU: both halves), columns of the second
    rows = 2 if kind == "modernbert" else 1
    for layer in range(3):
        first, second = feed_forward(pruned, layer)
        kept = len(kept_neurons(pruned)[layer])
        assert first.weight.shape[0] == rows * kept
        assert first.bias is None or first.bias.shape == (rows * kept,)
        assert kept == 0 or second.weight.shape[1] == kept
    full_ffn = sum(p.numel() for layer in range(3) for m in feed_forward(model, layer) for p in m.parameters())
    pruned_ffn = sum(p.numel() for layer in range(3) for m in feed_forward(pruned, layer) for p in m.parameters())
    hidden = model.config.hidden_size
    gone = sum(len(v) for v in neurons.values()) * (rows * hidden + hidden + (0 if feed_forward(model, 0)[0].bias is None else rows))
    if feed_forward(model, 2)[1].bias is None:  # layer 2's bias-only second map holds a zero bias
        gone -= hidden
    assert full_ffn - pruned_ffn == gone
    assert count_parameters(pruned) < count_parameters(model)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "modernbert"])
def test_hooks_follow_the_new_modules(kind):
    """The neuron control acts on a pruned model (current positions), also in a layer without neurons,
    and pruning in two steps equals pruning once."""
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind)
    neurons = _neurons(model)
    pruned = prune_neurons(copy.deepcopy(model), neurons)
    kept0 = kept_neurons(pruned)[0]
    mask = torch.ones(len(kept0))
    mask[:4] = 0  # the first four kept neurons of layer 0
    rec = AttentionControl(neuron_mask={0: mask}, neuron_record={2})
    with torch.no_grad():
        masked = forward_logits(pruned, batch, rec)
        more = prune_neurons(copy.deepcopy(pruned), {0: kept0[:4]})
        twice = forward_logits(more, batch)
        once = forward_logits(prune_neurons(copy.deepcopy(model), {**neurons, 0: neurons[0] + kept0[:4]}), batch)
    assert rec.neuron_recorded[2].shape == (*batch["input_ids"].shape, 0)
    assert torch.allclose(masked, twice, atol=1e-5)
    assert torch.allclose(twice, once, atol=1e-6)
    assert not torch.allclose(masked, forward_logits(pruned, batch).detach(), atol=1e-4)
    prune_neurons(more, {2: [0, 1]})  # nothing left to prune there: a no-op
    assert kept_neurons(more)[2] == []


def test_layer_without_neurons_trains_and_bad_indices_refused():
    model = prune_neurons(tiny_model(), {1: list(range(intermediate_size(tiny_model())))})
    model.train()
    batch = tiny_batch()
    model(**batch).loss.backward()
    bias = feed_forward(model, 1)[1].bias
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layer 3"):
        prune_neurons(model, {3: [0]})
    with pytest.raises(ValueError, match="neuron"):
        prune_neurons(model, {0: [intermediate_size(model)]})


def test_save_reload_and_stock_transformers_without_prune_attattr(tmp_path):
    folders, want = [], {}
    for kind in FAMILY_KINDS:
        model = tiny_model(kind)
        model = prune_units(model, heads=HEADS, neurons=_neurons(model))
        batch = tiny_batch(kind=kind)
        batch = {k: batch[k] for k in input_names(model)}
        folder = str(tmp_path / kind)
        save_pruned(model, folder)
        saved = json.loads((tmp_path / kind / "config.json").read_text())
        assert saved[PRUNED_NEURONS_KEY] == {str(k): sorted(v) for k, v in _neurons(model).items()}
        with torch.no_grad():
            want[folder] = (forward_logits(model, batch), count_parameters(model))
        for loader in (load_pruned, load_classifier):
            again = loader(folder)
            assert kept_neurons(again) == kept_neurons(model) and kept_heads(again) == kept_heads(model)
            with torch.no_grad():
                assert torch.equal(forward_logits(again, batch), want[folder][0]), (kind, loader.__name__)
        torch.save(batch, folder + "/batch.pt")
        folders.append(folder)
    got = load_with_stock_transformers(folders, tmp_path)
    for folder in folders:
        diff = float((torch.tensor(got[folder]["logits"]) - want[folder][0]).abs().max())
        assert diff <= 1e-5, (folder, diff)
        assert got[folder]["parameters"] == want[folder][1], folder


def test_reload_rejects_mismatched_neurons(tmp_path):
    model = prune_neurons(tiny_model(), {0: [1, 2]})
    save_pruned(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data[PRUNED_NEURONS_KEY] = {"0": [1]}  # not the neurons the weights were saved with
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="do not match"):
        load_pruned(tmp_path)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_onnx_equals_pytorch(kind, tmp_path):
    import onnx

    model = tiny_model(kind)
    model = prune_units(model, heads=HEADS, neurons=_neurons(model))
    path = export_onnx_folder(model, tmp_path, tiny_batch(kind=kind, batch=2, seq=7))
    config = json.loads((tmp_path / "config.json").read_text())
    assert PRUNED_NEURONS_KEY not in config and PRUNED_HEADS_KEY not in config
    # no zero-sized weights in the graph (ONNX Runtime's int8 quantisation mishandles them)
    assert all(0 not in init.dims for init in onnx.load(str(path)).graph.initializer)
    batches = [tiny_batch(seed=s, batch=b, seq=t, kind=kind) for s, b, t in ((2, 1, 5), (3, 5, 19), (4, 3, 11))]
    assert check_onnx(model, path, batches) <= 1e-4


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_cost_model_adds_up_and_equals_torch_count(kind):
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(kind)
    pruned = prune_units(copy.deepcopy(model), heads=HEADS, neurons=_neurons(model))
    L = 11
    full = unit_flops(model, L)
    for m in (model, pruned):
        costs = unit_flops(m, L)
        heads = [len(h) for h in kept_heads(m)]
        neurons = [len(k) for k in kept_neurons(m)]
        assert costs.heads_kept == heads and costs.neurons_kept == neurons
        identity = costs.fixed + sum(h * c for h, c in zip(heads, costs.head)) + sum(k * c for k, c in zip(neurons, costs.neuron))
        assert costs.total == identity
        assert costs.flops(heads, neurons) == costs.total
        f = flops_per_token(m, L)
        assert f["total"] == costs.total and f["attention"] + f["feed_forward"] + costs.fixed == pytest.approx(costs.total, rel=1e-12)
        # unit costs do not depend on what is pruned; the unpruned total is the same from either model
        assert costs.head == full.head and costs.neuron == full.neuron and costs.fixed == full.fixed
        assert costs.unpruned == full.total
        # what torch counts for the explicit-attention forward of one sequence of L tokens
        batch = tiny_batch(kind=kind, batch=1, seq=L)
        with FlopCounterMode(display=False) as counter:
            forward_logits(m, batch, AttentionControl(record=True))
        assert counter.get_total_flops() / L == pytest.approx(costs.total, rel=1e-12)
    hidden = model.config.hidden_size
    assert full.neuron == [(6 if kind == "modernbert" else 4) * hidden] * 3
    assert pruned.config.num_hidden_layers == 3 and unit_flops(pruned, L).total < full.total
    with pytest.raises(ValueError, match="seq_len"):
        unit_flops(model, 0)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "modernbert", "deberta-v2"])
def test_attribution_of_a_neuron_pruned_model(kind):
    """AttAttr's fast path (which splits layers at the first feed-forward map) on pruned feed-forward
    blocks, one without neurons included, equals the reference path."""
    from prune_attattr import attention_attribution

    model = tiny_model(kind)
    model = prune_units(model, heads={0: [1]}, neurons=_neurons(model))
    batch = tiny_batch(kind=kind, batch=3)
    fast = attention_attribution(model, batch, steps=3, mode="fast")
    ref = attention_attribution(model, batch, steps=3, mode="reference")
    assert fast[:, 2].abs().max() > 1e-4  # the layer without neurons still attributes
    assert torch.allclose(fast, ref, atol=1e-5), float((fast - ref).abs().max())
