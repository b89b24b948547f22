"""Order- and padding-independent batching with a token bound per forward (importance/batching.py).

Every public attribution and importance function must give the same numbers whatever the row order,
the padding side and the token bound, and never hold more tokens in one forward than the bound.
"""

import pytest
import torch
from accelerate import Accelerator
from conftest import FAMILY_KINDS, NO_SEGMENTS, tiny_batch, tiny_model

from prune_attattr import attention_attribution
from prune_attattr import importance as imp
from prune_attattr.importance.batching import compact, length_groups, row_spans


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _pad(kind):
    return 1 if kind in ("roberta", "xlm-roberta", "camembert") else 0


def _mixed_batch(kind="bert", seed=3):
    """8 rows of lengths 3..13 in no order, right padding, labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 13, 5, 12, 4, 7, 11]
    seq = max(lengths)
    pad = _pad(kind)
    ids = torch.full((len(lengths), seq), pad)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    types = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, 120, (n,), generator=g)
        mask[b, :n] = 1
        types[b, n // 2 : n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (len(lengths),), generator=g)}
    if kind not in NO_SEGMENTS:
        out["token_type_ids"] = types
    return out


def _left_padded(batch, pad):
    """The same examples with the padding on the left."""
    out = {k: v.clone() for k, v in batch.items()}
    for b, m in enumerate(batch["attention_mask"]):
        n = int(m.sum())
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in batch:
                fill = pad if key == "input_ids" else 0
                row = batch[key][b]
                out[key][b] = torch.cat([torch.full((row.shape[0] - n,), fill, dtype=row.dtype), row[:n]])
    return out


def _right_to_left_layout(attr, batch):
    """Move [B, L, H, T, T] attributions of a right-padded batch to the columns of the left-padded one."""
    out = torch.zeros_like(attr)
    t = attr.shape[-1]
    for b, m in enumerate(batch["attention_mask"]):
        n = int(m.sum())
        out[b, ..., t - n :, t - n :] = attr[b, ..., :n, :n]
    return out


class TokenMeter:
    """Forward hooks on every Linear: the largest ``rows x positions`` any forward fed to a layer."""

    def __init__(self, model):
        self.peak = 0
        self.peak_rows = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def _hook(self, module, args, output):
        x = args[0]
        tokens = x.numel() // x.shape[-1]
        self.peak = max(self.peak, tokens)
        self.peak_rows = max(self.peak_rows, x.shape[0] if x.dim() == 3 else 1)

    def close(self):
        for h in self.handles:
            h.remove()


def test_row_spans_and_compact():
    batch = _left_padded(_mixed_batch(), pad=0)
    rows = row_spans(batch["attention_mask"])
    assert rows.length == [9, 3, 13, 5, 12, 4, 7, 11]
    assert rows.start == [13 - n for n in rows.length]
    sub = compact(batch, rows, [1, 6], pad_id=0)
    assert sub["input_ids"].shape == (2, 7)
    assert torch.equal(sub["input_ids"][0, :3], batch["input_ids"][1, 10:])
    assert torch.equal(sub["attention_mask"], torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7]))
    assert torch.equal(sub["labels"], batch["labels"][[1, 6]])


def test_length_groups_cover_rows_within_bound():
    lengths = [9, 3, 13, 5, 12, 4, 7, 11, 13, 2, 40, 6]
    for bound in (40, 64, 100, 10_000):
        groups = length_groups(lengths, bound)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[i] for i in g) <= bound
    # no padding is worth a group when each group costs nothing; one group when groups are expensive
    assert all(len({lengths[i] for i in g}) == 1 for g in length_groups(lengths, 10_000, overhead=0))
    assert len(length_groups(lengths, 10_000, overhead=10_000)) == 1
    with pytest.raises(ValueError, match="max_tokens_per_forward=39"):
        length_groups(lengths, 39)


def test_bad_masks_are_refused():
    batch = tiny_batch()
    holes = dict(batch, attention_mask=batch["attention_mask"].clone())
    holes["attention_mask"][0, 4] = 0
    with pytest.raises(ValueError, match="row 0 has padding between tokens"):
        attention_attribution(tiny_model(), holes, steps=2)
    empty = dict(batch, attention_mask=batch["attention_mask"].clone())
    empty["attention_mask"][2] = 0
    with pytest.raises(ValueError, match="row 2 has no token"):
        attention_attribution(tiny_model(), empty, steps=2)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_row_order_does_not_change_results(mode):
    model, batch = tiny_model(), _mixed_batch()
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = {k: v[perm] for k, v in batch.items()}
    a = attention_attribution(model, batch, steps=5, target="gold", mode=mode)
    b = attention_attribution(model, shuffled, steps=5, target="gold", mode=mode)
    assert a.abs().max() > 0
    assert torch.allclose(a[perm], b, atol=1e-6, rtol=1e-5)
    # each row as computed alone, unpadded
    for row in (1, 2):
        n = int(batch["attention_mask"][row].sum())
        one = {k: (v[row : row + 1, :n] if v.dim() == 2 else v[row : row + 1]) for k, v in batch.items()}
        alone = attention_attribution(model, one, steps=5, target="gold", mode=mode)
        # float32 rounding of other GEMM shapes (padded batch vs one row): up to 3.7e-6 on values of 0.63 (AMD EPYC, MKL)
        assert torch.allclose(a[row, ..., :n, :n], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind, mode", [(k, "fast") for k in FAMILY_KINDS] + [("bert", "reference"), ("roberta", "reference")]
)
def test_left_padding_equals_right_padding(kind, mode):
    """Left padding (tokenizer padding_side='left') gives each example's own attribution, at the caller's columns."""
    model = tiny_model(kind)
    right = _mixed_batch(kind)
    left = _left_padded(right, pad=_pad(kind))
    a = attention_attribution(model, right, steps=4, target="gold", mode=mode)
    b = attention_attribution(model, left, steps=4, target="gold", mode=mode)
    assert a.abs().max() > 0
    assert torch.allclose(_right_to_left_layout(a, right), b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_attribution_forwards_stay_within_token_bound(mode):
    model, batch = tiny_model(), _mixed_batch()
    free = attention_attribution(model, batch, steps=7, target="gold", mode=mode, max_tokens_per_forward=10**6)
    for bound in (13, 40):
        meter = TokenMeter(model)
        bounded = attention_attribution(model, batch, steps=7, target="gold", mode=mode, max_tokens_per_forward=bound)
        meter.close()
        assert 0 < meter.peak <= bound
        assert torch.allclose(bounded, free, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit max_tokens_per_forward=12"):
        attention_attribution(model, batch, steps=2, mode=mode, max_tokens_per_forward=12)


def test_chunk_size_caps_rows_even_when_batch_is_larger():
    """The deprecated chunk_size still holds: never more (example, alpha) rows per forward than it."""
    model, batch = tiny_model(), _mixed_batch()
    free = attention_attribution(model, batch, steps=7, target="gold")
    meter = TokenMeter(model)
    capped = attention_attribution(model, batch, steps=7, target="gold", chunk_size=3)
    meter.close()
    assert 0 < meter.peak_rows <= 3  # batch of 8 rows, chunk of 3
    assert torch.allclose(capped, free, atol=1e-6, rtol=1e-5)


def _methods(model, loader, acc, bound):
    return {
        "attattr": imp.attattr_importance(model, loader, acc, steps=3, max_tokens_per_forward=bound, description=None),
        "taylor": imp.taylor_importance(model, loader, acc, max_tokens_per_forward=bound, description=None),
        "accuracy_difference": imp.accuracy_difference_importance(model, loader, acc, max_tokens_per_forward=bound, description=None),
        "attention": imp.attention_importance(model, loader, acc, max_tokens_per_forward=bound, description=None),
    }


def test_every_method_stays_within_token_bound_and_ignores_order(accelerator):
    model, batch = tiny_model(), _mixed_batch()
    free = _methods(model, [batch], accelerator, 10**6)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled_left = _left_padded({k: v[perm] for k, v in batch.items()}, pad=0)
    halves = [{k: v[:3] for k, v in shuffled_left.items()}, {k: v[3:] for k, v in shuffled_left.items()}]
    meter = TokenMeter(model)
    bounded = _methods(model, halves, accelerator, 26)
    meter.close()
    assert 0 < meter.peak <= 26
    for name, scores in free.items():
        assert scores.abs().max() > 0, name
        assert torch.allclose(bounded[name], scores, atol=1e-6, rtol=1e-5), name


def test_fast_path_records_only_requested_layers(monkeypatch):
    import prune_attattr.importance.attattr as attattr_mod

    recorded = []

    class Spy(attattr_mod.AttentionControl):
        def wants_record(self, layer):
            hit = super().wants_record(layer)
            if hit:
                recorded.append(layer)
            return hit

    monkeypatch.setattr(attattr_mod, "AttentionControl", Spy)
    model, batch = tiny_model(), tiny_batch()
    attention_attribution(model, batch, steps=2, layers=[1])
    assert recorded and set(recorded) == {1}


def test_recipe_settings_for_the_token_bound():
    from pydantic import ValidationError

    from prune_attattr.config import AttAttrSettings, ImportanceSettings
    from prune_attattr.importance import DEFAULT_MAX_TOKENS

    assert ImportanceSettings().max_tokens_per_forward == DEFAULT_MAX_TOKENS
    assert AttAttrSettings().chunk_size is None  # no row cap unless asked: the token bound holds
    with pytest.raises(ValidationError):
        ImportanceSettings(max_tokens_per_forward=0)
    with pytest.warns(FutureWarning, match="max_tokens_per_forward"):
        assert AttAttrSettings(chunk_size=64).chunk_size == 64


def test_empty_loader_is_an_error(accelerator):
    with pytest.raises(ValueError, match="no batch"):
        imp.attention_importance(tiny_model(), [], accelerator, description=None)
