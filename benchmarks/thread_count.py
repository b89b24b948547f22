"""One thread against two, round after round: how two ONNX graphs' speed depends on the intra-op thread
count while a shared host comes and goes.

Each graph gets an ONNX Runtime session with 1 and with ``--threads`` intra-op threads (plus, with
``--variants``: ``split``, each batch cut into ``--threads`` parts run at once on as many one-thread
sessions (:func:`prune_attattr.deploy.bench.time_models`'s split, for both graphs); ``pin``, the
graph's worker pinned to the second core; ``block``, dynamic block sizing, ``session.dynamic_block_base`` 4). For ``--seconds`` the sessions take turns,
each running the first ``--sentences`` SST-2 dev sentences (the packaged copy, tokenized by the tokenizer
beside each graph) at ``--batch``; every turn's mean ms per call is one sample. A round is called *slow*
where the second graph's ``--threads`` session took over 1.4x its own median: the table gives each
session's median overall and in the slow rounds, and the first graph's median ms divided by each
session's, per round (median and 10th percentile). Found with it (docs/benchmarks.md, "Thread count"):
on a 2-core VM a small int8 graph with 2 threads falls to its 1-thread speed (batch 16) or below it
(batch 1) in the host's slow rounds, while the unpruned float32 graph loses about 10-20% and the split
keeps its speed; so deployment tables also time one thread and the split
(:func:`prune_attattr.deploy.bench.serving_threads`, :func:`prune_attattr.deploy.bench.serving_split`).

Run (a few minutes):
    PYTHONPATH=$PWD python benchmarks/thread_count.py exported/sst2-minilm/unpruned/onnx/model_fp32.onnx \\
        exported/sst2-minilm/onnx/model.onnx --batch 16 --seconds 150 --variants split
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _session(graph: Path, threads: int, variant: str | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    if variant == "pin":  # the worker on logical processor 2 (1-based); the calling thread is pinned to the first
        opts.add_session_config_entry("session.intra_op_thread_affinities", "2")
    elif variant == "block":
        opts.add_session_config_entry("session.dynamic_block_base", "4")
    return ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="the graph speed-ups are measured against (e.g. the unpruned float32 graph)")
    parser.add_argument("graph", type=Path, help="the graph whose thread count is in question (e.g. the deployed one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--variants", nargs="*", default=[], choices=["split", "pin", "block"])
    args = parser.parse_args()
    for g in (args.reference, args.graph):
        if not g.is_file():
            raise SystemExit(f"no ONNX graph at {g}")

    from prune_attattr.deploy.bench import cpu_name, feed_batches, split_feeds
    from prune_attattr.deploy.onnx_eval import load_folder_tokenizer
    from prune_attattr.tasks import glue_path, read_examples

    texts = read_examples(glue_path("SST-2/dev.tsv"), text_column="sentence", label_column="label", labels=["0", "1"]).texts[: args.sentences]
    n = args.threads
    configs = {"reference 1t": (args.reference, 1, None), f"reference {n}t": (args.reference, n, None),
               "graph 1t": (args.graph, 1, None), f"graph {n}t": (args.graph, n, None)}
    if "split" in args.variants:
        configs.update({f"reference {n}x1t": (args.reference, 1, "split"), f"graph {n}x1t": (args.graph, 1, "split")})
    configs.update({f"graph {n}t {v}": (args.graph, n, v) for v in args.variants if v != "split"})
    sessions = {k: [_session(g, t, v) for _ in range(n if v == "split" else 1)] for k, (g, t, v) in configs.items()}
    feeds = {}
    for k, (g, _, v) in configs.items():
        names = [i.name for i in sessions[k][0].get_inputs()]
        tok = load_folder_tokenizer(g.parent)
        key = (g, v == "split")
        if key not in feeds:
            feeds[key] = split_feeds(tok, texts, None, args.batch, n, names, 64) if v == "split" else feed_batches(tok, texts, None, args.batch, names, 64)
    pool = ThreadPoolExecutor(max_workers=n)

    def run(k: str, x) -> None:
        if configs[k][2] == "split":
            for f in [pool.submit(s.run, ["logits"], part) for s, part in zip(sessions[k], x)]:
                f.result()
        else:
            sessions[k][0].run(["logits"], x)

    everything = set(range(os.cpu_count() or 1))
    samples: dict[str, list[float]] = {k: [] for k in configs}
    end = time.time() + args.seconds
    while time.time() < end:
        for k, (g, _, variant) in configs.items():
            os.sched_setaffinity(0, {0} if variant == "pin" else everything)
            batches = feeds[(g, variant == "split")]
            run(k, batches[0])  # untimed: the previous session's threads stop busy-waiting
            t = time.perf_counter()
            for x in batches:
                run(k, x)
            samples[k].append(1000 * (time.perf_counter() - t) / len(batches))
    os.sched_setaffinity(0, everything)
    pool.shutdown()
    rounds = len(samples["graph 1t"])
    own = samples[f"graph {n}t"]
    slow = [i for i in range(rounds) if own[i] > 1.4 * statistics.median(own)]
    ref = samples[f"reference {n}t"]
    print(f"{cpu_name()}; batch {args.batch}, {args.sentences} SST-2 dev sentences per turn, {rounds} rounds in {args.seconds:.0f} s, "
          f"{len(slow)} slow (graph {n}t over 1.4x its median)\n")
    print(f"| session | median ms | median ms in slow rounds | reference {n}t / this: median | 10th percentile |")
    print("| --- | --: | --: | --: | --: |")
    for k, v in samples.items():
        ratio = [ref[i] / v[i] for i in range(rounds)]
        in_slow = f"{statistics.median(v[i] for i in slow):.2f}" if slow else "-"
        p10 = statistics.quantiles(ratio, n=10)[0] if rounds > 1 else ratio[0]
        print(f"| {k} | {statistics.median(v):.2f} | {in_slow} | {statistics.median(ratio):.2f}x | {p10:.2f}x |")


if __name__ == "__main__":
    main()
