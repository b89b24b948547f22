"""ONNX Runtime's fused ``SkipLayerNormalization`` against the split form the deployment ships
(``prune_attattr.deploy.layer_norm.split_skip_layer_norm``), one operator on this machine's CPU.

One graph ``y = LayerNorm(x + skip + bias)`` on ``[batch, tokens, hidden]`` inputs (symbolic batch and
token axes, as in an exported model), run as the fused contrib kernel and as the split one. Prints the
median of ``--rounds`` rounds of the mean ms per call, and checks that a session ran the split form
(ONNX Runtime did not fuse it back). Seconds to run.

Run:
    PYTHONPATH=$PWD python benchmarks/skip_layer_norm.py [--hidden 384] [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _graph(hidden: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "tokens", hidden])
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"], domain="com.microsoft", epsilon=1e-12)
    graph = helper.make_graph([node], "skip_layer_norm", [value("x"), value("skip")], [value("y")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort

    from prune_attattr.deploy.bench import cpu_name
    from prune_attattr.deploy.layer_norm import split_skip_layer_norm

    fused, split = _graph(args.hidden), _graph(args.hidden)
    split_skip_layer_norm(split)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for label, model in (("SkipLayerNormalization", fused), ("split (Add, Add, LayerNormalization)", split)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = args.threads, 1, 3
            opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            sessions[label] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            ran = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
            print(f"{label}: the session runs {ran}")
    print(f"\n{cpu_name()}, onnxruntime {ort.__version__}, {args.threads} thread(s), hidden {args.hidden}; median of {args.rounds} rounds of {args.calls} calls\n")
    print("| input | " + " | ".join(f"{k} (ms)" for k in sessions) + " | fused / split |")
    print("| --- | " + " | ".join("---:" for _ in sessions) + " | ---: |")
    rng = np.random.default_rng(1)
    for batch, tokens in ((1, 25), (16, 40), (64, 64)):
        feeds = {n: rng.normal(size=(batch, tokens, args.hidden)).astype(np.float32) for n in ("x", "skip")}
        outs = [s.run(None, feeds)[0] for s in sessions.values()]
        diff = float(np.abs(outs[0] - outs[1]).max())
        if diff > 1e-4:
            raise SystemExit(f"the split form differs from the fused kernel by {diff:.2e}")
        times = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for label, s in sessions.items():  # alternating rounds: both see the same machine state
                s.run(None, feeds)
                t = time.perf_counter()
                for _ in range(args.calls):
                    s.run(None, feeds)
                times[label].append(1000 * (time.perf_counter() - t) / args.calls)
        med = [statistics.median(v) for v in times.values()]
        print(f"| [{batch}, {tokens}, {args.hidden}] | " + " | ".join(f"{m:.3f}" for m in med) + f" | {med[0] / med[1]:.2f}x |")


if __name__ == "__main__":
    main()
