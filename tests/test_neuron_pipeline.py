"""The whole pipeline with feed-forward neurons beside heads under a FLOPs budget (issue 15): curves on the
FLOPs axis, recovery by least squares or distillation, export by FLOPs, resume from the stage cache."""

import json

import pytest
from _tiny_run import make_tiny_model_dir, tiny_recipe
from prune_attattr.cli import main
from prune_attattr.config import RecipeError, load_recipe

SECTIONS = """
importance: {methods: [attattr, fisher, accuracy_difference, random], examples: 12, batch_size: 4, attattr: {steps: 2, quadrature: gauss}}
pruning: {units: both, compare_units: [heads], flops_steps: [1.0, 0.7, 0.5, 0.35], eval_batch_size: 8}
export: {method: attattr, flops: 0.5, onnx: true, quantize: int8}
recovery: {enabled: true, mode: least_squares, train_examples: 48, batch_size: 16, least_squares_examples: 32}
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def _run(tmp_path, model_dir, sections=SECTIONS, *extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(model_dir, tmp_path / "out", tmp_path / "cache", run_name="n", sections=sections))
    code = main([str(recipe), "--force", *extra])
    return code, tmp_path / "out" / "n"


def test_flops_budget_pipeline_exports_within_budget(tmp_path, tiny_dir, capsys):
    code, out = _run(tmp_path, tiny_dir)
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    curves = report["curves"]
    # one curve per method for both units, a heads-only comparison for the neuron methods, one for head-only methods
    assert set(curves) == {"attattr", "attattr (heads)", "fisher", "fisher (heads)", "accuracy_difference", "random", "random (heads)"}
    for name, steps in curves.items():
        assert steps[0]["flops_fraction"] == pytest.approx(1.0) and steps[0]["heads_kept"] == 12
        for s in steps:
            assert s["flops_fraction"] <= s["budget"] + 1e-9  # the search meets each budget
        if name in ("attattr", "fisher", "random"):
            assert [s["budget"] for s in steps] == [1.0, 0.7, 0.5, 0.35]
            assert any(s["neurons_kept"] < 3 * 64 for s in steps[1:])  # neurons are pruned
        else:  # heads only: every neuron kept, and budgets below what heads alone can reach are left out
            assert all(s["neurons_kept"] == 3 * 64 and not s["pruned_neurons"] for s in steps)
            assert [s["budget"] for s in steps] != [1.0, 0.7, 0.5, 0.35]
    exp = report["export"]
    assert exp["flops_fraction"] <= 0.5 + 1e-9 and exp["pruned_neurons"]
    assert report["recovery"]["settings"]["mode"] == "least_squares"
    # the exported checkpoint carries the pruned heads and neurons and reloads to the same logits as the ONNX graph
    from prune_attattr import load_pruned
    from prune_attattr.models import kept_neurons

    model = load_pruned(out / "model")
    assert sum(len(n) for n in kept_neurons(model)) == exp["neurons_kept"]
    assert exp["onnx"]["max_abs_diff"] < 1e-4
    # issue 16: the deployed (int8) graph's metric in the report is an ONNX Runtime evaluation of the shipped file
    from prune_attattr.deploy.onnx_eval import evaluate_onnx
    from prune_attattr.tasks import load_task_data

    # (issue 21: the shipped graph is the fastest that gives each sentence the same label at batch 1 and 16)
    deployed = exp["deployment"]["pruned"]
    kind = deployed["precision"]
    assert deployed["files"] == {"float32": "model.onnx" if kind == "float32" else "model_fp32.onnx", "int8": "model.onnx" if kind == "int8" else "model_int8.onnx", "int8_static": None}
    assert deployed["choice"]["candidates"][kind]["holds"] or kind == "float32"
    dev = load_task_data(load_recipe(out / "recipe.yaml"))[1]
    again = evaluate_onnx(out / "onnx" / "model.onnx", dev, ["accuracy"], max_length=32)
    assert deployed["metrics"][kind]["accuracy"] == pytest.approx(again["accuracy"])
    labels = [r["label"] for r in exp["deployment"]["bench"]["rows"]]
    assert len(labels) == 4 and (out / "unpruned" / "onnx" / "model.onnx").exists()
    importance = json.loads((out / "importance.json").read_text())
    assert set(importance) == {"heads", "neurons"} and len(importance["neurons"]["attattr"][0]) == 64
    assert (out / "neuron_importance.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "versus FLOPs kept (%)" in md and "| 50% |" in md and "least squares" in md


def test_resumed_flops_run_reuses_neuron_importance_and_steps(tmp_path, tiny_dir, capsys, monkeypatch):
    sections = SECTIONS.replace("recovery: {enabled: true", "recovery: {enabled: false")
    assert _run(tmp_path, tiny_dir, sections)[0] == 0
    from prune_attattr.stages import importance as stage

    def boom(*a, **k):
        raise AssertionError("neuron importance recomputed")

    monkeypatch.setattr(stage, "compute_neuron_importance", boom)
    code, out = _run(tmp_path, tiny_dir, sections)
    assert code == 0, capsys.readouterr().err
    reused = json.loads((out / "report.json").read_text())["reused"]
    assert "neuron importance: attattr" in reused and any(r.startswith("pruning curve: attattr (4/4") for r in reused)


def test_distillation_recovers_the_flops_budget_model(tmp_path, tiny_dir, capsys):
    sections = SECTIONS.replace("mode: least_squares", "mode: distill").replace("importance: {methods: [attattr, fisher, accuracy_difference, random]", "importance: {methods: [attattr]")
    sections = sections.replace("compare_units: [heads], ", "")
    code, out = _run(tmp_path, tiny_dir, sections)
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    row = next(m for m in report["recovery"]["models"] if m.get("exported"))
    assert row["flops_fraction"] <= 0.5 + 1e-9 and row["recovery_minutes"] is not None
    assert report["export"]["metrics"]["accuracy"] == pytest.approx(row["metric_after"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pruning.units=both", "export.heads=10"], "export.heads counts heads only"),
        (["pruning.units=both", "export.method=attention", "importance.methods=[attention]"], "scores heads only"),
        (["export.flops=0.5", "export.heads=10"], "set one of them"),
        (["pruning.flops_steps=[1.5]"], "in (0, 1]"),
        (["pruning.units=both", "pruning.schedule=iterative", "recovery.enabled=true", "recovery.mode=least_squares"], "recovery.mode distill"),
    ],
)
def test_neuron_recipe_errors_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_recipe(None, overrides)


def test_unreachable_export_budget_is_one_line(tmp_path, tiny_dir, capsys):
    sections = SECTIONS.replace("flops: 0.5", "flops: 0.001").replace("recovery: {enabled: true", "recovery: {enabled: false")
    code, _ = _run(tmp_path, tiny_dir, sections)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "export.flops 0.001 cannot be reached" in err and "lowest FLOPs fraction" in err
    assert "== importance" not in captured.out  # found right after loading, before any long stage
