"""Layer-wise distillation (recovery.hidden_weight): the hidden-state loss is zero for teacher == student,
counts real tokens only, and recovery with it brings a pruned student's hidden states closer to the teacher's."""

import copy

import pytest
import torch
from _recovery_worker import synthetic
from conftest import tiny_batch, tiny_model

from prune_attattr import prune_units, recover
from prune_attattr.config import RecoverySettings
from prune_attattr.recover.distill import RecoveryError, hidden_loss, recovery_dataloader


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def test_zero_for_teacher_equal_student_and_padding_ignored():
    model = tiny_model().eval()
    batch = tiny_batch()
    h = _hidden(model, batch)
    assert hidden_loss(h, h, batch["attention_mask"]) == 0
    other = _hidden(prune_units(copy.deepcopy(model), heads={0: [0, 1]}, neurons={1: list(range(20))}), batch)
    loss = hidden_loss(other, h, batch["attention_mask"])
    assert loss > 0
    # changing padded positions changes nothing
    mask = batch["attention_mask"]
    noisy = tuple(x + 5.0 * (1 - mask).unsqueeze(-1) for x in other)
    assert (1 - mask).sum() > 0 and torch.allclose(hidden_loss(noisy, h, mask), loss)
    # the definition: mean over layers of the per-element squared error over real tokens
    want = torch.stack([(((s - t) ** 2).sum(-1) * mask).sum() / (mask.sum() * s.shape[-1]) for s, t in zip(other, h)]).mean()
    assert torch.allclose(loss, want)
    with pytest.raises(RecoveryError, match="depth"):
        hidden_loss(other[:-1], h, mask)


def test_layerwise_recovery_moves_hidden_states_toward_the_teacher():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    teacher = tiny_model(labels=2, init=0.1).eval()
    student = prune_units(copy.deepcopy(teacher), heads={0: [0, 1, 2], 2: [1]}, neurons={0: list(range(30)), 1: list(range(30))})
    data = synthetic(96, seed=3)
    loader = recovery_dataloader(data, batch_size=16, pad_id=0, seed=0)
    batch = tiny_batch()
    before = hidden_loss(_hidden(student, batch), _hidden(teacher, batch), batch["attention_mask"])
    with pytest.raises(RecoveryError, match="hidden_weight"):
        recover(copy.deepcopy(student), None, loader, acc, RecoverySettings(enabled=True, alpha=0.0, hidden_weight=1.0))
    info = recover(student, teacher, loader, acc, RecoverySettings(enabled=True, epochs=3, learning_rate=3e-3, warmup_ratio=0, alpha=0.5, hidden_weight=1.0))
    after = hidden_loss(_hidden(student, batch), _hidden(teacher, batch), batch["attention_mask"])
    assert info["hidden_weight"] == 1.0
    assert after < 0.7 * before, (before, after)
