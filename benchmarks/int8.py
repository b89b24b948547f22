"""int8 alone on the unpruned fine-tuned model (issue 16): dev accuracy and ONNX Runtime speed-up at batch 1
and 16 against float32, for each int8 variant, on this CPU.

Graphs, all from one torch.onnx (dynamo) export of the fine-tuned model:
    fp32            the exporter's graph (the reference row)
    fp32 fused      ONNX Runtime's fused kernels (prune_attattr.deploy.quantize.fuse)
    int8 s8         U8S8 dynamic quantization, weights per output channel, then fused (what export.quantize
                    int8 ships by default)
    int8 s8 tensor  U8S8 with one weight scale per tensor, fused
    int8 s8 rr      U8S8 per channel with reduce_range (7-bit weights), fused
    int8 s8 rr tensor  U8S8 per tensor with reduce_range, fused
    int8 u8         U8U8 per channel, fused
    int8 s8 unfused U8S8 per channel without the fusion
``--model`` takes any classifier folder, a pruned checkpoint (``exported/<run>/model``) too.
Accuracy: the whole dev split, each sentence alone (batch 1, as export.max_drop judges it), tokenised by the
model's own tokenizer with its default truncation; "agree" is the share of dev predictions equal to fp32's;
int8 s8 is also evaluated in batches of 32 (dynamic quantization takes each activation's scale from the
whole batch, padding included). Timing: prune_attattr.deploy.bench.time_models (warm-up, alternating rounds, medians).

Run (about 4 minutes on 2 cores; the fine-tuned model: the newest complete cache entry by default):
    PYTHONPATH=$PWD python benchmarks/int8.py [--model FOLDER] [--threads 2] [--sentences 256] [--rounds 5]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def newest_finetuned() -> Path:
    from prune_attattr.cache import cache_root, entry_complete

    root = cache_root() / "finetuned"
    entries = [p for p in root.glob("*") if p.is_dir() and entry_complete(p)] if root.is_dir() else []
    if not entries:
        raise SystemExit(f"no complete fine-tuned model under {root}; run prune-attattr recipes/sst2.yaml first or give --model")
    return max(entries, key=lambda p: (p / "COMPLETE.json").stat().st_mtime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="fine-tuned classifier folder (default: newest in the cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=256, help="dev sentences timed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dev", type=int, default=None, help="evaluate on the first N dev sentences only (a quick check; default all 872)")
    ap.add_argument("--timing-only", action="store_true", help="skip the accuracy pass (it does not depend on load; timing does)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from prune_attattr.deploy.bench import Candidate, cpu_name, time_models
    from prune_attattr.evaluation import compute_metrics
    from prune_attattr.deploy.onnx_export import export_onnx_folder
    from prune_attattr.loading import load_classifier
    from prune_attattr.deploy.onnx_eval import predict_onnx
    from prune_attattr.deploy.quantize import fuse, max_logit_diff, quantize_int8
    from prune_attattr.report import deployment_table
    from prune_attattr.tasks import glue_path, read_examples
    from rich.console import Console

    folder = args.model or newest_finetuned()
    torch.set_num_threads(args.threads)
    dev = read_examples(glue_path("SST-2/dev.tsv"), text_column="sentence", label_column="label", labels=["0", "1"])
    if args.dev:
        dev = dev.subset(range(min(args.dev, len(dev))))
    model = load_classifier(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    try:
        t = time.perf_counter()
        example = dict(tok(dev.texts[:2], padding=True, return_tensors="pt"))
        raw = export_onnx_folder(model, work, example, tok)
        shutil.move(raw, work / "fp32.onnx")
        graphs = {"fp32": work / "fp32.onnx"}
        fuse(graphs["fp32"], work / "fp32_fused.onnx")
        graphs["fp32 fused"] = work / "fp32_fused.onnx"
        variants = (
            ("int8 s8", "s8", False, True), ("int8 s8 tensor", "s8", False, False), ("int8 s8 rr", "s8", True, True),
            ("int8 s8 rr tensor", "s8", True, False), ("int8 u8", "u8", False, True),
        )
        for label, wt, rr, pc in variants:
            plain = quantize_int8(graphs["fp32"], work / f"{label.replace(' ', '_')}_plain.onnx", reduce_range=rr, weight_type=wt, per_channel=pc)
            fuse(plain, work / f"{label.replace(' ', '_')}.onnx")
            graphs[label] = work / f"{label.replace(' ', '_')}.onnx"
            if label == "int8 s8":
                graphs["int8 s8 unfused"] = plain
        checks = [dict(tok(dev.texts[i : i + 16], padding=True, return_tensors="np")) for i in (0, 16)]
        print(f"model {folder}; export, quantization and fusion {time.perf_counter() - t:.0f} s; CPU {cpu_name()}, {args.threads} threads")

        acc = {k: None for k in graphs}
        agree, diff, acc_b32 = {}, {}, None
        if not args.timing_only:
            t = time.perf_counter()
            logits = {k: predict_onnx(p, dev.texts, threads=args.threads) for k, p in graphs.items()}
            batched = predict_onnx(graphs["int8 s8"], dev.texts, threads=args.threads, batch_size=32)
            labels = torch.tensor(dev.labels)
            acc = {k: compute_metrics(["accuracy"], torch.from_numpy(v.argmax(1)), labels)["accuracy"] for k, v in logits.items()}
            acc_b32 = compute_metrics(["accuracy"], torch.from_numpy(batched.argmax(1)), labels)["accuracy"]
            ref = logits["fp32"].argmax(1)
            agree = {k: float((v.argmax(1) == ref).mean()) for k, v in logits.items()}
            diff = {k: max_logit_diff(graphs["fp32"], p, checks) for k, p in graphs.items()}
            print(f"accuracy on {len(dev)} dev sentences, batch 1 ({time.perf_counter() - t:.0f} s):")
            for k in graphs:
                print(
                    f"  {k:18s} {100 * acc[k]:6.2f}%  ({100 * (acc[k] - acc['fp32']):+.2f} points)  agree with fp32 {100 * agree[k]:6.2f}%  "
                    f"max |logit diff| on 32 sentences {diff[k]:.4f}"
                )
            print(f"  int8 s8 in batches of 32: {100 * acc_b32:.2f}% ({100 * (acc_b32 - acc['int8 s8']):+.2f} points vs batch 1)")

        models = [Candidate(k, p, metric=acc[k]) for k, p in graphs.items()]
        load = os.getloadavg()[0]
        rows = time_models(models, dev.texts[: args.sentences], tokenizer=tok, threads=args.threads, rounds=args.rounds)
        for r in rows:
            r["file"] = Path(r["file"]).name
        bench = {"metric": "accuracy", "cpu": cpu_name(), "threads": args.threads, "sentences": min(args.sentences, len(dev)), "rounds": args.rounds, "batch_sizes": [1, 16], "rows": rows}
        Console(width=10_000).print(deployment_table(bench))
        print(f"1-minute load average before / after timing: {load:.2f} / {os.getloadavg()[0]:.2f} (this script alone adds about {args.threads})")
        if args.json:
            out = {"model": str(folder), "accuracy": acc, "agree": agree, "max_abs_logit_diff": diff, "int8_s8_batch32_accuracy": acc_b32, "bench": bench}
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
