"""Undo ONNX Runtime's ``SkipLayerNormalization`` fusion: ``Add`` (+ bias ``Add``) + ``LayerNormalization``.

onnxscript's ORT fusions (:func:`prune_attattr.deploy.quantize.fuse`) rewrite every residual addition
followed by a LayerNorm into one ``com.microsoft.SkipLayerNormalization`` node. On ONNX Runtime's CPU
execution provider that fused kernel is *slower* than the two standard operators it replaces, and more
so the larger the batch. Measured on 2026-12-07 by ``benchmarks/skip_layer_norm.py`` (AMD EPYC,
avx512_vnni, 2 threads, onnxruntime 1.32; it prints the same table for your machine), hidden size 384,
median ms per call:

==============  ======================  ==================================  =====
input           SkipLayerNormalization  Add, Add(bias), LayerNormalization  ratio
==============  ======================  ==================================  =====
[1, 25, 384]    0.077                   0.042                               1.86x
[16, 40, 384]   0.822                   0.242                               3.40x
[64, 64, 384]   4.110                   1.045                               3.93x
==============  ======================  ==================================  =====

In the main job's shipped graph (static int8, 9 residual LayerNorms) the fused kernel took 35% of the
kernel time at batch 16 (``benchmarks/profile_graph.py``); splitting it made that graph 1.21x faster at
batch 1 and 1.47x at batch 16, and the unpruned float32 graph 1.06x at both (docs/benchmarks.md,
"SkipLayerNormalization split back").

ONNX Runtime must not fuse the split back when a session loads the graph. Its own
``SkipLayerNormFusion`` (optimization level 2, on by default) fuses a ``LayerNormalization`` fed by an
``Add`` of two 3-D tensors, with or without an earlier ``Add`` of a 1-D constant. It does not match an
``Add`` of the 1-D bias next to the norm, nor a ``Sum``: so the split adds the bias last, and a node
without a bias becomes ``Sum(input, skip)``. Measured with onnxruntime 1.32, a plain ``Add`` +
``LayerNormalization`` on ``[batch, sequence, hidden]`` inputs is fused back; these forms are not
(``tests/test_quantize.py`` checks the optimized graph a session runs).

The rewrite is exact up to float reassociation of ``input + skip + bias``.
"""

from __future__ import annotations

from onnx import ModelProto, helper

__all__ = ["split_skip_layer_norm"]

_MIN_OPSET = 17  # LayerNormalization entered the default domain in opset 17


def _opset(model: ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def split_skip_layer_norm(model: ModelProto) -> int:
    """Replace, in place, each ``com.microsoft.SkipLayerNormalization`` of ``model``'s main graph by
    ``Add(Add(input, skip), bias)`` (``Sum(input, skip)`` without a bias) + ``LayerNormalization(axis=-1)``
    with the same epsilon, in forms ONNX Runtime does not fuse back (module docstring).

    ``SkipLayerNormalization(input, skip, gamma, beta?, bias?) -> (output, mean?, inv_std_var?,
    input_skip_bias_sum?)``: ``input`` and ``skip`` are ``[batch, sequence, hidden]``, ``gamma``, ``beta``,
    ``bias`` ``[hidden]``. The sum output (pre-norm families feed it to the next residual) keeps its name
    on the new ``Add``. A node whose ``mean`` or ``inv_std_var`` output is consumed is left fused (no
    standard operator gives them in the same shape).

    Returns:
        The number of nodes split; 0 when the default-domain opset is below 17 (no ``LayerNormalization``).
    """
    if _opset(model) < _MIN_OPSET:
        return 0
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    nodes, split = [], 0
    for node in graph.node:
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        outs = list(node.output) + [""] * (4 - len(node.output))
        if any(name and name in used for name in outs[1:3]):
            nodes.append(node)
            continue
        ins = list(node.input) + [""] * (5 - len(node.input))
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        base = node.name or f"SkipLayerNormalization_{split}"
        total = outs[3] if outs[3] and outs[3] in used else f"{base}/sum"
        if ins[4]:  # input + skip, then + bias (the order ONNX Runtime's kernel adds in)
            nodes.append(helper.make_node("Add", ins[:2], [f"{base}/input_skip"], name=f"{base}/add_skip"))
            nodes.append(helper.make_node("Add", [f"{base}/input_skip", ins[4]], [total], name=f"{base}/add_bias"))
        else:
            nodes.append(helper.make_node("Sum", ins[:2], [total], name=f"{base}/sum_skip"))  # Add would be fused back
        norm_inputs = [total, ins[2]] + ([ins[3]] if ins[3] else [])
        nodes.append(helper.make_node("LayerNormalization", norm_inputs, [outs[0]], name=f"{base}/layer_norm", axis=-1, epsilon=eps))
        split += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return split
