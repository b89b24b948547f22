"""Batch-independent int8 (issue 21 item 4) on the real model: float32, dynamic int8 and static int8 graphs of
the unpruned fine-tuned model, deployed through the export stage's own code
(:func:`prune_attattr.deploy.deployment.deploy_run` with ``export.quantize: all``).

For each graph: dev accuracy one sentence at a time (what ``export.max_drop`` judges), how many dev
predictions differ between batch 1 and batch 16, median ms per call at batch 1 and 16
(:func:`prune_attattr.deploy.bench.time_models`: warm-up, alternating rounds), file size; then which graph
ships under ``--max-drop`` against the float32 graph's accuracy, and why. The static graph is calibrated on
``--calibration`` training sentences (shuffled with the recipe's seed), never dev sentences.

The fine-tuned model is the recipe's (default recipes/sst2.yaml; ``prepare`` takes it from the cache when
it was fine-tuned before, else fine-tunes it).

Run (about 5 minutes on 2 cores with the fine-tune cached):
    PYTHONPATH=$PWD python benchmarks/int8_batch.py [recipe.yaml] [--threads 2] [--sentences 256] [--rounds 5]
        [--calibration 256] [--max-drop 0.01] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="?", default="recipes/sst2.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=256, help="dev sentences timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calibration", type=int, default=256, help="training sentences that calibrate static int8")
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()

    from prune_attattr.config import load_recipe
    from prune_attattr.deploy.deployment import deploy_run
    from prune_attattr.deploy.onnx_export import export_onnx_folder
    from prune_attattr.stages.export import example_batches
    from prune_attattr.stages.prepare import prepare
    from prune_attattr.tasks import load_task_data

    recipe = load_recipe(args.recipe, [f"runtime.threads={args.threads}"])
    prep = prepare(recipe, quiet=True)
    print(f"fine-tuned model {'from the cache' if (prep.finetune_info or {}).get('cached') else 'trained'}; dev {len(prep.dev_examples)} examples")
    train = load_task_data(recipe)[0]
    calibration = train.subset(random.Random(recipe.seed).sample(range(len(train)), min(args.calibration, len(train))))
    checks = example_batches(prep.dev_enc, prep.ctx.pad_id, 8, 4)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx_folder(copy.deepcopy(prep.model).cpu(), Path(tmp) / "run" / "onnx", checks[-1], prep.ctx.tokenizer, opset=recipe.export.onnx_opset)
        start = time.perf_counter()
        # the unpruned model in the "pruned" slot: one folder, judged against its own float32 accuracy
        from prune_attattr.deploy.onnx_eval import evaluate_onnx

        base = evaluate_onnx(onnx, prep.dev_examples, prep.ctx.metrics, max_length=recipe.model.max_length, threads=args.threads)[prep.ctx.metrics[0]]
        d = deploy_run(
            onnx, None, check_batches=checks, examples=prep.dev_examples, metrics=prep.ctx.metrics, quantize="all",
            max_drop=args.max_drop, baseline=base, max_length=recipe.model.max_length, calibration=calibration,
            calibration_examples=args.calibration, threads=args.threads, bench_sentences=args.sentences, bench_rounds=args.rounds,
        )
        seconds = time.perf_counter() - start
    p = d["pruned"]
    print(f"CPU: {d['bench']['cpu']}; flags listed: {', '.join(d['cpu']['flags']) or 'none'}; deploy_run {seconds:.0f} s")
    print("| graph | accuracy, batch 1 (%) | differ, batch 1 vs 16 | ms, batch 1 | ms, batch 16 | speed-up 1 / 16 | MB | max abs logit diff vs float32 |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: |")
    for r in d["bench"]["rows"]:
        diff = p["max_abs_diff_vs_float32"].get(r["precision"])
        print(
            f"| {r['label'].removeprefix('pruned ')}{' (ships)' if r['deployed'] else ''} | {100 * r['metric']:.2f} | {r['batch_differ']} | "
            f"{r['ms']['1']:.2f} | {r['ms']['16']:.1f} | {r['speedup']['1']:.2f}x / {r['speedup']['16']:.2f}x | {r['mb']:.1f} | "
            + ("-" if diff is None else f"{diff:.3f}") + " |"
        )
    print(f"ships: {p['choice']['reason']}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(d, indent=1))


if __name__ == "__main__":
    main()
