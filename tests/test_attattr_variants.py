"""AttAttr for pruning (issue 20): aggregates (max, sum, abs_sum, sq_sum) and objectives (prob, log_prob).

A head's summed attribution is integrated gradients over a gate on its output along the joint path;
sums are complete per layer (heads and neurons); leave-one-out equals the masked model; every variant
runs through importance, search and pruning on a tiny model of each family; the paper's default is
unchanged; balance and cache key follow the settings."""

import copy

import pytest
import torch
from accelerate import Accelerator
from conftest import FAMILY_KINDS, tiny_batch, tiny_model

from prune_attattr import AttentionControl
from prune_attattr import importance as imp
from prune_attattr.config import AttAttrSettings, RecipeError
from prune_attattr.importance.attattr import attention_attribution, attribution_head_sums, quadrature_nodes
from prune_attattr.importance.leave_one_out import leave_one_out, sample_neurons
from prune_attattr.importance.neurons import neuron_attribution, neuron_sums
from prune_attattr.models import forward_logits, intermediate_size
from prune_attattr.prune.cost import unit_flops
from prune_attattr.prune.curve import balance_for, choose_units
from prune_attattr.prune.units import prune_units

VARIANTS = [(a, o) for a in imp.AGGREGATES for o in imp.OBJECTIVES]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _loader(batch, accelerator, batch_size=3, pad=0):
    from prune_attattr.tasks import Encoded, make_dataloader

    keep = [m.bool() for m in batch["attention_mask"]]
    ids = [row[k].tolist() for row, k in zip(batch["input_ids"], keep)]
    types = [row[k].tolist() for row, k in zip(batch["token_type_ids"], keep)] if "token_type_ids" in batch else None
    return accelerator.prepare(make_dataloader(Encoded(ids, types, batch["labels"].tolist()), batch_size=batch_size, pad_id=pad))


def _objective(logits, labels, objective):
    logp = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
    return logp if objective == "log_prob" else logp.exp()


def _gate_ig(model, batch, layer, steps, quadrature, objective, kind="heads"):
    """Integrated gradients ``[B, units]`` over per-example gates of ``layer``'s heads (head_mask) or neurons
    (neuron_mask), along the joint path g = alpha * 1, by brute force (whole-model forwards)."""
    alphas, weights = quadrature_nodes(steps, quadrature)
    n = model.config.num_attention_heads if kind == "heads" else intermediate_size(model)
    bsz = batch["input_ids"].shape[0]
    total = torch.zeros(bsz, n)
    for a, w in zip(alphas.tolist(), weights.tolist()):
        gate = torch.full((bsz, n), a, requires_grad=True)
        control = AttentionControl(head_mask={layer: gate}) if kind == "heads" else AttentionControl(neuron_mask={layer: gate})
        f = _objective(forward_logits(model, batch, control), batch["labels"], objective)
        (g,) = torch.autograd.grad(f.sum(), gate)
        total += w * g
    return total


@pytest.mark.parametrize("objective", imp.OBJECTIVES)
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_head_sum_is_gate_integrated_gradients(mode, objective):
    """Σ over a head's T x T attribution = IG of a gate on its output along the joint path, same quadrature."""
    model, batch = tiny_model(), tiny_batch(batch=4)
    for layer in (0, 2):  # 2: the last layer, [CLS] only on the fast path
        attr = attention_attribution(model, batch, steps=6, target="gold", layers=[layer], mode=mode, objective=objective)
        got = attribution_head_sums(attr[:, 0], batch["attention_mask"])
        want = _gate_ig(model, batch, layer, 6, "left", objective)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()) + 1e-7, rtol=1e-4)


def test_neuron_sum_is_gate_integrated_gradients():
    model, batch = tiny_model(), tiny_batch(batch=3)
    for layer in (1, 2):
        attr = neuron_attribution(model, batch, steps=5, target="gold", layers=[layer], objective="log_prob")
        got = neuron_sums(attr[:, 0], batch["attention_mask"])
        want = _gate_ig(model, batch, layer, 5, "left", "log_prob", kind="neurons")
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()) + 1e-7, rtol=1e-4)


@pytest.mark.parametrize("objective", imp.OBJECTIVES)
def test_completeness_per_layer(objective):
    """Σ over a layer's heads (neurons) of the per-example sums = F(x) - F(layer's attention (activations) at 0)."""
    model, batch = tiny_model(), tiny_batch(batch=4)
    labels = batch["labels"]
    with torch.no_grad():
        f = _objective(forward_logits(model, batch), labels, objective)
    for layer in (0, 1, 2):
        with torch.no_grad():
            f0_heads = _objective(forward_logits(model, batch, AttentionControl(head_mask={layer: torch.zeros(4)})), labels, objective)
            f0_neurons = _objective(
                forward_logits(model, batch, AttentionControl(neuron_mask={layer: torch.zeros(intermediate_size(model))})), labels, objective
            )
        heads = attention_attribution(model, batch, steps=128, quadrature="gauss", target="gold", layers=[layer], objective=objective)
        head_total = attribution_head_sums(heads[:, 0], batch["attention_mask"]).sum(1)
        gap = f - f0_heads
        assert gap.abs().max() > 1e-2
        assert (head_total - gap).abs().max() < 1e-3 * gap.abs().max()
        neurons = neuron_attribution(model, batch, steps=128, quadrature="gauss", target="gold", layers=[layer], objective=objective)
        neuron_total = neuron_sums(neurons[:, 0], batch["attention_mask"]).sum(1)
        gap = f - f0_neurons
        assert gap.abs().max() > 1e-2
        assert (neuron_total - gap).abs().max() < 1e-3 * gap.abs().max()


def test_log_prob_gradient_is_prob_gradient_over_p():
    """One alpha (steps=1, left: alpha = 0 is useless, so midpoint): ∂log p = ∂p / p per example."""
    model, batch = tiny_model(), tiny_batch(batch=3)
    kw = dict(steps=1, quadrature="midpoint", target="gold", layers=[1])
    a_prob = attention_attribution(model, batch, objective="prob", **kw)
    a_log = attention_attribution(model, batch, objective="log_prob", **kw)
    alphas, _ = quadrature_nodes(1, "midpoint")
    with torch.no_grad():
        hm = {1: torch.full((4,), float(alphas[0]))}
        p = _objective(forward_logits(model, batch, AttentionControl(head_mask=hm)), batch["labels"], "prob")
    torch.testing.assert_close(a_log * p.view(-1, 1, 1, 1, 1), a_prob, atol=1e-6, rtol=1e-4)


def _masked(model, batch, layer, head=None, neuron=None):
    if head is not None:
        hm = torch.ones(model.config.num_attention_heads)
        hm[head] = 0
        control = AttentionControl(head_mask={layer: hm})
    else:
        nm = torch.ones(intermediate_size(model))
        nm[neuron] = 0
        control = AttentionControl(neuron_mask={layer: nm})
    with torch.no_grad():
        return forward_logits(model, batch, control)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_leave_one_out_equals_masked_model(kind, accelerator):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind, batch=6, seq=9)
    loader = _loader(batch, accelerator, 4, pad=model.config.pad_token_id or 0)
    chosen = sample_neurons(model, 5, seed=1)
    assert all(len(v) == 5 and v == sorted(v) for v in chosen.values())
    # a small token bound: units of a layer come in several forwards
    loo = leave_one_out(model, loader, accelerator, neurons=chosen, max_tokens_per_forward=60, description=None)
    labels = batch["labels"]
    with torch.no_grad():
        base = forward_logits(model, batch)
    ce = torch.nn.functional.cross_entropy
    assert abs(loo.base_loss - float(ce(base, labels))) < 1e-5
    acc = lambda lg: float((lg.argmax(-1) == labels).float().mean())  # noqa: E731
    assert abs(loo.base_metric - acc(base)) < 1e-6
    assert loo.head_loss.shape == (3, 4) and torch.isfinite(loo.head_loss).all()
    for layer in range(3):
        for h in range(4):
            lg = _masked(model, batch, layer, head=h)
            assert abs(float(loo.head_loss[layer, h]) - (float(ce(lg, labels)) - loo.base_loss)) < 1e-5
            assert abs(float(loo.head_metric[layer, h]) - (loo.base_metric - acc(lg))) < 1e-6
        for j, n in enumerate(chosen[layer]):
            lg = _masked(model, batch, layer, neuron=n)
            assert abs(float(loo.neuron_loss[layer][j]) - (float(ce(lg, labels)) - loo.base_loss)) < 1e-5
            assert abs(float(loo.neuron_metric[layer][j]) - (loo.base_metric - acc(lg))) < 1e-6
    assert loo.head_loss.abs().max() > 1e-3


def test_leave_one_out_pruned_model(accelerator):
    """A pruned model: its pruned heads are NaN, a pruned neuron is refused, the rest equals masking."""
    model = tiny_model()
    batch = tiny_batch(batch=5)
    pruned = prune_units(copy.deepcopy(model), heads={0: [1, 3]}, neurons={1: [0, 2]})
    loader = _loader(batch, accelerator, 5)
    loo = leave_one_out(pruned, loader, accelerator, neurons={1: [1, 5]}, description=None)
    assert torch.isnan(loo.head_loss[0, [1, 3]]).all() and torch.isfinite(loo.head_loss[0, [0, 2]]).all()
    hm = {0: torch.tensor([1.0, 0.0, 1.0, 0.0])}
    nm = torch.ones(intermediate_size(model))
    nm[[0, 2, 5]] = 0
    with torch.no_grad():
        lg = forward_logits(model, batch, AttentionControl(head_mask=hm, neuron_mask={1: nm}))
    ce = float(torch.nn.functional.cross_entropy(lg, batch["labels"]))
    assert abs(float(loo.neuron_loss[1][1]) - (ce - loo.base_loss)) < 1e-5
    with pytest.raises(ValueError, match="not present"):
        leave_one_out(pruned, loader, accelerator, neurons={1: [2]}, description=None)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_every_variant_through_the_pipeline(kind, accelerator):
    """Every (aggregate, objective): importance of heads and neurons (one pass per objective equals the
    separate calls), the joint FLOPs search with the balance ``auto`` picks, structural pruning, a forward."""
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind, batch=5, seq=9)
    loader = _loader(batch, accelerator, 3, pad=model.config.pad_token_id or 0)
    costs = unit_flops(model, 8.0)
    for objective in imp.OBJECTIVES:
        variants = imp.attattr_variants(model, loader, accelerator, objective=objective, steps=3, progress=False)
        assert set(variants) == set(imp.AGGREGATES)
        for aggregate in imp.AGGREGATES:
            heads, neurons = variants[aggregate]
            assert heads.shape == (3, model.config.num_attention_heads) and neurons.shape == (3, intermediate_size(model))
            assert torch.isfinite(heads).all() and torch.isfinite(neurons).all() and heads.abs().sum() > 0
            if aggregate in ("abs_sum", "sq_sum"):
                assert (heads >= 0).all() and (neurons >= 0).all()
            if (aggregate, objective) in (("sum", "log_prob"), ("max", "prob")):  # one pass == the separate functions
                h, n = imp.unit_importance("attattr", model, loader, accelerator, steps=3, aggregate=aggregate, objective=objective, progress=False)
                torch.testing.assert_close(h, heads)
                torch.testing.assert_close(n, neurons)
            balance = balance_for("attattr", "auto", aggregate)
            assert balance == ("cost" if aggregate == "max" else "none")
            choice = choose_units(model, heads, neurons, costs, 0.6, "both", balance)
            small = prune_units(copy.deepcopy(model), heads=choice.pruned_heads, neurons=choice.pruned_neurons)
            with torch.no_grad():
                assert torch.isfinite(forward_logits(small, batch)).all()


def test_aggregates_from_per_example_sums():
    """sum, abs_sum, sq_sum differ exactly as Σ s, Σ |s|, Σ s^2 of the per-example totals (signs matter)."""
    maxes = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    sums = torch.tensor([[0.5, -2.0], [-1.5, 1.0]])
    assert imp.aggregate_examples(maxes, sums, "max").tolist() == [4.0, 1.0]
    assert imp.aggregate_examples(maxes, sums, "sum").tolist() == [-1.0, -1.0]
    assert imp.aggregate_examples(maxes, sums, "abs_sum").tolist() == [2.0, 3.0]
    assert imp.aggregate_examples(maxes, sums, "sq_sum").tolist() == [2.5, 5.0]
    with pytest.raises(ValueError, match="unknown aggregate"):
        imp.aggregate_examples(maxes, sums, "mean")


def test_paper_default_unchanged(accelerator):
    """The library's defaults are the paper's (max of the T x T block of the probability's attribution, summed
    over examples); the recipe's pruning default is issue 20's measured choice, the paper one setting away."""
    s = AttAttrSettings()
    assert (s.aggregate, s.objective, s.steps, s.quadrature, s.target) == ("sq_sum", "log_prob", 20, "left", "gold")
    assert (AttAttrSettings(aggregate="max", objective="prob").aggregate) == "max"
    model, batch = tiny_model(), tiny_batch(batch=5)
    got = imp.attattr_importance(model, _loader(batch, accelerator), accelerator, steps=4, description=None)
    attr = attention_attribution(model, batch, steps=4, target="gold")  # [B, L, H, T, T]
    valid = batch["attention_mask"].bool()
    pair = (valid[:, :, None] & valid[:, None, :])[:, None, None]
    want = attr.masked_fill(~pair, float("-inf")).flatten(3).max(-1).values.sum(0)
    torch.testing.assert_close(got, want)
    other = imp.attattr_importance(model, _loader(batch, accelerator), accelerator, steps=4, aggregate="sum", description=None)
    assert not torch.allclose(other, got)


def test_settings_validated_and_balance():
    with pytest.raises(ValueError, match="aggregate"):
        AttAttrSettings(aggregate="mean")
    with pytest.raises(ValueError, match="objective"):
        AttAttrSettings(objective="loss")
    with pytest.raises(ValueError, match="objective"):
        attention_attribution(tiny_model(), tiny_batch(), steps=2, objective="loss")
    assert balance_for("attattr") == "cost" and balance_for("fisher") == "none" and balance_for("taylor") == "cost"
    assert balance_for("attattr", "cost", "sum") == "cost"  # an explicit setting wins
    assert balance_for("taylor", "auto", "sum") == "cost"  # the aggregate is AttAttr's only


def test_recipe_error_for_bad_aggregate(tmp_path):
    from prune_attattr.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("importance: {attattr: {aggregate: mean}}\n")
    with pytest.raises(RecipeError, match="aggregate"):
        load_recipe(path)


def test_cache_key_follows_the_settings():
    """The importance key changes with aggregate and objective, and is the pre-issue-20 key at the paper's values."""
    from types import SimpleNamespace

    from prune_attattr.config import Recipe
    from prune_attattr.stages.importance import _importance_key

    def key(**attattr):
        recipe = Recipe.model_validate({"importance": {"attattr": attattr}})
        prep = SimpleNamespace(ctx=SimpleNamespace(recipe=recipe, metrics=["accuracy"]), model_key="m", imp_enc=None)
        return _importance_key(prep, "attattr", tiny_model())

    import prune_attattr.stages.importance as stage

    real = stage.encoded_digest
    stage.encoded_digest = lambda enc: "examples"
    try:
        paper = key(aggregate="max", objective="prob")
        keys = {paper, key(aggregate="sum", objective="prob"), key(aggregate="max", objective="log_prob"), key(aggregate="sum", objective="log_prob")}
        assert len(keys) == 4 and key() not in keys  # the default (sq_sum, log_prob) has its own key
    finally:
        stage.encoded_digest = real


def test_stage_passes_the_settings(monkeypatch):
    """The importance stage hands the recipe's aggregate and objective to the head and the neuron method."""
    from types import SimpleNamespace

    from prune_attattr.config import load_recipe
    from prune_attattr.stages.importance import compute_importance, compute_neuron_importance

    seen = {}

    def spy(name):
        def fn(*args, **kwargs):
            seen[name] = (kwargs.get("aggregate"), kwargs.get("objective"))
            return None, None

        return fn

    monkeypatch.setattr(imp, "attattr_importance", spy("heads"))
    monkeypatch.setattr(imp, "unit_importance", spy("neurons"))
    recipe = load_recipe(None, ["importance.attattr.aggregate=sq_sum", "importance.attattr.objective=log_prob"])
    ctx = SimpleNamespace(recipe=recipe, accelerator=None, metrics=["accuracy"])
    compute_importance("attattr", None, None, ctx)
    compute_neuron_importance("attattr", None, None, ctx)
    assert seen == {"heads": ("sq_sum", "log_prob"), "neurons": ("sq_sum", "log_prob")}
