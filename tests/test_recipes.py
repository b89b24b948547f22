"""Every shipped recipe validates; bad input ends with one clear line, exit code 2, nothing written."""

from pathlib import Path

import pytest

from prune_attattr.cli import main
from prune_attattr.config import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"sst2.yaml", "smoke.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.run_name
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"prune-attattr recipes/{path.name}" in line for line in header), "header comment must give the command"


def test_overrides_parse_yaml_values():
    r = load_recipe(RECIPES[0], ["importance.examples=12", "importance.attattr.mode=reference", "pruning.rescore=true"])
    assert r.importance.examples == 12 and r.importance.attattr.mode == "reference" and r.pruning.rescore is True


def _run_cli(tmp_path, monkeypatch, capsys, text, *extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    monkeypatch.chdir(tmp_path)
    code = main([str(recipe), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "text,needle",
    [
        ("modle: {path: x}\n", "unknown key 'modle'"),
        ("importance: {examples: many}\n", "key 'importance.examples'"),
        ("importance: {methods: [attattr, magic]}\n", "unknown method(s) ['magic']"),
        ("data: {task: sst3}\n", "key 'data.task'"),
        ("export: {method: taylor}\nimportance: {methods: [attattr]}\n", "export.method 'taylor'"),
        ("analyses: {universality: {enabled: true, sets: [{name: a, task: mnli}]}}\n", "at least 2 analyses.universality.sets"),
        ("data: {task: custom, dev_file: d.csv}\n", "needs data.text_column"),
        ("model: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_recipe_one_line_exit_2(tmp_path, monkeypatch, capsys, text, needle):
    code, err = _run_cli(tmp_path, monkeypatch, capsys, text)
    assert code == 2
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "exported").exists()


def test_missing_recipe_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_files_found_at_run_time(tmp_path, monkeypatch, capsys):
    base = "run_name: t\nfinetune: {enabled: false}\nimportance: {source: dev, examples: 2}\n"
    code, err = _run_cli(tmp_path, monkeypatch, capsys, base + "model: {path: no/such/model}\n")
    assert code == 2 and "model.path 'no/such/model'" in err and len(err.splitlines()) == 1
    (tmp_path / "d.csv").write_text("text,label\nfine,pos\nbad,meh\n")
    custom = base + "data: {task: custom, dev_file: d.csv, text_column: text, label_column: label, labels: [neg, pos]}\n"
    code, err = _run_cli(tmp_path, monkeypatch, capsys, custom)
    assert code == 2 and "row 3 has label 'meh'" in err and len(err.splitlines()) == 1
    code, err = _run_cli(tmp_path, monkeypatch, capsys, custom.replace("d.csv", "missing.csv"))
    assert code == 2 and "missing.csv" in err
    assert not any((tmp_path / "exported").glob("*")) if (tmp_path / "exported").exists() else True


def test_unsupported_model_type(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_head=2, n_embd=8).save_pretrained(tmp_path / "gpt")
    code, err = _run_cli(tmp_path, monkeypatch, capsys, "finetune: {enabled: false}\nimportance: {source: dev}\nmodel: {path: gpt}\n")
    assert code == 2 and "model type 'gpt2'" in err


def test_existing_output_needs_force(tmp_path, monkeypatch, capsys):
    (tmp_path / "exported" / "keep").mkdir(parents=True)
    (tmp_path / "exported" / "keep" / "report.json").write_text("{}")
    code, err = _run_cli(tmp_path, monkeypatch, capsys, "run_name: keep\n")
    assert code == 2 and "--force" in err
    assert (tmp_path / "exported" / "keep" / "report.json").read_text() == "{}"


def test_load_recipe_raises_recipe_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("pruning: {step_fraction: 2}\n")
    with pytest.raises(RecipeError, match="pruning.step_fraction"):
        load_recipe(p)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a run: exit 130, no run folder, no temporary folder."""
    from conftest import save_tiny_classifier

    from prune_attattr.stages import curves

    save_tiny_classifier("bert", tmp_path / "m", id2label={0: "neg", 1: "pos"})  # a trained head is required without fine-tuning
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"a film {i},{'pos' if i % 2 else 'neg'}\n" for i in range(8)))
    text = (
        f"run_name: cut\nmodel: {{path: {tmp_path / 'm'}}}\n"
        "finetune: {enabled: false}\nimportance: {source: dev, examples: 4, methods: [random]}\n"
        "export: {method: random, heads: 6}\n"  # a random model is at chance: max_drop would stop first (issue 17)
        "data: {task: custom, dev_file: d.csv, text_column: text, label_column: label, labels: [neg, pos]}\n"
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(curves, "pruning_curve", interrupted)
    code, err = _run_cli(tmp_path, monkeypatch, capsys, text)
    assert code == 130 and "interrupted" in err, err
    assert list((tmp_path / "exported").iterdir()) == []


def test_token_bound_below_max_length_is_one_recipe_error(tmp_path):
    """A forward must hold at least one whole sequence: the bound is checked against model.max_length."""
    from prune_attattr.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="max_tokens_per_forward 32 is below model.max_length 64"):
        load_recipe(None, ["importance.max_tokens_per_forward=32", "model.max_length=64"])


def test_pipeline_passes_the_token_bound_to_every_method(monkeypatch):
    """importance.max_tokens_per_forward reaches each scoring method (not only the recipe)."""
    from types import SimpleNamespace

    from prune_attattr import importance as imp
    from prune_attattr.config import load_recipe
    from prune_attattr.stages.importance import compute_importance

    seen = {}

    def spy(name):
        def fn(*args, **kwargs):
            seen[name] = kwargs.get("max_tokens_per_forward")
            return None

        return fn

    for name in ("attattr_importance", "taylor_importance", "accuracy_difference_importance", "attention_importance"):
        monkeypatch.setattr(imp, name, spy(name))
    recipe = load_recipe(None, ["importance.max_tokens_per_forward=4096"])
    ctx = SimpleNamespace(recipe=recipe, accelerator=None, metrics=["accuracy"])
    for method in ("attattr", "taylor", "accuracy_difference", "attention"):
        compute_importance(method, None, None, ctx)
    assert seen == {n: 4096 for n in seen} and len(seen) == 4
