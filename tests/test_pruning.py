"""Structural pruning: pruned logits == masked logits, whole layers, the incremental loop."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model

from prune_attattr import AttentionControl, kept_heads, prune_heads, pruning_curve
from prune_attattr.models import forward_logits
from prune_attattr.prune.heads import count_parameters, heads_to_prune, pruned_heads_of


def _masked_logits(model, batch, heads):
    n = model.config.num_attention_heads
    hm = {layer: torch.tensor([0.0 if h in hs else 1.0 for h in range(n)]) for layer, hs in heads.items()}
    with torch.no_grad():
        return forward_logits(model, batch, AttentionControl(head_mask=hm))


@pytest.mark.parametrize(
    "heads",
    [{0: [0]}, {0: [1, 3], 2: [2]}, {1: [0, 1, 2, 3]}, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}],
)
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pruned_equals_masked(kind, heads):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind)
    want = _masked_logits(model, batch, heads)
    pruned = prune_heads(copy.deepcopy(model), heads)
    with torch.no_grad():
        got = forward_logits(pruned, batch)
    assert torch.allclose(got, want, atol=1e-5)
    unmasked = forward_logits(model, batch).detach()
    assert not torch.allclose(got, unmasked, atol=1e-4)  # pruning changed something
    assert count_parameters(pruned) < count_parameters(model)


def test_incremental_pruning_composes(model, batch):
    once = prune_heads(copy.deepcopy(model), {0: [1, 2], 1: [3]})
    twice = prune_heads(prune_heads(copy.deepcopy(model), {0: [2]}), {0: [1, 2], 1: [3]})
    with torch.no_grad():
        assert torch.allclose(forward_logits(once, batch), forward_logits(twice, batch), atol=1e-6)
    assert kept_heads(twice)[0] == [0, 3]
    assert pruned_heads_of(twice) == {0: [1, 2], 1: [3]}
    assert twice.config.prune_attattr_pruned_heads == {"0": [1, 2], "1": [3]}


def test_fully_pruned_layer_runs_and_trains(model, batch):
    pruned = prune_heads(copy.deepcopy(model), {1: [0, 1, 2, 3]})
    pruned.train()
    out = pruned(**{k: v for k, v in batch.items()})
    out.loss.backward()
    bias = pruned.bert.encoder.layer[1].attention.output.dense.bias
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_bad_indices(model):
    with pytest.raises(ValueError, match="layer 5"):
        prune_heads(model, {5: [0]})
    with pytest.raises(ValueError, match="head"):
        prune_heads(model, {0: [4]})


def test_heads_to_prune_lowest_first_deterministic():
    scores = torch.tensor([[0.5, 0.1, 0.1], [0.0, 0.9, 0.3]])
    assert heads_to_prune(scores, 3) == {1: [0], 0: [1, 2]}
    assert heads_to_prune(scores, 2, {1: [0]}) == {0: [1, 2]}


def test_pruning_curve_steps(model, batch):
    from prune_attattr.importance import random_importance

    scores = random_importance(model, seed=3)
    seen = []

    def evaluate(m):
        with torch.no_grad():
            logits = forward_logits(m, batch)
        return {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}

    steps = pruning_curve(model, scores, evaluate, step_fraction=0.25, on_step=seen.append)
    assert [s.heads_kept for s in steps] == [12, 9, 6, 3, 0]
    assert seen == steps
    assert steps[0].parameters == count_parameters(model)
    assert all(a.parameters > b.parameters for a, b in zip(steps, steps[1:]))
    # the lowest random scores go first
    first = heads_to_prune(scores, 3)
    assert {int(k): v for k, v in steps[1].pruned_heads.items()} == first
    assert kept_heads(model) == [list(range(4))] * 3  # caller's model untouched
