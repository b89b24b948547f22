"""Two CPU processes (accelerate, gloo) give the head importance and metrics of one process."""

import json
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
    return env


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(WORKER), str(one)], check=True, env=_env(), timeout=600)
    # note: `--cpu --num_processes 2` silently runs ONE process; --multi_gpu with Accelerator(cpu=True) runs two (gloo)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", str(WORKER), str(two),
    ]
    proc = subprocess.run(cmd, env=_env(), timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    for key in ("attattr", "taylor", "attention", "accuracy_difference"):
        x, y = torch.tensor(a[key]), torch.tensor(b[key])
        assert x.abs().max() > 0, key
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), key
    assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    assert abs(a["metrics"]["loss"] - b["metrics"]["loss"]) < 1e-6
