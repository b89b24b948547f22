"""Least-squares mask tuning (Kwon et al. 2022, section 4.3): exact cases, folding, improvement, processes."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAMILY_KINDS, tiny_batch, tiny_model
from prune_attattr.attention import AttentionControl
from prune_attattr.models import feed_forward, forward_logits, kept_heads, kept_neurons, output_projection, encoder_layers
from prune_attattr.prune.heads import prune_heads
from prune_attattr.recover.distill import RecoveryError
from prune_attattr.recover.rescale import fold_scales, least_squares, masks_from_pruned

HERE = Path(__file__).parent


def _masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    hm = {i: (torch.arange(len(h)) % 2 == 0).float() for i, h in enumerate(kept_heads(model))}
    nm = {i: (torch.rand(len(n), generator=g) > 0.5).float() for i, n in enumerate(kept_neurons(model))}
    return hm, nm


def _logits(model, batches, control=None):
    with torch.no_grad():
        return torch.cat([forward_logits(model, b, control) for b in batches])


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_recovers_an_exactly_representable_teacher(kind):
    """Teacher = student with its kept heads' W_O columns and kept neurons' W_2 columns scaled by known
    factors and its masked units' contributions zero: the solve returns the factors in every layer and
    the folded student computes the teacher."""
    student = tiny_model(kind)
    hm, nm = _masks(student)
    g = torch.Generator().manual_seed(1)
    f = {i: (0.5 + torch.rand(len(m), generator=g)) * m for i, m in hm.items()}
    h = {i: (0.5 + torch.rand(len(m), generator=g)) * m for i, m in nm.items()}
    teacher = fold_scales(copy.deepcopy(student), f, h)
    batches = [tiny_batch(seed=s, kind=kind, batch=8) for s in range(3)]
    before = _logits(student, batches, AttentionControl(head_mask=hm, neuron_mask=nm))
    res = least_squares(student, batches, head_mask=hm, neuron_mask=nm, teacher=teacher, damping=0.0)
    assert res.skipped == []
    for i in f:
        torch.testing.assert_close(res.head_scales[i], f[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(res.neuron_scales[i], h[i], atol=1e-3, rtol=0)
    held_out = [tiny_batch(seed=50, kind=kind)]
    want = _logits(teacher, batches + held_out)
    assert (before - want[: len(before)]).abs().max() > 1e-2  # the masked student was not the teacher
    torch.testing.assert_close(_logits(student, batches + held_out), want, atol=5e-5, rtol=0)  # no masks needed
    assert all(after < 1e-4 < before for before, after in res.errors.values())  # relative errors (float32 sums)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_recovers_a_bias_shift(kind):
    student = tiny_model(kind)
    hm, nm = _masks(student)
    teacher = fold_scales(copy.deepcopy(student), {i: 0.7 * m for i, m in hm.items()}, nm)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(len(encoder_layers(teacher))):
            for lin in (output_projection(encoder_layers(teacher)[i]), feed_forward(teacher, i)[1]):
                lin.bias.add_(0.3 * torch.randn(lin.bias.shape, generator=g))
    batches = [tiny_batch(seed=s, kind=kind, batch=8) for s in range(3)]
    plain = copy.deepcopy(student)
    least_squares(plain, batches, head_mask=hm, neuron_mask=nm, teacher=teacher, damping=0.0)
    res = least_squares(student, batches, head_mask=hm, neuron_mask=nm, teacher=teacher, damping=0.0, bias=True)
    for i in hm:
        torch.testing.assert_close(res.head_scales[i], 0.7 * hm[i], atol=1e-4, rtol=0)
    want = _logits(teacher, batches)
    torch.testing.assert_close(_logits(student, batches), want, atol=5e-5, rtol=0)
    assert (_logits(plain, batches) - want).abs().max() > 1e-2  # scales alone cannot do it


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_folding_equals_masking(kind):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(4)
    hs = {i: torch.randn(len(h), generator=g) for i, h in enumerate(kept_heads(model))}
    ns = {i: torch.randn(len(n), generator=g) for i, n in enumerate(kept_neurons(model))}
    batches = [tiny_batch(kind=kind)]
    masked = _logits(model, batches, AttentionControl(head_mask=hs, neuron_mask=ns))
    torch.testing.assert_close(_logits(fold_scales(model, hs, ns), batches), masked, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kind,bias",
    [("bert", False), ("roberta", False), ("distilbert", False)] + [(k, True) for k in ("bert", "roberta", "distilbert", "deberta-v2")],
)
def test_improves_the_output_error_with_half_the_units_masked(kind, bias):
    """On a random model pruned units are nearly uncorrelated with kept ones, so scales alone help little
    (DeBERTa's tiny model: not at all, its scales stay near 1); the bias fit absorbs their mean."""
    model = tiny_model(kind, init=0.1)
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    hm = {i: (torch.rand(len(h), generator=g) > 0.5).float() for i, h in enumerate(kept_heads(model))}
    nm = {i: (torch.rand(len(n), generator=g) > 0.5).float() for i, n in enumerate(kept_neurons(model))}
    calibration = [tiny_batch(seed=s, kind=kind, batch=8) for s in range(40)]
    held_out = [tiny_batch(seed=1000 + s, kind=kind, batch=8) for s in range(8)]
    want = _logits(teacher, held_out)
    before = (_logits(model, held_out, AttentionControl(head_mask=hm, neuron_mask=nm)) - want).pow(2).mean()
    res = least_squares(model, calibration, head_mask=hm, neuron_mask=nm, bias=bias)
    after = (_logits(model, held_out) - want).pow(2).mean()
    assert after < 0.95 * before
    assert res.tokens == sum(int(b["attention_mask"].sum()) for b in calibration)
    assert all(after <= before + 1e-9 for before, after in res.errors.values())  # each fit is no worse in-sample
    for i in hm:  # masked units stay silent
        assert (res.head_scales[i][hm[i] == 0] == 0).all() and (res.neuron_scales[i][nm[i] == 0] == 0).all()


def test_structurally_pruned_equals_masked():
    teacher = tiny_model("bert", init=0.1)
    pruned = {0: [1, 3], 1: [0, 1, 2, 3], 2: [0]}  # layer 1 loses every head
    hm, _ = masks_from_pruned(teacher, pruned, None)
    assert set(hm) == {0, 1, 2} and hm[0].tolist() == [1, 0, 1, 0] and hm[1].tolist() == [0, 0, 0, 0]
    batches = [tiny_batch(seed=s, batch=8) for s in range(6)]
    masked = copy.deepcopy(teacher)
    least_squares(masked, batches, head_mask=hm, teacher=teacher)
    structural = prune_heads(copy.deepcopy(teacher), pruned)
    with pytest.raises(RecoveryError, match="teacher"):
        least_squares(copy.deepcopy(structural), batches)
    res = least_squares(structural, batches, teacher=teacher)
    assert res.head_scales[0].shape == (2,) and res.head_scales[1].shape == (0,)
    torch.testing.assert_close(_logits(structural, batches), _logits(masked, batches), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "deberta-v2", "modernbert"])
def test_structurally_pruned_neurons_equal_masked(kind):
    """Heads and neurons pruned structurally, a layer with no neurons left (its second map is a bias alone):
    least squares gives the masked model's result (found by a CLI run on DeBERTa: folding hit the bias-only map)."""
    from prune_attattr.prune.units import prune_units

    teacher = tiny_model(kind, init=0.1)
    n = len(kept_neurons(teacher)[0])
    heads, neurons = {0: [1, 3]}, {0: list(range(0, n, 2)), 1: list(range(n)), 2: [0, 5]}
    hm, nm = masks_from_pruned(teacher, heads, neurons)
    batches = [tiny_batch(seed=s, batch=8) for s in range(6)]
    masked = copy.deepcopy(teacher)
    least_squares(masked, batches, head_mask=hm, neuron_mask=nm, teacher=teacher)
    structural = prune_units(copy.deepcopy(teacher), heads=heads, neurons=neurons)
    res = least_squares(structural, batches, teacher=teacher)
    assert res.neuron_scales[1].shape == (0,)
    torch.testing.assert_close(_logits(structural, batches), _logits(masked, batches), atol=5e-5, rtol=0)


def test_bad_arguments_are_refused():
    model = tiny_model("bert")
    with pytest.raises(RecoveryError, match="head_mask of layer 1"):
        least_squares(model, [tiny_batch()], head_mask={1: torch.ones(3)})
    with pytest.raises(RecoveryError, match="damping"):
        least_squares(model, [tiny_batch()], damping=-1.0)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    worker = HERE / "_least_squares_worker.py"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(worker), str(one)], check=True, env=env, timeout=600)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541", str(worker), str(two)]
    proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["tokens"] == b["tokens"]
    for key in ("heads", "neurons", "logits"):
        x, y = torch.tensor(a[key]), torch.tensor(b[key])
        if key != "logits":
            assert ((x - 1).abs() > 1e-3).any(), key  # the scales moved
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
