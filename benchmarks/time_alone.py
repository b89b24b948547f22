"""Time ONNX graphs one at a time, each in its own process: no other session's threads on the cores.

``prune-attattr bench`` times a run's graphs side by side in one process, taking turns
(:func:`prune_attattr.deploy.bench.time_models`), so that drift hits every graph alike. On a shared
2-core virtual machine that still left the small int8 graphs swinging between two speeds from round to
round (0.8 against 1.4 ms at batch 1, 12 against 21 ms at batch 16) while the unpruned float32 graph moved
under 10%. This script is the cross-check: each graph alone in a fresh Python process, ``--rounds``
rounds over the same SST-2 dev sentences (the packaged copy, tokenized by the tokenizer beside each graph,
truncated to ``--max-length``), printing every round and the median, batch 1 and 16. Graphs are timed
in the order given; repeat the command to see drift between processes.

Run (about a minute per graph):
    PYTHONPATH=$PWD python benchmarks/time_alone.py exported/sst2-minilm/unpruned/onnx/model_fp32.onnx exported/sst2-minilm/onnx/model.onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _time_one(graph: Path, threads: int, sentences: int, rounds: int, max_length: int) -> dict:
    from prune_attattr.deploy.bench import feed_batches
    from prune_attattr.deploy.onnx_eval import load_folder_tokenizer
    from prune_attattr.deploy.quantize import logits, session
    from prune_attattr.tasks import glue_path, read_examples

    texts = read_examples(glue_path("SST-2/dev.tsv"), text_column="sentence", label_column="label", labels=["0", "1"]).texts[:sentences]
    sess = session(graph, threads)
    names = [i.name for i in sess.get_inputs()]
    out = {}
    for batch in (1, 16):
        feeds = feed_batches(load_folder_tokenizer(graph.parent), texts, None, batch, names, max_length)
        for x in feeds:  # warm-up: ONNX Runtime allocates per shape
            logits(sess, x)
        per_round = []
        for _ in range(rounds):
            t = time.perf_counter()
            for x in feeds:
                logits(sess, x)
            per_round.append(1000 * (time.perf_counter() - t) / len(feeds))
        out[str(batch)] = per_round
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_time_one(args.graphs[0], args.threads, args.sentences, args.rounds, args.max_length)))
        return
    for g in args.graphs:
        if not g.is_file():
            raise SystemExit(f"no ONNX graph at {g}")

    from prune_attattr.deploy.bench import cpu_name

    print(f"{cpu_name()}, {args.threads} thread(s), {args.sentences} SST-2 dev sentences, {args.rounds} rounds, each graph in its own process\n")
    print("| graph | batch | median ms | rounds (ms) |")
    print("| --- | --: | --: | --- |")
    for g in args.graphs:
        cmd = [sys.executable, __file__, str(g), "--child", "--threads", str(args.threads), "--sentences", str(args.sentences),
               "--rounds", str(args.rounds), "--max-length", str(args.max_length)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"timing {g} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for batch, per_round in result.items():
            print(f"| {g} | {batch} | {statistics.median(per_round):.2f} | {' '.join(f'{v:.2f}' for v in per_round)} |")


if __name__ == "__main__":
    main()
