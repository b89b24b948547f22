"""Where an ONNX graph's time goes: ONNX Runtime's profiler, kernel time per operator type.

Runs the graph on the first ``--sentences`` SST-2 dev sentences in batches of ``--batch`` (the packaged copy; tokenized by
the tokenizer saved beside the graph), ``--passes`` times with ONNX Runtime's profiling on, and prints
each operator type's share of the summed kernel time, its number of calls and the milliseconds per
model call. Used to find that the fused ``SkipLayerNormalization`` took 30% of the main job's shipped
int8 graph at batch 16 (``prune_attattr/deploy/layer_norm.py``, docs/benchmarks.md). Seconds to run.

Run:
    PYTHONPATH=$PWD python benchmarks/profile_graph.py exported/sst2-minilm/onnx/model.onnx [--batch 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graph", type=Path, help="an ONNX graph with its tokenizer files in the same folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64, help="truncation, as the main recipe's model.max_length")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    if not args.graph.is_file():
        raise SystemExit(f"no ONNX graph at {args.graph}")

    import onnxruntime as ort

    from prune_attattr.deploy.bench import cpu_name, feed_batches
    from prune_attattr.deploy.onnx_eval import load_folder_tokenizer
    from prune_attattr.tasks import glue_path, read_examples

    dev = read_examples(glue_path("SST-2/dev.tsv"), text_column="sentence", label_column="label", labels=["0", "1"])
    texts = dev.texts[: args.sentences]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = args.threads, 1, 3
        opts.enable_profiling, opts.profile_file_prefix = True, os.path.join(tmp, "profile")
        sess = ort.InferenceSession(str(args.graph), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        batches = feed_batches(load_folder_tokenizer(args.graph.parent), texts, None, args.batch, names, args.max_length)
        for _ in range(args.passes):
            for feeds in batches:
                sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    runs = args.passes * len(batches)
    spent = sum(total.values())
    print(f"{args.graph}: {cpu_name()}, onnxruntime {ort.__version__}, {args.threads} thread(s), batch {args.batch}, {len(texts)} sentences x {args.passes}")
    print(f"kernel time {spent / 1000 / runs:.2f} ms per call\n")
    print("| operator | share of kernel time | calls per model call | ms per model call |")
    print("| --- | ---: | ---: | ---: |")
    for op, us in total.most_common(args.top):
        print(f"| {op} | {100 * us / spent:.1f}% | {calls[op] / runs:.0f} | {us / 1000 / runs:.2f} |")


if __name__ == "__main__":
    main()
