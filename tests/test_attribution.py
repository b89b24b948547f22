"""AttAttr (Hao et al. 2021, Eq. 2-3): completeness, brute force, fast == reference, shapes."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model

from prune_attattr import AttentionControl, attention_attribution, prune_heads
from prune_attattr.importance.attattr import quadrature_nodes
from prune_attattr.models import forward_logits


def _target_prob_gap(model, batch, layer):
    """F(A) - F(0) for the predicted class, with layer's probabilities zeroed for F(0)."""
    with torch.no_grad():
        ctrl = AttentionControl(record=True)
        logits = forward_logits(model, batch, ctrl)
        target = logits.argmax(-1)
        zero = torch.zeros_like(ctrl.recorded[layer])
        logits0 = forward_logits(model, batch, AttentionControl(replace={layer: zero}))
    p1 = logits.softmax(-1).gather(1, target[:, None]).squeeze(1)
    p0 = logits0.softmax(-1).gather(1, target[:, None]).squeeze(1)
    return p1 - p0


def test_output_shape_and_padding_zero(model, batch):
    attr = attention_attribution(model, batch, steps=4)
    assert attr.shape == (4, 3, 4, 11, 11)
    pad = batch["attention_mask"] == 0
    assert attr.permute(0, 3, 1, 2, 4)[pad].abs().max() == 0  # padded query rows
    assert attr.permute(0, 4, 1, 2, 3)[pad].abs().max() == 0  # padded key columns
    assert attr.abs().max() > 0


@pytest.mark.parametrize("layer", [0, 2])
def test_completeness_improves_with_steps(model, batch, layer):
    """Σ Attr over a layer -> F(A) - F(0) as m grows (integrated-gradients completeness)."""
    gap = _target_prob_gap(model, batch, layer)
    assert gap.abs().max() > 1e-3  # the test means something only if zeroing the layer matters
    errors = []
    for steps in (2, 20, 1000):
        total = attention_attribution(model, batch, steps=steps, layers=[layer]).sum((1, 2, 3, 4))
        errors.append((total - gap).abs().max().item())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.02 * gap.abs().max().item()  # left Riemann error is O(1/m)
    gauss = attention_attribution(model, batch, steps=64, layers=[layer], quadrature="gauss").sum((1, 2, 3, 4))
    assert (gauss - gap).abs().max() < 0.002 * gap.abs().max()


def test_equals_brute_force_loop_over_alphas(model, batch):
    """The paper's left Riemann sum computed one alpha and one example at a time, with a full forward each."""
    steps, layer = 6, 1
    ours = attention_attribution(model, batch, steps=steps, layers=[layer], target="gold")[:, 0]
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        one = {k: v[b : b + 1, :n] for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            ctrl = AttentionControl(record=True)
            forward_logits(model, one, ctrl)
            a = ctrl.recorded[layer]
        grad_sum = torch.zeros_like(a)
        for i in range(steps):
            scaled = (i / steps * a).clone().requires_grad_(True)
            logits = forward_logits(model, one, AttentionControl(replace={layer: scaled}))
            prob = logits.softmax(-1)[0, batch["labels"][b]]
            (g,) = torch.autograd.grad(prob, scaled)
            grad_sum += g
        want = (a * grad_sum / steps)[0]
        assert torch.allclose(ours[b, :, :n, :n], want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("quadrature", ["left", "gauss"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_fast_equals_reference(kind, quadrature):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind)
    fast = attention_attribution(model, batch, steps=7, mode="fast", quadrature=quadrature, chunk_size=9)
    ref = attention_attribution(model, batch, steps=7, mode="reference", quadrature=quadrature)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)  # float32 sums in another order


@pytest.mark.parametrize("heads", [{0: [1], 2: [0, 3]}, {1: [0, 1, 2, 3], 2: [2]}, {2: [0, 1, 2, 3]}])
def test_fast_equals_reference_on_pruned_models(heads):
    model = prune_heads(tiny_model(), heads)
    batch = tiny_batch()
    fast = attention_attribution(model, batch, steps=5, mode="fast")
    ref = attention_attribution(model, batch, steps=5, mode="reference")
    assert fast.abs().max() > 0
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)


def test_target_gold_differs_from_predicted(model, batch):
    with torch.no_grad():
        pred = forward_logits(model, batch).argmax(-1)
    batch["labels"] = (pred + 1) % 3
    a = attention_attribution(model, batch, steps=3, target="gold")
    b = attention_attribution(model, batch, steps=3, target="predicted")
    assert not torch.allclose(a, b)


def test_pruned_heads_are_zero_and_layer_order(model, batch):
    pruned = prune_heads(copy.deepcopy(model), {0: [1, 3], 2: [0, 1, 2, 3]})
    attr = attention_attribution(pruned, batch, steps=3, layers=[2, 0])
    assert attr.shape[1] == 2
    assert attr[:, 0].abs().max() == 0  # layer 2 has no heads
    assert attr[:, 1, [1, 3]].abs().max() == 0
    assert attr[:, 1, [0, 2]].abs().max() > 0


def test_model_mode_restored_and_no_param_grads(model, batch):
    model.train()
    attention_attribution(model, batch, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_quadrature_nodes():
    for q in ("left", "midpoint", "gauss"):
        a, w = quadrature_nodes(5, q)
        assert torch.isclose(w.sum(), torch.tensor(1.0))
        assert (a >= 0).all() and (a <= 1).all()
    a, _ = quadrature_nodes(4, "left")
    assert torch.allclose(a, torch.tensor([0, 0.25, 0.5, 0.75]))
    # Gauss-Legendre with 3 nodes integrates x^5 exactly: 1/6
    a, w = quadrature_nodes(3, "gauss")
    assert abs(float((w * a**5).sum()) - 1 / 6) < 1e-6
    with pytest.raises(ValueError):
        quadrature_nodes(0)
    with pytest.raises(ValueError):
        quadrature_nodes(3, "simpson")


def test_bad_arguments(model, batch):
    with pytest.raises(ValueError, match="layer 7"):
        attention_attribution(model, batch, layers=[7])
    with pytest.raises(ValueError, match="mode"):
        attention_attribution(model, batch, mode="quick")
    with pytest.raises(ValueError, match="target"):
        attention_attribution(model, batch, target="best")
