"""Neuron importance speed (issue 15): head AttAttr against neuron AttAttr (knowledge attribution) on the same examples.

    python benchmarks/neuron_speed.py                   # the main job's 200 held-out SST-2 training sentences
    python benchmarks/neuron_speed.py --examples 32     # the first 32 of them
    python benchmarks/neuron_speed.py --examples 32 --also-gradients --json out.json

The model is the embedded MiniLM-L6 (6 layers x 12 heads, hidden 384, intermediate 1536) with a random
classifier head (seed 0): timing does not depend on the head. The examples are those the main job
(``recipes/sst2.yaml``: ``importance.source: train_heldout``, seed 42) scores: the SST-2 training
split shuffled with ``random.Random(42)``, the first ``--examples``; batches of the recipe's
``importance.batch_size`` (16), ``model.max_length`` (64), the recipe's AttAttr settings (left Riemann,
m = 20, gold label, fast path) and token bound. After an untimed warm-up, prints the wall time (and the
process CPU time, less sensitive to other jobs on a shared machine) of
:func:`prune_attattr.importance.attattr_importance` (heads) and of
:func:`prune_attattr.importance.attattr_neuron_importance` (neurons) and their ratio; the issue's
target is neurons <= heads. ``--also-gradients``: also Taylor/Fisher for both units from one backward
(:func:`prune_attattr.importance.unit_importance`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "sst2.yaml"))
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=1, help="time each method this many times, keep the fastest")
    p.add_argument("--also-gradients", action="store_true", help="also time unit_importance('fisher') (heads and neurons, one backward)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args()


def main() -> int:
    args = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from prune_attattr import load_classifier, load_recipe
    from prune_attattr import importance as imp
    from prune_attattr.models import intermediate_size, resolve_model_path
    from prune_attattr.tasks import encode, glue_path, make_dataloader, read_examples

    console = Console()
    recipe = load_recipe(args.recipe)
    a = recipe.importance.attattr
    path = resolve_model_path("embedded")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    model = load_classifier(path, num_labels=2)
    train = read_examples(glue_path("SST-2/train.tsv"), text_column="sentence", label_column="label", labels=["0", "1"])
    order = list(range(len(train)))
    random.Random(recipe.seed).shuffle(order)
    enc = encode(tokenizer, train.subset(order[: args.examples]), recipe.model.max_length)
    accelerator = Accelerator(cpu=True)
    loader = make_dataloader(enc, batch_size=recipe.importance.batch_size, pad_id=tokenizer.pad_token_id)
    settings = dict(steps=a.steps, target=a.target, mode=a.mode, quadrature=a.quadrature, max_tokens_per_forward=recipe.importance.max_tokens_per_forward)
    console.print(
        f"[bold]embedded MiniLM-L6[/] (6x12 heads, hidden 384, {intermediate_size(model)} neurons per layer, random classifier head); "
        f"{len(enc)} SST-2 training sentences ({sum(enc.lengths)} tokens, {min(enc.lengths)}..{max(enc.lengths)} each), "
        f"batches of {recipe.importance.batch_size}; {a.quadrature} m = {a.steps}, target {a.target}, mode {a.mode}; "
        f"torch threads {torch.get_num_threads()}"
    )

    cpu = {}

    def timed(fn, name):
        """Fastest wall time of ``--repeat`` runs; the process CPU time (all threads) of that run goes
        to ``cpu[name]`` (less sensitive than wall time to other jobs on a shared machine)."""
        best, out = float("inf"), None
        for _ in range(max(1, args.repeat)):
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            wall = time.perf_counter() - t
            if wall < best:
                best, cpu[name] = wall, time.process_time() - c
        return best, out

    imp.attattr_importance(model, [next(iter(loader))], accelerator, description=None, **settings)  # warm-up, untimed
    t_heads, heads = timed(lambda: imp.attattr_importance(model, loader, accelerator, description=None, **settings), "heads")
    t_neurons, neurons = timed(lambda: imp.attattr_neuron_importance(model, loader, accelerator, description=None, **settings), "neurons")
    figures = {
        "examples": len(enc),
        "tokens": sum(enc.lengths),
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in settings.items()},
        "heads_attattr_seconds": t_heads,
        "neurons_attattr_seconds": t_neurons,
        "neurons_over_heads": t_neurons / t_heads,
        "heads_attattr_cpu_seconds": cpu["heads"],
        "neurons_attattr_cpu_seconds": cpu["neurons"],
        "heads_shape": list(heads.shape),
        "neurons_shape": list(neurons.shape),
    }
    table = Table(title="Head AttAttr vs neuron AttAttr (knowledge attribution), same examples and quadrature")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(f"heads: attattr_importance {tuple(heads.shape)}, wall s (CPU s)", f"{t_heads:.2f} ({cpu['heads']:.2f})", "")
    table.add_row(f"neurons: attattr_neuron_importance {tuple(neurons.shape)}, wall s (CPU s)", f"{t_neurons:.2f} ({cpu['neurons']:.2f})", "")
    table.add_row("neurons / heads, wall (CPU)", f"{t_neurons / t_heads:.2f} ({cpu['neurons'] / cpu['heads']:.2f})", "<= 1")
    if args.also_gradients:
        t_grad, _ = timed(lambda: imp.unit_importance("fisher", model, loader, accelerator, max_tokens_per_forward=settings["max_tokens_per_forward"], progress=False), "fisher")
        figures["fisher_heads_and_neurons_seconds"] = t_grad
        table.add_row("fisher, heads and neurons (one backward) s", f"{t_grad:.2f}", "")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
