"""Feed-forward neuron importance (issue 15): knowledge attribution (Dai et al. 2022), Taylor, Fisher
(Kwon et al. 2022), random; fast == reference, completeness, brute force, token bound, pruned neurons."""

import pytest
import torch
from accelerate import Accelerator
from conftest import FAMILY_KINDS, tiny_batch, tiny_model
from test_batching import TokenMeter, _mixed_batch

from prune_attattr import AttentionControl
from prune_attattr import importance as imp
from prune_attattr.importance.neurons import neuron_attribution
from prune_attattr.models import feed_forward, forward_logits, kept_neurons


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _biased(model, seed=5):
    """Random biases everywhere (transformers initialises them to 0, which would hide a lost bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _close(got, want, rel=1e-5):
    """Equal up to ``rel`` of the largest |want| (float32 sums in another order)."""
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=rel * float(want.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_fast_equals_reference(kind):
    """Every family; a small token bound, so groups are split and alpha steps come in several chunks."""
    model, batch = _biased(tiny_model(kind)), _mixed_batch(kind)
    kwargs = dict(steps=5, target="gold", max_tokens_per_forward=40)
    fast = neuron_attribution(model, batch, mode="fast", **kwargs)
    ref = neuron_attribution(model, batch, mode="reference", **kwargs)
    assert fast.shape == (8, 3, 13, len(kept_neurons(model)[0]))
    _close(fast, ref)
    pad = batch["attention_mask"] == 0
    assert fast.transpose(1, 2)[pad].abs().max() == 0
    # the last layer reaches the classifier through [CLS] only
    assert fast[:, 2, 1:].abs().max() == 0 and fast[:, 2, 0].abs().max() > 0


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_completeness(kind):
    """Σ over tokens and neurons of Attr = F(a) - F(0) (integrated gradients), here with Gauss-Legendre;
    the left Riemann sum approaches it as m grows."""
    model, batch = _biased(tiny_model(kind)), tiny_batch(kind=kind)
    for layer in (0, 2):
        with torch.no_grad():
            rec = AttentionControl(neuron_record={layer})
            logits = forward_logits(model, batch, rec)
            target = logits.argmax(-1, keepdim=True)
            zero = torch.zeros_like(rec.neuron_recorded[layer])
            logits0 = forward_logits(model, batch, AttentionControl(neuron_replace={layer: zero}))
        gap = (logits.softmax(-1).gather(1, target) - logits0.softmax(-1).gather(1, target)).squeeze(1)
        assert gap.abs().max() > 1e-2  # zeroing the layer's neurons matters
        # F(alpha a) of these random tiny models is steep near alpha = 0: many nodes
        gauss = neuron_attribution(model, batch, steps=128, layers=[layer], quadrature="gauss").sum((1, 2, 3))
        assert (gauss - gap).abs().max() < 1e-3 * gap.abs().max()
        errors = [(neuron_attribution(model, batch, steps=m, layers=[layer]).sum((1, 2, 3)) - gap).abs().max() for m in (2, 40)]
        assert errors[1] < errors[0]


def _loader(batch, accelerator, batch_size=3):
    from prune_attattr.tasks import Encoded, make_dataloader

    keep = [m.bool() for m in batch["attention_mask"]]
    ids = [row[k].tolist() for row, k in zip(batch["input_ids"], keep)]
    types = [row[k].tolist() for row, k in zip(batch["token_type_ids"], keep)] if "token_type_ids" in batch else [[0] * len(i) for i in ids]
    data = Encoded(ids, types, batch["labels"].tolist())
    return accelerator.prepare(make_dataloader(data, batch_size=batch_size, pad_id=0))


def test_attattr_neuron_importance_is_sum_of_max(accelerator):
    model, batch = tiny_model(), tiny_batch(batch=5)
    got = imp.attattr_neuron_importance(model, _loader(batch, accelerator), accelerator, steps=4, description=None)
    attr = neuron_attribution(model, batch, steps=4, target="gold")  # [B, L, T, I]
    valid = batch["attention_mask"].bool()[:, None, :, None]
    want = attr.masked_fill(~valid, float("-inf")).max(2).values.sum(0)
    assert got.shape == (3, 67) and got.dtype == torch.float32
    _close(got, want, 1e-6)


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_taylor_and_fisher_equal_per_example_autograd(kind, accelerator):
    """Brute force: per example, unpadded, ∂L/∂(recorded activations and probabilities) by autograd;
    Taylor = Σ_examples |Σ_tokens a ⊙ ∂L/∂a|, Fisher = Σ_examples (Σ_tokens a ⊙ ∂L/∂a)^2 (same for heads)."""
    model, batch = tiny_model(kind), tiny_batch(batch=5, kind=kind)
    layers = 3
    g_heads, g_neurons = [], []
    for b in range(5):
        n = int(batch["attention_mask"][b].sum())
        one = {k: (v[b : b + 1, :n] if v.dim() == 2 else v[b : b + 1]) for k, v in batch.items()}
        ctrl = AttentionControl(record=True, neuron_record=True)
        loss = torch.nn.functional.cross_entropy(forward_logits(model, one, ctrl), one["labels"])
        probs = [ctrl.recorded[i] for i in range(layers)]
        acts = [ctrl.neuron_recorded[i] for i in range(layers)]
        grads = torch.autograd.grad(loss, probs + acts)
        g_heads.append(torch.stack([(p * g).sum((0, 2, 3)) for p, g in zip(probs, grads[:layers])]).detach())
        g_neurons.append(torch.stack([(a * g).sum((0, 1)) for a, g in zip(acts, grads[layers:])]).detach())
    g_heads, g_neurons = torch.stack(g_heads), torch.stack(g_neurons)
    loader = _loader(batch, accelerator, batch_size=3)
    taylor = imp.unit_importance("taylor", model, loader, accelerator, units="both", max_tokens_per_forward=20, progress=False)
    fisher = imp.unit_importance("fisher", model, loader, accelerator, units="both")
    _close(taylor[0], g_heads.abs().sum(0))
    _close(taylor[1], g_neurons.abs().sum(0))
    _close(fisher[0], g_heads.pow(2).sum(0))
    _close(fisher[1], g_neurons.pow(2).sum(0))
    # the one-kind functions give the same numbers
    kw = dict(description=None)
    _close(imp.taylor_neuron_importance(model, loader, accelerator, **kw), taylor[1])
    _close(imp.fisher_importance(model, loader, accelerator, **kw), fisher[0])
    _close(imp.fisher_neuron_importance(model, loader, accelerator, **kw), fisher[1])
    normalised = imp.taylor_importance(model, loader, accelerator, **kw)
    _close(normalised, taylor[0] / taylor[0].norm(dim=-1, keepdim=True))
    _close(imp.unit_importance("taylor", model, loader, accelerator, units="heads")[0], normalised)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_forwards_stay_within_token_bound(mode, accelerator):
    model, batch = tiny_model(), _mixed_batch()
    free = neuron_attribution(model, batch, steps=6, target="gold", mode=mode, max_tokens_per_forward=10**6)
    for bound in (13, 40):
        meter = TokenMeter(model)
        bounded = neuron_attribution(model, batch, steps=6, target="gold", mode=mode, max_tokens_per_forward=bound)
        meter.close()
        assert 0 < meter.peak <= bound
        _close(bounded, free, 1e-6)
    if mode == "fast":
        loader = _loader(batch, accelerator, batch_size=8)
        meter = TokenMeter(model)
        imp.mask_gradients(model, loader, accelerator, max_tokens_per_forward=26, description=None)
        meter.close()
        assert 0 < meter.peak <= 26
    with pytest.raises(ValueError, match="does not fit max_tokens_per_forward=12"):
        neuron_attribution(model, batch, steps=2, mode=mode, max_tokens_per_forward=12)


def _prune_neurons_by_hand(model, layer, keep):
    """Structural pruning of one BERT layer's neurons (rows of the first map, columns of the second),
    recorded as ``neuron_ids`` the way :func:`prune_attattr.models.kept_neurons` reads it."""
    first, second = feed_forward(model, layer)
    block = model.bert.encoder.layer[layer]
    new_first = torch.nn.Linear(first.in_features, len(keep))
    new_second = torch.nn.Linear(len(keep), second.out_features)
    with torch.no_grad():
        new_first.weight.copy_(first.weight[keep])
        new_first.bias.copy_(first.bias[keep])
        new_second.weight.copy_(second.weight[:, keep])
        new_second.bias.copy_(second.bias)
    new_second.neuron_ids = list(keep)
    block.intermediate.dense, block.output.dense = new_first, new_second


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_pruned_neurons_score_zero_at_original_indices(accelerator):
    """Layer 1 keeps every third neuron but one, layer 2 none: scores at original indices equal the
    unpruned model's with the others masked, pruned neurons 0, both modes agree."""
    model, batch = _biased(tiny_model()), tiny_batch()
    keep = [i for i in range(67) if i % 3 == 0 and i != 30]
    masked = {1: torch.zeros(67), 2: torch.zeros(67)}
    masked[1][keep] = 1
    with torch.no_grad():
        want_logits = forward_logits(model, batch, AttentionControl(neuron_mask=masked))
    _prune_neurons_by_hand(model, 1, keep)
    _prune_neurons_by_hand(model, 2, [])
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, batch), want_logits, atol=1e-5, rtol=0)
    assert kept_neurons(model)[1] == keep and kept_neurons(model)[2] == []
    fast = neuron_attribution(model, batch, steps=3, target="gold")
    ref = neuron_attribution(model, batch, steps=3, target="gold", mode="reference")
    _close(fast, ref)
    gone = [i for i in range(67) if i not in keep]
    assert fast[:, 1, :, gone].abs().max() == 0 and fast[:, 1, :, keep].abs().max() > 0
    assert fast[:, 2].abs().max() == 0
    loader = _loader(batch, accelerator)
    for method in ("attattr", "taylor", "fisher", "random"):
        _, neurons = imp.unit_importance(method, model, loader, accelerator, units="neurons", steps=3)
        assert neurons.shape == (3, 67), method
        assert neurons[1, gone].abs().max() == 0 and neurons[2].abs().max() == 0, method
        assert neurons[1, keep].abs().min() > 0 and neurons[0].abs().min() > 0, method


def test_random_and_head_only_methods(accelerator):
    model = tiny_model()
    a, b = imp.random_neuron_importance(model, seed=3), imp.random_neuron_importance(model, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, imp.random_neuron_importance(model, seed=4))
    heads, neurons = imp.unit_importance("random", model, None, accelerator, seed=3)
    assert torch.equal(heads, imp.random_importance(model, seed=3)) and torch.equal(neurons, a)
    assert not torch.allclose(neurons[:, : heads.shape[1]], heads)  # not the heads' draws
    loader = _loader(tiny_batch(), accelerator)
    heads, neurons = imp.unit_importance("attention", model, loader, accelerator)
    assert heads.shape == (3, 4) and neurons is None
    with pytest.raises(ValueError, match="scores heads only"):
        imp.unit_importance("accuracy_difference", model, loader, accelerator, units="neurons")
    with pytest.raises(ValueError, match="unknown units"):
        imp.unit_importance("taylor", model, loader, accelerator, units="layers")


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_bf16_autocast_float32_sums(mode, monkeypatch):
    """mixed_precision bf16: every Linear runs in bf16, the leaves and their gradients stay float32,
    the attributions and the mask gradients stay close to the float32 ones."""
    from test_precision import DtypeMeter, _stub_accelerator

    model, batch = tiny_model(init=0.1), tiny_batch()
    want = neuron_attribution(model, batch, steps=6, target="gold", mode=mode)
    leaves = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        grads = real_grad(outputs, inputs, *args, **kwargs)
        leaves.extend(t.dtype for t in (*(inputs if isinstance(inputs, (list, tuple)) else [inputs]), *grads))
        return grads

    monkeypatch.setattr(torch.autograd, "grad", spy)
    meter = DtypeMeter(model)
    got = neuron_attribution(model, batch, steps=6, target="gold", mode=mode, mixed_precision="bf16")
    meter.close()
    assert meter.dtypes == {torch.bfloat16}
    assert leaves and set(leaves) == {torch.float32}
    err = (got - want).abs().max() / want.abs().max()
    assert got.dtype == torch.float32 and 0 < err < 0.02
    if mode == "fast":
        loader = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
        g32 = imp.mask_gradients(model, loader, _stub_accelerator("no"), description=None)
        g16 = imp.mask_gradients(model, loader, _stub_accelerator("bf16"), description=None)
        for a, b in zip(g32, g16):
            assert b.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.02 * a.abs().max()
