"""Measure every cell of the family table on tiny random models saved with save_pretrained.

For each family: load (stock checkpoint through load_classifier), attribution (fast vs reference vs
a per-alpha loop, max |diff|), prune (pruned vs masked logits, a whole layer included), save/load
(load_pruned and stock transformers in a process where prune_attattr cannot be imported), ONNX
(onnxruntime vs PyTorch). Prints a Markdown table of max absolute differences.

Run:  PYTHONPATH=$PWD python benchmarks/family_table.py
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import FAMILY_KINDS, save_tiny_classifier, tiny_batch  # noqa: E402
from test_families import _STOCK_LOADER, PRUNE, _brute_force, _masked_logits  # noqa: E402

from prune_attattr import attention_attribution, load_classifier, load_pruned, prune_heads, save_pruned  # noqa: E402
from prune_attattr.deploy.onnx_export import check_onnx, export_onnx_folder  # noqa: E402
from prune_attattr.models import ModelError, forward_logits, input_names  # noqa: E402


def measure(kind: str, work: Path) -> dict:
    row: dict = {}
    save_tiny_classifier(kind, work / "src", labels=3)
    model = load_classifier(work / "src")
    batch = tiny_batch(kind=kind, batch=3)
    row["load"] = "ok"
    fast = attention_attribution(model, batch, steps=3, mode="fast")
    ref = attention_attribution(model, batch, steps=3, mode="reference")
    brute = max(float((fast[:, layer] - _brute_force(model, batch, layer, 3)).abs().max()) for layer in range(3))
    row["attribution"] = f"fast-ref {float((fast - ref).abs().max()):.1e}, fast-loop {brute:.1e} (max |attr| {float(fast.abs().max()):.2f})"
    diffs = []
    for heads in (PRUNE, {2: [0, 1, 2, 3]}):
        pruned = prune_heads(copy.deepcopy(model), heads)
        with torch.no_grad():
            diffs.append(float((forward_logits(pruned, batch) - _masked_logits(model, batch, heads)).abs().max()))
    row["prune"] = f"{max(diffs):.1e}"
    pruned = prune_heads(copy.deepcopy(model), PRUNE)
    save_pruned(pruned, work / "pruned")
    with torch.no_grad():
        want = forward_logits(pruned, batch)
        ours = float((forward_logits(load_pruned(work / "pruned"), batch) - want).abs().max())
    torch.save({k: batch[k] for k in input_names(pruned)}, work / "pruned" / "batch.pt")
    row["_want"] = want
    row["save/load"] = f"load_pruned {ours:.1e}"
    onnx = export_onnx_folder(pruned, work / "onnx", tiny_batch(kind=kind, batch=2, seq=7))
    batches = [tiny_batch(seed=s, batch=b, seq=t, kind=kind) for s, b, t in ((2, 1, 5), (3, 5, 19), (4, 3, 11))]
    row["ONNX"] = f"{check_onnx(pruned, onnx, batches):.1e} (inputs {', '.join(input_names(pruned))})"
    return row


def stock_reload(folders: list[Path], wants: list[torch.Tensor], work: Path) -> list[str]:
    """Max |logit diff| of stock ``from_pretrained(trust_remote_code=True)`` in a process without prune_attattr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    proc = subprocess.run([sys.executable, "-I", "-c", _STOCK_LOADER, *map(str, folders)], capture_output=True, text=True, env=env, cwd=work)
    if proc.returncode:
        return [f"FAILED: {proc.stderr.strip().splitlines()[-1]}"] * len(folders)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return [f"{float((torch.tensor(got[str(f)]) - w).abs().max()):.1e}" for f, w in zip(folders, wants)]


def main() -> None:
    torch.manual_seed(0)
    cols = ["load", "attribution", "prune", "save/load", "ONNX"]
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for kind in FAMILY_KINDS:
            (work / kind).mkdir()
            rows[kind] = measure(kind, work / kind)
        stock = stock_reload([work / k / "pruned" for k in FAMILY_KINDS], [rows[k].pop("_want") for k in FAMILY_KINDS], work)
    print("| family | " + " | ".join(cols) + " |")
    print("| --- | " + " | ".join("---" for _ in cols) + " |")
    for kind, st in zip(FAMILY_KINDS, stock):
        rows[kind]["save/load"] += f", stock transformers {st}"
        print(f"| {kind} | " + " | ".join(rows[kind][c] for c in cols) + " |", flush=True)
    from transformers import AutoConfig

    for kind in ("albert", "gpt2"):
        with tempfile.TemporaryDirectory() as d:
            AutoConfig.for_model(kind).save_pretrained(d)
            try:
                load_classifier(d)
                msg = "loaded (unexpected)"
            except ModelError as exc:
                msg = f"refused: {exc}".replace(d, "<dir>")
        print(f"| {kind} | {msg} | – | – | – | – |")


if __name__ == "__main__":
    main()
