"""What a sublayer costs beyond its units' FLOPs, measured with ONNX Runtime (issue 21 item 1; Kwon et al.
2022 search against a measured latency table, not FLOPs alone).

A sublayer emptied of its units (every head, or every neuron, pruned) still runs its residual addition,
its norm and the output bias; removing it (``prune_attattr.prune.sublayers``) takes those operators out
of the graph. On the embedded MiniLM (6 layers, hidden 384; the weights do not matter for timing) this
times, at batch 1 and 16 on SST-2 dev sentences (``prune_attattr.deploy.bench.time_models``: warm-up,
alternating rounds, medians):

* ``full``: the unpruned model;
* ``emptied``: the attention and feed-forward units of layers 3-5 all pruned, their sublayers kept;
* ``removed``: the same six sublayers removed.

``(emptied - removed) / 6`` is the time of one emptied sublayer; ``(full - emptied)`` over the FLOPs the
units carried is the time per FLOP; their ratio, as a fraction of the unpruned model's FLOPs per token,
is what ``pruning.sublayer_cost`` asks for. Float32 and dynamic int8 graphs.

Run (about 2 minutes on 2 cores):
    PYTHONPATH=$PWD python benchmarks/sublayer_cost.py [--threads 2] [--sentences 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from prune_attattr.deploy.bench import Candidate, cpu_name, time_models
    from prune_attattr.deploy.onnx_export import export_onnx_folder
    from prune_attattr.deploy.quantize import quantize_int8
    from prune_attattr.models import (
        intermediate_size,
        load_unpruned,
        resolve_model_path,
    )
    from prune_attattr.prune.cost import unit_flops
    from prune_attattr.prune.units import prune_units
    from prune_attattr.prune.sublayers import remove_sublayers
    from prune_attattr.tasks import glue_path, read_examples

    torch.manual_seed(0)
    path = resolve_model_path("embedded")
    model, tokenizer = load_unpruned(path, num_labels=2), AutoTokenizer.from_pretrained(path)
    dev = read_examples(glue_path("SST-2/dev.tsv"), text_column="sentence", label_column="label", labels=["0", "1"])
    texts = list(dev.texts)[: args.sentences]
    layers = [3, 4, 5]
    every = range(intermediate_size(model))
    emptied = prune_units(copy.deepcopy(model), heads={k: range(12) for k in layers}, neurons={k: every for k in layers})
    removed = remove_sublayers(copy.deepcopy(model), {k: ["attention", "ffn"] for k in layers})
    enc = tokenizer(texts[:8], padding=True, return_tensors="pt")
    seq_len = sum(len(tokenizer(t)["input_ids"]) for t in texts) / len(texts)
    full_flops = unit_flops(model, seq_len).total
    carried = full_flops - unit_flops(emptied, seq_len).total
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, m in (("full", model), ("emptied", emptied), ("removed", removed)):
            folder = Path(tmp) / name
            paths[name] = export_onnx_folder(m.eval(), folder, dict(enc), tokenizer)
            paths[name + " int8"] = quantize_int8(paths[name], folder / "model_int8.onnx")
        rows = time_models([Candidate(k, p) for k, p in paths.items()], texts, tokenizer=tokenizer, threads=args.threads, rounds=args.rounds)
    ms = {r["label"]: r["ms"] for r in rows}
    print(f"CPU: {cpu_name()}; {args.threads} threads; {len(texts)} SST-2 dev sentences, mean {seq_len:.1f} tokens; "
          f"FLOPs per token: unpruned {full_flops / 1e6:.2f} M, carried by the units of layers 3-5 {carried / 1e6:.2f} M")
    print("| graph | batch | full ms | emptied ms | removed ms | ms per emptied sublayer | ms per M FLOPs/token | sublayer_cost (fraction of unpruned FLOPs) |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: |")
    for suffix in ("", " int8"):
        for b in ("1", "16"):
            f, e, r = ms["full" + suffix][b], ms["emptied" + suffix][b], ms["removed" + suffix][b]
            per_sub = (e - r) / 6
            per_flop = (f - e) / (carried / 1e6)
            cost = per_sub / per_flop * 1e6 / full_flops if per_flop > 0 else float("nan")
            print(f"| {'float32' if not suffix else 'int8 dynamic'} | {b} | {f:.2f} | {e:.2f} | {r:.2f} | {per_sub:.3f} | {per_flop:.3f} | {cost:.4f} |")


if __name__ == "__main__":
    main()
