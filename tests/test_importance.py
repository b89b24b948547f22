"""Head importance methods against their definitions (Michel et al. 2019; Hao et al. 2021)."""

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_batch

from prune_attattr import AttentionControl, attention_attribution
from prune_attattr import importance as imp
from prune_attattr.models import forward_logits
from prune_attattr.tasks import Encoded, make_dataloader


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _loader(batch, accelerator, batch_size=2):
    ids = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    types = [row[m.bool()].tolist() for row, m in zip(batch["token_type_ids"], batch["attention_mask"])]
    data = Encoded(ids, types, batch["labels"].tolist())
    return accelerator.prepare(make_dataloader(data, batch_size=batch_size, pad_id=0))


def test_attattr_importance_is_sum_of_max(model, batch, accelerator):
    got = imp.attattr_importance(model, _loader(batch, accelerator), accelerator, steps=4, description=None)
    attr = attention_attribution(model, batch, steps=4, target="gold")
    valid = batch["attention_mask"].bool()
    pair = (valid[:, :, None] & valid[:, None, :])[:, None, None]
    want = attr.masked_fill(~pair, float("-inf")).flatten(3).max(-1).values.sum(0)
    assert got.shape == (3, 4)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)


def test_taylor_matches_definition(model, batch, accelerator):
    """|Σ_tokens A ⊙ ∂L/∂A| per example and head, summed, L2-normalised per layer."""
    got = imp.taylor_importance(model, _loader(batch, accelerator), accelerator, description=None)
    want = torch.zeros(3, 4)
    for b in range(batch["input_ids"].shape[0]):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        ctrl = AttentionControl(record=True)
        logits = forward_logits(model, one, ctrl)
        loss = torch.nn.functional.cross_entropy(logits, one["labels"])
        probs = [ctrl.recorded[layer] for layer in range(3)]
        grads = torch.autograd.grad(loss, probs)
        for layer in range(3):
            want[layer] += (probs[layer] * grads[layer]).sum((0, 2, 3)).abs().detach()
    want = want / want.norm(dim=-1, keepdim=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))


def test_accuracy_difference_matches_manual_masking(model, accelerator):
    batch = tiny_batch(batch=8, seq=9)
    with torch.no_grad():
        batch["labels"] = forward_logits(model, batch).argmax(-1)  # unpruned accuracy 100%
    got = imp.accuracy_difference_importance(model, _loader(batch, accelerator, 3), accelerator, description=None)
    for layer, head in ((0, 0), (2, 3)):
        hm = torch.ones(4)
        hm[head] = 0
        with torch.no_grad():
            pred = forward_logits(model, batch, AttentionControl(head_mask={layer: hm})).argmax(-1)
        drop = 1.0 - float((pred == batch["labels"]).float().mean())
        assert abs(float(got[layer, head]) - drop) < 1e-3


def test_attention_and_random(model, batch, accelerator):
    att = imp.attention_importance(model, _loader(batch, accelerator), accelerator, description=None)
    assert att.shape == (3, 4)
    assert (att > 0).all() and (att <= batch["input_ids"].shape[0] + 1e-5).all()
    assert torch.equal(imp.random_importance(model, 5), imp.random_importance(model, 5))
    assert not torch.equal(imp.random_importance(model, 5), imp.random_importance(model, 6))
