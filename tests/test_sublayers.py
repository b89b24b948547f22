"""Whole sublayers as units (issue 21 item 1), in every family: a removed sublayer equals the model whose
sublayer gate is 0 (before any recovery); its weights and operators are gone; save/reload with
prune_attattr and with stock transformers alone; ONNX == PyTorch without the removed operators."""

import copy
import json

import pytest
import torch
from conftest import FAMILY_KINDS, load_with_stock_transformers, tiny_batch, tiny_model

from prune_attattr import AttentionControl, load_classifier, load_pruned, save_pruned
from prune_attattr.deploy.onnx_export import check_onnx, export_onnx_folder
from prune_attattr.families import REMOVED_SUBLAYERS_KEY, ModelError, family_of
from prune_attattr.models import (
    forward_logits,
    input_names,
    intermediate_size,
    kept_heads,
    kept_neurons,
    removed_sublayers,
)
from prune_attattr.prune.heads import count_parameters
from prune_attattr.prune.units import prune_units
from prune_attattr.prune.sublayers import remove_sublayers

REMOVE = {0: ["ffn"], 1: ["attention"], 2: ["attention", "ffn"]}  # layer 2 is gone entirely


def _emptied(model):
    """The same sublayers as REMOVE with every unit pruned but the residual and norm kept."""
    every = range(intermediate_size(model))
    return prune_units(copy.deepcopy(model), heads={1: range(4), 2: range(4)}, neurons={0: every, 2: every})


def _gated(model, batch, remove, value=0.0):
    gates = {(layer, w): torch.tensor(value) for layer, ws in remove.items() for w in ws}
    with torch.no_grad():
        return forward_logits(model, batch, AttentionControl(sublayer_gate=gates))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_removed_sublayer_equals_gate_zero(kind):
    model = tiny_model(kind)
    batch = tiny_batch(kind=kind)
    with torch.no_grad():
        plain = forward_logits(model, batch)
    assert torch.allclose(_gated(model, batch, REMOVE, 1.0), plain, atol=1e-5)  # gate 1 is the model
    want = _gated(model, batch, REMOVE)
    removed = remove_sublayers(copy.deepcopy(model), REMOVE)
    with torch.no_grad():
        got = forward_logits(removed, batch)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    assert not torch.allclose(got, plain, atol=1e-3)
    assert removed_sublayers(removed) == REMOVE
    assert getattr(removed.config, REMOVED_SUBLAYERS_KEY) == {str(k): v for k, v in REMOVE.items()}
    assert [len(h) for h in kept_heads(removed)] == [4, 0, 0]
    assert [len(n) for n in kept_neurons(removed)][0] == 0 and len(kept_neurons(removed)[2]) == 0
    # the sublayers' weights went with them: every removed post-norm sublayer took its LayerNorm, and
    # removing sublayers of a model whose heads and neurons were already pruned removes more
    assert count_parameters(removed) < count_parameters(_emptied(model))
    # a second removal of the same sublayers changes nothing; a partly pruned model can lose sublayers too
    again = remove_sublayers(removed, {2: ["attention"]})
    with torch.no_grad():
        assert torch.equal(forward_logits(again, batch), got)


def test_bad_sublayers_refused_and_runners_refuse_removed_layers():
    model = tiny_model()
    with pytest.raises(ValueError, match="layer 7 out of range"):
        remove_sublayers(model, {7: ["ffn"]})
    with pytest.raises(ValueError, match="'attention' or 'ffn'"):
        remove_sublayers(model, {0: ["mlp"]})
    from prune_attattr import attention_attribution

    removed = remove_sublayers(model, {2: ["ffn"]})  # the last layer, which the fast path runs for [CLS] only
    with pytest.raises(ModelError, match="ffn sublayer was removed"):
        attention_attribution(removed, tiny_batch(), steps=2)


def test_save_reload_and_stock_transformers_without_prune_attattr(tmp_path):
    folders, want = [], {}
    for kind in FAMILY_KINDS:
        model = prune_units(tiny_model(kind), heads={0: [1]}, neurons={1: [0, 2, 5]})
        model = remove_sublayers(model, REMOVE)
        batch = tiny_batch(kind=kind)
        batch = {k: batch[k] for k in input_names(model)}
        folder = str(tmp_path / kind)
        save_pruned(model, folder)
        saved = json.loads((tmp_path / kind / "config.json").read_text())
        assert saved[REMOVED_SUBLAYERS_KEY] == {str(k): v for k, v in REMOVE.items()}
        with torch.no_grad():
            want[folder] = (forward_logits(model, batch), count_parameters(model))
        for loader in (load_pruned, load_classifier):
            again = loader(folder)
            assert removed_sublayers(again) == REMOVE and kept_heads(again) == kept_heads(model)
            with torch.no_grad():
                assert torch.equal(forward_logits(again, batch), want[folder][0]), (kind, loader.__name__)
        torch.save(batch, folder + "/batch.pt")
        folders.append(folder)
    got = load_with_stock_transformers(folders, tmp_path)
    for folder in folders:
        diff = float((torch.tensor(got[folder]["logits"]) - want[folder][0]).abs().max())
        assert diff <= 1e-5, (folder, diff)
        assert got[folder]["parameters"] == want[folder][1], folder


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_onnx_equals_pytorch_without_the_removed_operators(kind, tmp_path):
    import onnx

    def ops(model, folder):
        path = export_onnx_folder(model, folder, tiny_batch(kind=kind, batch=2, seq=7))
        graph = onnx.load(str(path)).graph
        return path, [n.op_type for n in graph.node]

    model = tiny_model(kind)
    removed = remove_sublayers(copy.deepcopy(model), REMOVE)
    _, before = ops(_emptied(model), tmp_path / "emptied")
    path, after = ops(removed, tmp_path / "removed")
    # against the same sublayers emptied of units (residual, norm and output bias left): each removed
    # sublayer takes its residual addition out of the graph, and a post-norm one its norm (a pre-norm
    # sublayer's norm only fed its units, so emptying it already took the norm)
    assert len(after) <= len(before) - 6, (len(before), len(after))
    assert sum(op == "Add" for op in before) - sum(op == "Add" for op in after) >= 4
    norms = sum(op == "LayerNormalization" for op in before) - sum(op == "LayerNormalization" for op in after)
    assert norms == (4 if family_of(model).sublayers["ffn"].residual else 0)
    batches = [tiny_batch(seed=s, batch=b, seq=t, kind=kind) for s, b, t in ((2, 1, 5), (3, 5, 19), (4, 3, 11))]
    assert check_onnx(removed, path, batches) <= 1e-4


# ---- importance of whole sublayers ---------------------------------------------------------------


def _loader(kind="bert", n=6):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    batch = tiny_batch(kind=kind, batch=n, seq=9)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    accelerator = Accelerator(cpu=True)
    return DataLoader(rows, batch_size=4), accelerator, batch


def _objective(model, batch, gates, objective):
    from prune_attattr.importance.attattr import _target_prob

    with torch.no_grad():
        logits = forward_logits(model, batch, AttentionControl(sublayer_gate=gates) if gates else None)
    return _target_prob(logits, batch["labels"], objective)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "modernbert"])
def test_sublayer_attributions_are_complete_per_layer(kind):
    """Integrated gradients over a layer's two gates add up to F(model) - F(that layer removed)."""
    from prune_attattr.importance.sublayers import sublayer_attributions

    model = tiny_model(kind, init=0.05)  # weights of a trained model's size: a smooth path in alpha
    loader, accelerator, batch = _loader(kind)
    attr = sublayer_attributions(model, loader, accelerator, steps=64, quadrature="gauss", objective="log_prob", description=None)
    assert attr.shape == (6, 3, 2)
    whole = _objective(model, batch, {}, "log_prob")
    for layer in range(3):
        gone = _objective(model, batch, {(layer, w): torch.tensor(0.0) for w in ("attention", "ffn")}, "log_prob")
        assert torch.allclose(attr[:, layer].sum(-1), whole - gone, atol=2e-3), (layer, attr[:, layer].sum(-1), whole - gone)
    # the paper's left Riemann sum of 20 steps approximates the same integral (error O(1/m))
    left = sublayer_attributions(model, loader, accelerator, steps=20, objective="log_prob", description=None)
    error = float((left - attr).abs().max()) / float(attr.abs().max())
    assert 0 < error < 0.25, error


def test_sublayer_gradients_are_the_loss_derivative_and_removed_sublayers_score_zero():
    from prune_attattr.importance.sublayers import (
        sublayer_gradients,
        sublayer_importance,
    )

    model = tiny_model()
    loader, accelerator, batch = _loader()
    grads = sublayer_gradients(model, loader, accelerator, description=None)
    eps = 1e-3
    for layer, w in ((0, "attention"), (1, "ffn"), (2, "ffn")):
        up = -_objective(model, batch, {(layer, w): torch.tensor(1 + eps)}, "log_prob")
        down = -_objective(model, batch, {(layer, w): torch.tensor(1 - eps)}, "log_prob")
        fd = (up - down) / (2 * eps)  # per-example d(cross-entropy)/dg
        assert torch.allclose(grads[:, layer, ("attention", "ffn").index(w)], fd, atol=1e-3, rtol=1e-3), (layer, w)
    removed = remove_sublayers(copy.deepcopy(model), {1: ["ffn"]})
    for method in ("taylor", "fisher", "attattr", "random"):
        scores = sublayer_importance(method, removed, loader, accelerator, steps=4, progress=False)
        assert scores.shape == (3, 2) and scores[1, 1] == 0 and (scores[[0, 1, 2], [0, 0, 1]] > 0).all(), method
    with pytest.raises(ValueError, match="does not score whole sublayers"):
        sublayer_importance("accuracy_difference", model, loader, accelerator)


# ---- the search with whole sublayers ---------------------------------------------------------------


def test_search_with_sublayers():
    from prune_attattr.prune.search import search_sublayers, search_units

    torch.manual_seed(0)
    L, H, N = 3, 4, 16
    hs, ns = torch.rand(L, H) + 0.1, torch.rand(L, N) + 0.1
    hc, nc, fixed = [10.0] * L, [1.0] * L, 5.0
    full = fixed + H * 10 * L + N * L
    never = torch.full((L, 2), 1e6)
    plain = search_units(hs, ns, hc, nc, fixed, 0.5, units="both", balance="none")
    # sublayers too important to remove and free: exactly the unit search
    same = search_sublayers(hs, ns, never, hc, nc, fixed, 0.0, 0.5)
    assert same.removed == {} and same.units == plain
    # a sublayer whose units are worth little goes when it has a cost of its own: the cost it frees buys
    # units elsewhere; a sublayer score below its units' never makes removal look cheaper than that
    weak = ns.clone()
    weak[1] = 1e-4
    got = search_sublayers(hs, weak, torch.zeros(L, 2), hc, nc, fixed, 8.0, 0.5)
    kept_every = search_sublayers(hs, weak, never, hc, nc, fixed, 8.0, 0.5)
    assert got.removed.get(1) == ["ffn"] and kept_every.removed == {}, got.removed
    assert got.objective > kept_every.objective  # each removal raised the kept importance
    assert got.units.pruned_neurons[1] == list(range(N))
    assert got.cost <= 0.5 * (full + 8.0 * 2 * L) + 1e-9
    keep_all = search_sublayers(hs, ns, torch.zeros(L, 2), hc, nc, fixed, 0.0, 0.5)
    assert keep_all.removed == {} and keep_all.units == plain  # free sublayers, units that matter: nothing removed
    # a sublayer scored above its units is protected by its score: removing it costs the difference
    assert search_sublayers(hs, weak, torch.tensor([[1e6, 1e6], [1e6, 1e6], [1e6, 1e6]]), hc, nc, fixed, 8.0, 0.5).removed == {}
    # a budget the present sublayers' own cost exceeds: the lowest-scored sublayers go first
    order = torch.tensor([[5.0, 4.0], [3.0, 2.0], [1.0, 6.0]])
    forced = search_sublayers(hs, ns, order * 1e6, hc, nc, fixed, 100.0, 0.3)  # room for two present sublayers
    assert forced.removed == {0: ["ffn"], 1: ["attention", "ffn"], 2: ["attention"]}, forced.removed
    # a per-sublayer cost is paid by every present sublayer and budgeted: the same budget keeps fewer units
    costly = search_sublayers(hs, ns, never, hc, nc, fixed, 8.0, 0.5)
    assert costly.cost <= 0.5 * (full + 8.0 * 2 * L) + 1e-9
    assert costly.units.heads_kept + costly.units.neurons_kept < plain.heads_kept + plain.neurons_kept
    # already removed sublayers stay removed and their units are not candidates
    kept_h = [list(range(H)), [], list(range(H))]
    again = search_sublayers(hs, ns, never, hc, nc, fixed, 0.0, 0.5, kept_heads=kept_h, kept_neurons=[list(range(N))] * L, removed={1: ["attention"]})
    assert again.removed == {1: ["attention"]} and again.units.pruned_heads[1] == list(range(H))
    with pytest.raises(Exception, match="sublayer_scores must be"):
        search_sublayers(hs, ns, torch.zeros(L, 3), hc, nc, fixed, 0.0, 0.5)


# ---- the pipeline ----------------------------------------------------------------------------------

PIPELINE = """
importance: {methods: [taylor, attattr, accuracy_difference], examples: 12, batch_size: 4, attattr: {steps: 2, quadrature: gauss, aggregate: sq_sum, objective: log_prob}}
pruning: {units: both, flops_steps: [1.0, 0.6, 0.35], eval_batch_size: 8, sublayers: true, sublayer_cost: 0.2}
export: {method: taylor, flops: 0.35, onnx: true, quantize: none}
recovery: {enabled: true, mode: distill, train_examples: 48, batch_size: 16, epochs: 1}
"""


def test_pipeline_removes_sublayers_under_a_cost_budget_and_exports_them(tmp_path):
    """With a per-sublayer cost of 0.2 of the FLOPs, six present sublayers cost more than a 35% budget allows:
    the search must remove sublayers; the export carries them to the checkpoint and the ONNX graph."""
    from _tiny_run import make_tiny_model_dir, tiny_recipe

    from prune_attattr.cli import main

    model_dir = make_tiny_model_dir(tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(model_dir, tmp_path / "out", tmp_path / "cache", run_name="s", sections=PIPELINE))
    assert main([str(recipe), "--force"]) == 0
    out = tmp_path / "out" / "s"
    report = json.loads((out / "report.json").read_text())
    for name in ("taylor", "attattr"):
        steps = report["curves"][name]
        assert steps[0]["removed_sublayers"] == {}
        assert sum(len(v) for v in steps[-1]["removed_sublayers"].values()) >= 3, (name, steps[-1])
        for s in steps[1:]:  # the cost budget: FLOPs plus 0.2 per present sublayer, as a fraction of the unpruned cost
            present = 6 - sum(len(v) for v in s["removed_sublayers"].values())
            assert (s["flops_fraction"] + 0.2 * present) / (1 + 0.2 * 6) <= s["budget"] + 1e-6
    assert all(not s["removed_sublayers"] for s in report["curves"]["accuracy_difference"])  # heads only: no sublayer scores
    exp = report["export"]
    assert exp["removed_sublayers"] == report["curves"]["taylor"][-1]["removed_sublayers"]
    assert exp["rule"].startswith("cost (FLOPs per token plus 0.2 of the unpruned FLOPs per present sublayer) at most 35%")
    from prune_attattr import load_pruned

    model = load_pruned(out / "model")
    assert {str(k): v for k, v in removed_sublayers(model).items()} == exp["removed_sublayers"]
    assert exp["onnx"]["max_abs_diff"] < 1e-4
    # a second run takes the sublayer scores and the removed steps from the cache
    assert main([str(recipe), "--force"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert "sublayer importance: taylor" in again["reused"] and again["export"]["removed_sublayers"] == exp["removed_sublayers"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruning.units=heads", "set pruning.units both"),
        ("recovery.mode=least_squares", "set recovery.mode distill"),
        ("pruning.schedule=iterative", "pruning.schedule one_shot"),
    ],
)
def test_sublayer_settings_refused_with_one_line(tmp_path, override, message):
    from _tiny_run import tiny_recipe

    from prune_attattr.config import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(tmp_path / "m", tmp_path / "out", tmp_path / "cache", sections=PIPELINE))
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, [override])


def test_sublayer_attributions_do_not_depend_on_the_token_bound():
    """A bound below one example's steps copies still runs (one example per forward) and gives the same numbers."""
    from prune_attattr.importance.sublayers import sublayer_attributions

    model = tiny_model()
    loader, accelerator, _ = _loader()
    wide = sublayer_attributions(model, loader, accelerator, steps=5, description=None)
    tight = sublayer_attributions(model, loader, accelerator, steps=5, max_tokens_per_forward=12, description=None)
    assert torch.allclose(wide, tight, atol=1e-5)
