"""The neuron control: a mask on the intermediate activations equals editing the second feed-forward map."""

import copy

import pytest
import torch

from conftest import FAMILY_KINDS, tiny_model
from prune_attattr.attention import AttentionControl
from prune_attattr.models import embed, feed_forward, forward_logits, kept_neurons, logits_from_layer


def _batch(kind):
    torch.manual_seed(1)
    b = {"input_ids": torch.randint(5, 100, (2, 11)), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    b["attention_mask"][1, 8:] = 0
    return b


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_neuron_mask_equals_zeroed_columns(kind):
    model = tiny_model(kind).eval()
    batch = _batch(kind)
    n = len(kept_neurons(model)[1])
    mask = torch.ones(n)
    mask[::3] = 0  # every third neuron of layer 1
    edited = copy.deepcopy(model)
    with torch.no_grad():
        feed_forward(edited, 1)[1].weight[:, ::3] = 0
        masked = forward_logits(model, batch, AttentionControl(neuron_mask={1: mask}))
        want = forward_logits(edited, batch)
        plain = forward_logits(model, batch)
        # the last layer, computed for [CLS] only, reads the same control
        hidden, am = embed(model, batch)
        last = len(kept_neurons(model)) - 1
        edited_last = copy.deepcopy(model)
        feed_forward(edited_last, last)[1].weight.zero_()
        from_layer = logits_from_layer(model, hidden, am, 0, AttentionControl(neuron_mask={last: torch.zeros(n)}))
        want_last = forward_logits(edited_last, batch)
    assert (masked - plain).abs().max() > 1e-3  # the mask changed something
    torch.testing.assert_close(masked, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(from_layer, want_last, atol=2e-5, rtol=0)


def test_neuron_record_and_replace_round_trip():
    model = tiny_model("bert").eval()
    batch = _batch("bert")
    with torch.no_grad():
        rec = AttentionControl(neuron_record={0})
        plain = forward_logits(model, batch, rec)
        acts = rec.neuron_recorded[0]
        assert acts.shape == (2, 11, len(kept_neurons(model)[0]))
        again = forward_logits(model, batch, AttentionControl(neuron_replace={0: acts.clone()}))
        halved = forward_logits(model, batch, AttentionControl(neuron_replace={0: 0.5 * acts}))
    torch.testing.assert_close(again, plain, atol=1e-6, rtol=0)
    assert (halved - plain).abs().max() > 1e-3
    # no control leaks out of the forward that set it
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, batch), plain, atol=0, rtol=0)
