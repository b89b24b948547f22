"""A deployable ONNX folder: transformer kernel fusion, dynamic and static int8 quantization, each verified.

:func:`deploy` takes the float32 graph :func:`prune_attattr.deploy.onnx_export.export_onnx_folder` wrote
(``onnx/model.onnx``, from the torch.onnx dynamo exporter), builds the graphs ``quantize`` asks for
(:func:`build_graphs`: ``none`` float32; ``int8`` + dynamic int8; ``int8_static`` + static int8; ``all``
all three), and ships one (:func:`ship`): the fastest at batch 1 whose dev metric holds the budget and
whose predictions do not change between batch 1 and batch 16, float32 when none does
(:func:`choose_graph`). The shipped graph is renamed ``model.onnx``; the others keep their names:

=========================  ======================================================================
float32                    ``model_fp32.onnx`` (fused)
dynamic int8               ``model_int8.onnx``
static int8                ``model_int8_static.onnx``
=========================  ======================================================================

It returns a dict for ``report.json`` that says which file is which and why one ships, with every
graph's logit error against float32 and (given the evaluators) its dev metric and batch differences.

**Static quantization** (:func:`quantize_int8_static`) fixes every activation scale once, from
training sentences (calibration), so a sentence's answer does not depend on its batchmates; dynamic
quantization computes the scales from each call's whole padded batch, and measured on the main job's
unpruned SST-2 MiniLM 15 of 872 dev predictions differ between batch 1 and batch 16 (0 for float32 and
static int8; docs/benchmarks.md). QOperator format (QLinearMatMul in the graph) measured faster than
QDQ on that model (10.9 against 12.9 ms at batch 1, 2 threads) and more accurate (88.19% against
87.04%; float32 88.65%).

**Quantization** is ONNX Runtime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``,
the method its documentation recommends for transformers on CPU; HF optimum's ``ORTQuantizer`` wraps
the same): weights of every MatMul and of the embedding tables (Gather) are stored as 8-bit integers
with one scale per tensor, activations are quantized per call from their running min/max
(``DynamicQuantizeLinear``), and the products run as integer GEMMs (``MatMulInteger``). Activations
are unsigned 8-bit; ``weight_type`` ``"s8"`` gives ONNX Runtime's U8S8 kernels, ``"u8"`` U8U8.
``reduce_range`` quantizes weights to 7 bits, which ONNX Runtime's documentation recommends on
x86 CPUs without VNNI, where U8S8 products can saturate the 16-bit intermediate sums.

**Fusion** uses onnxscript's ONNX Runtime fusions (``onnxscript.rewriter.ort_fusions.optimize_for_ort``),
which match the dynamo exporter's graphs; ONNX Runtime's own transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``) matches the TorchScript exporter's patterns:
on our graphs it fuses no attention in any family (only the LayerNorm/GELU fusions that an ONNX
Runtime session applies anyway when it loads a graph) and fails on ModernBERT. Measured on tiny random
models of all eight families (pruned too, with a layer of zero heads), onnxscript fuses attention in
every one: ``Attention`` (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT) or
``MultiHeadAttention`` (ModernBERT with rotary embeddings, DeBERTa-v2 with its relative-position
bias), plus ``BiasGelu`` (``tests/test_quantize.py`` checks this). onnxscript also fuses every residual
addition and LayerNorm into ``SkipLayerNormalization``; :func:`fuse` splits those back into ``Add`` +
``LayerNormalization``, which ONNX Runtime's CPU kernels run faster (3.4x at batch 16, hidden 384;
:mod:`prune_attattr.deploy.layer_norm` has the figures).

The int8 graph is quantized *before* fusion: a fused ``Attention`` node carries ``qkv_hidden_sizes``
and an additive mask, which ONNX Runtime's ``QAttention`` does not take, so quantizing a fused graph
leaves the query/key/value weights in float32 (larger and slower at batch 1). Quantizing first and
fusing after gives int8 projections feeding ``MultiHeadAttention``.

Fused graphs use ONNX Runtime's contrib operators (domain ``com.microsoft``): they run on ONNX Runtime
(and optimum's ``ORTModelForSequenceClassification``), not on other ONNX runtimes; ``fusion=False``
keeps standard ONNX operators only.

Every rewrite is checked against the exporter's float32 graph on the caller's batches: a fused float32
graph must match it to :data:`FUSION_TOLERANCE`; a fused int8 graph must be no further from it than
the unfused int8 graph (times :data:`INT8_FUSION_SLACK`). A rewrite that fails (or raises) is dropped
and the dict says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import RunError

__all__ = [
    "QUANTIZE_CHOICES",
    "WEIGHT_TYPES",
    "FUSION_TOLERANCE",
    "INT8_FUSION_SLACK",
    "fuse",
    "quantize_int8",
    "graph_precision",
    "contrib_ops",
    "session",
    "logits",
    "max_logit_diff",
    "quantize_int8_static",
    "kinds_for",
    "choose_graph",
    "build_graphs",
    "ship",
    "deploy",
]

QUANTIZE_CHOICES = ("none", "int8", "int8_static", "all")
STATIC_FORMATS = ("qoperator", "qdq")
GRAPH_KINDS = ("float32", "int8", "int8_static")  # int8: dynamic quantization; int8_static: calibrated
STAGED_NAMES = {"float32": "model_fp32.onnx", "int8": "model_int8.onnx", "int8_static": "model_int8_static.onnx"}
WEIGHT_TYPES = ("s8", "u8")
FUSION_TOLERANCE = 1e-4  # the export's own ONNX-vs-PyTorch bound (float reassociation only)
INT8_FUSION_SLACK = 1.25  # a fused int8 graph may be at most this much further from float32 than the unfused one
_DYNAMIC_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention", "MatMulIntegerToFloat"}
_STATIC_OPS = {"QuantizeLinear", "QLinearMatMul", "QLinearAdd", "QGemm", "QLinearConv"}


@contextlib.contextmanager
def _quiet():
    """Silence the advice quantize_dynamic logs on the root logger and onnxscript's folding notes."""
    loggers = [logging.getLogger(), logging.getLogger("onnxscript"), logging.getLogger("onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _readable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def fuse(src: str | Path, dst: str | Path, *, skip_layer_norm: bool = False) -> dict[str, int]:
    """Rewrite ``src`` with ONNX Runtime's transformer kernels (fused attention and BiasGelu; onnxscript's
    ``optimize_for_ort``) into ``dst``.

    ``skip_layer_norm`` keeps onnxscript's ``SkipLayerNormalization`` nodes; by default they are split
    back into ``Add`` + ``LayerNormalization`` (:func:`prune_attattr.deploy.layer_norm.split_skip_layer_norm`),
    which ONNX Runtime's CPU kernels run 1.9x (batch 1) to 3.4x (batch 16) faster.

    Returns:
        The contrib-operator counts of ``dst`` (:func:`contrib_ops`), e.g. ``{"Attention": 6, ...}``.

    Raises:
        ImportError: onnxscript without ``rewriter.ort_fusions`` (onnxscript < 0.3).
        Exception: whatever the rewriter raises on a graph it cannot handle (callers fall back).
    """
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from .layer_norm import split_skip_layer_norm

    with _quiet():
        model = ir.load(str(src))
        model, _ = optimize_for_ort(model)
        proto = ir.serde.serialize_model(model)
    if not skip_layer_norm:
        split_skip_layer_norm(proto)
    onnx.save(proto, str(dst))
    _readable(Path(dst))
    return contrib_ops(dst)


def quantize_int8(
    src: str | Path, dst: str | Path, *, reduce_range: bool = False, weight_type: str = "s8", per_channel: bool = True
) -> Path:
    """Dynamic int8 quantization of ``src`` into ``dst`` (``onnxruntime.quantization.quantize_dynamic``).

    Args:
        reduce_range: 7-bit weights (for x86 CPUs without VNNI, where U8S8 can saturate).
        per_channel: one weight scale per output channel instead of one per tensor. Measured on the
            main job's pruned MiniLM (35% FLOPs, float32 88.65% on SST-2 dev, each sentence alone):
            per tensor 87.73%, per channel 89.11% (docs/benchmarks.md).
        weight_type: ``"s8"`` (signed weights, U8S8 kernels) or ``"u8"`` (U8U8).

    Raises:
        ValueError: an unknown ``weight_type``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type '{weight_type}': choose from {list(WEIGHT_TYPES)}")
    with _quiet():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8 if weight_type == "s8" else QuantType.QUInt8,
            reduce_range=reduce_range,
            per_channel=per_channel,
        )
    return _readable(Path(dst))


def quantize_int8_static(
    src: str | Path,
    dst: str | Path,
    calibration: Iterable[Mapping],
    *,
    reduce_range: bool = False,
    weight_type: str = "s8",
    per_channel: bool = True,
    quant_format: str = "qoperator",
) -> Path:
    """Static (calibrated) int8 quantization of ``src`` into ``dst`` (``onnxruntime.quantization.quantize_static``).

    Every activation feeding a quantized MatMul (and every embedding lookup) gets one fixed scale and
    zero point, measured once on ``calibration`` (the min/max of each tensor over the calibration
    inputs, ``CalibrationMethod.MinMax``), so an example's output does not depend on the other examples
    of its batch, unlike dynamic quantization's per-call scales (issue 21 item 4). Quantized: MatMuls
    with a constant weight (``MatMulConstBOnly``: attention's activation-by-activation products stay
    float32, as in :func:`quantize_int8`) and the embedding tables (Gather). Activations u8
    (asymmetric), weights ``weight_type``.

    Args:
        calibration: the graph's inputs (``{name: int [B, T]}``), e.g. training sentences one per batch
            (no padding in the statistics); never the evaluation split.
        reduce_range, weight_type, per_channel: as :func:`quantize_int8` (per channel: one scale per
            output column of each weight, axis 1 of MatMul's ``B``).
        quant_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs around float operators; ONNX
            Runtime fuses them into integer kernels when it loads the graph) or ``"qoperator"``
            (QLinearMatMul and friends written into the graph).

    Raises:
        ValueError: an unknown ``weight_type`` or ``quant_format``, or no calibration inputs.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type '{weight_type}': choose from {list(WEIGHT_TYPES)}")
    if quant_format not in STATIC_FORMATS:
        raise ValueError(f"quant_format '{quant_format}': choose from {list(STATIC_FORMATS)}")
    feeds = [{k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.int64) for k, v in b.items()} for b in calibration]
    if not feeds:
        raise ValueError("static int8 quantization needs at least one calibration batch")
    names = {i.name for i in session(src, 1).get_inputs()}

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{k: v for k, v in f.items() if k in names} for f in feeds])

        def get_next(self):
            return next(self._it, None)

    with _quiet():
        quantize_static(
            str(src),
            str(dst),
            _Reader(),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=["MatMul", "Gather"],
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if weight_type == "s8" else QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": weight_type == "s8"},
        )
    return _readable(Path(dst))


def _op_types(path: str | Path) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(n.domain, n.op_type) for n in graph.node]


def graph_precision(path: str | Path) -> str:
    """The kind of graph: ``"int8"`` (dynamic quantization: activations quantized per call), ``"int8_static"``
    (fixed activation scales: QuantizeLinear / QLinear* kernels and no dynamic ones), else ``"float32"``."""
    ops = {op for _, op in _op_types(path)}
    if ops & _DYNAMIC_OPS:
        return "int8"
    return "int8_static" if ops & _STATIC_OPS else "float32"


def contrib_ops(path: str | Path) -> dict[str, int]:
    """Counts of ONNX Runtime contrib operators (domain ``com.microsoft``) in the graph, by type."""
    out: dict[str, int] = {}
    for domain, op in _op_types(path):
        if domain == "com.microsoft":
            out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items()))


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU ``InferenceSession`` of ``path`` (``threads``: intra-op threads; None = all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(sess, batch: Mapping) -> dict[str, np.ndarray]:
    out = {}
    for i in sess.get_inputs():
        if i.name not in batch:
            raise ValueError(f"the batch lacks the graph input '{i.name}' (has {sorted(batch)})")
        v = batch[i.name]
        out[i.name] = (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.int64)
    return out


def logits(sess, batch: Mapping) -> np.ndarray:
    """``logits [batch, labels]`` float32 of ``sess`` on ``batch`` (the graph's inputs, ``[B, T]`` int, torch or numpy)."""
    return sess.run(["logits"], _feeds(sess, batch))[0]


def max_logit_diff(a: str | Path, b: str | Path, batches: Iterable[Mapping]) -> float:
    """Max absolute difference of the logits of graphs ``a`` and ``b`` over ``batches``."""
    sa, sb = session(a, 1), session(b, 1)
    return max(float(np.abs(logits(sa, x) - logits(sb, x)).max()) for x in batches)


def _try_fuse(src: Path, dst: Path) -> tuple[bool, dict, str | None]:
    try:
        return True, fuse(src, dst), None
    except Exception as exc:  # a rewriter that cannot handle the graph: keep the unfused one
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, {}, f"fusion failed ({type(exc).__name__}: {first[:200]})"


def _fused_float(raw: Path, work: Path, batches: list, enabled: bool) -> tuple[Path, dict]:
    info: dict = {"fused": False, "ops": {}, "note": None}
    if not enabled:
        info["note"] = "fusion off"
        return raw, info
    ok, ops, note = _try_fuse(raw, work / "fp32_fused.onnx")
    if not ok:
        info["note"] = note
        return raw, info
    diff = max_logit_diff(raw, work / "fp32_fused.onnx", batches)
    info["max_abs_diff_vs_export"] = diff
    if diff > FUSION_TOLERANCE:
        info["note"] = f"fused graph differs from the export by {diff:.2e} (> {FUSION_TOLERANCE:g}); kept unfused"
        return raw, info
    info.update(fused=True, ops=ops)
    return work / "fp32_fused.onnx", info


def _fused_int8(
    raw: Path, work: Path, batches: list, enabled: bool, reduce_range: bool, weight_type: str, per_channel: bool = True
) -> tuple[Path, dict]:
    """Dynamic int8 of ``raw`` (:func:`quantize_int8`), fused when fusing keeps it as close to float32 (:func:`_keep_fused`)."""
    plain = quantize_int8(raw, work / "int8.onnx", reduce_range=reduce_range, weight_type=weight_type, per_channel=per_channel)
    return _keep_fused(raw, plain, work / "int8_fused.onnx", batches, enabled, "int8")


def _fused_static(
    raw: Path, work: Path, batches: list, enabled: bool, calibration: list, reduce_range: bool, weight_type: str, per_channel: bool, quant_format: str
) -> tuple[Path, dict]:
    """Static int8 of ``raw`` (:func:`quantize_int8_static`), fused when fusing keeps it as close to float32 (:func:`_keep_fused`)."""
    plain = quantize_int8_static(
        raw, work / "int8_static.onnx", calibration, reduce_range=reduce_range, weight_type=weight_type, per_channel=per_channel, quant_format=quant_format
    )
    return _keep_fused(raw, plain, work / "int8_static_fused.onnx", batches, enabled, "static int8")


def _keep_fused(raw: Path, plain: Path, fused: Path, batches: list, enabled: bool, label: str) -> tuple[Path, dict]:
    """``fused`` (the onnxscript fusions of the quantized graph ``plain``) when it is no further from the float32
    graph ``raw`` than ``plain`` is (within :data:`INT8_FUSION_SLACK`), else ``plain``; with the reason."""
    plain_err = max_logit_diff(raw, plain, batches)
    info: dict = {"fused": False, "ops": {}, "note": None, "max_abs_diff_vs_float32": plain_err}
    if not enabled:
        info["note"] = "fusion off"
        return plain, info
    ok, ops, note = _try_fuse(plain, fused)
    if not ok:
        info["note"] = note
        return plain, info
    err = max_logit_diff(raw, fused, batches)
    if err > INT8_FUSION_SLACK * plain_err + FUSION_TOLERANCE:
        info["note"] = f"fused {label} graph is further from float32 ({err:.2e}) than the unfused one ({plain_err:.2e}); kept unfused"
        return plain, info
    info.update(fused=True, ops=ops, max_abs_diff_vs_float32=err)
    return fused, info


def _mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def kinds_for(quantize: str) -> list[str]:
    """The graphs ``export.quantize`` builds, float32 first: ``none`` float32; ``int8`` + dynamic int8;
    ``int8_static`` + static int8; ``all`` all three.

    Raises:
        ValueError: an unknown ``quantize``.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize '{quantize}': choose from {list(QUANTIZE_CHOICES)}")
    return {"none": ["float32"], "int8": ["float32", "int8"], "int8_static": ["float32", "int8_static"], "all": list(GRAPH_KINDS)}[quantize]


#: Batch-1 latencies within this fraction of the fastest count as a tie (timing noise on a shared CPU is
#: several percent); a tie goes to the quantized graph, 4x smaller on disk.
SPEED_TIE = 0.10


def choose_graph(
    kinds: list[str],
    *,
    values: Mapping[str, float | None] | None = None,
    floor: float | None = None,
    batch_differ: Mapping[str, int | None] | None = None,
    ms: Mapping[str, float | None] | None = None,
) -> tuple[str, str, dict]:
    """Which graph ships (issue 21 item 4): the fastest one that holds the budget and answers each
    sentence the same whatever its batch; float32 when none does.

    A graph *holds* when its metric (``values``, sentence by sentence) is at least ``floor`` (no floor:
    every graph) and none of its dev predictions differ between batch 1 and batch 16 (``batch_differ``;
    not measured: not held against it). Among those, the lowest ``ms`` (milliseconds per call at batch 1,
    measured side by side) wins, a graph within :data:`SPEED_TIE` of it counting as as fast (then static
    int8, then dynamic int8, then float32: the smaller file); without timings, that order alone (the
    quantized kernels are assumed faster). None holds: float32.

    Returns:
        ``(kind, reason, candidates)``: ``reason`` one sentence for the report; ``candidates``
        ``{kind: {"value", "within_budget", "batch_differ", "ms_batch1", "holds"}}``.
    """
    values, batch_differ, ms = values or {}, batch_differ or {}, ms or {}
    table = {}
    for k in kinds:
        v, d = values.get(k), batch_differ.get(k)
        within = floor is None or (v is not None and v >= floor - 1e-12)
        table[k] = {"value": v, "within_budget": within, "batch_differ": d, "ms_batch1": ms.get(k), "holds": within and not d}
    held = [k for k in kinds if table[k]["holds"]]

    def why_not(k):
        c = table[k]
        parts = []
        if not c["within_budget"]:
            parts.append("below the budget" + (f" ({100 * c['value']:.2f}% < {100 * floor:.2f}%)" if c["value"] is not None else ""))
        if c["batch_differ"]:
            parts.append(f"{c['batch_differ']} dev predictions differ between batch 1 and 16")
        return f"{k}: " + " and ".join(parts)

    rejected = "; ".join(why_not(k) for k in kinds if not table[k]["holds"])
    if not held:
        return "float32", "no graph holds the budget with batch-independent predictions; shipped float32" + (f" ({rejected})" if rejected else ""), table
    if len(held) > 1 and all(table[k]["ms_batch1"] is not None for k in held):
        fastest = min(table[k]["ms_batch1"] for k in held)
        order = ("int8_static", "int8", "float32")
        kind = min(held, key=lambda k: (table[k]["ms_batch1"] > fastest * (1 + SPEED_TIE), order.index(k) if k in order else len(order)))
        timed = ", ".join(f"{k} {table[k]['ms_batch1']:.2f} ms" for k in held)
        reason = f"fastest at batch 1 of the graphs that hold, within {100 * SPEED_TIE:.0f}% the smaller file ({timed})"
    else:
        kind = next(k for k in ("int8_static", "int8", "float32") if k in held)
        reason = "the only graph that holds" if len(held) == 1 else f"no timings: the preferred of {held}"
    budget = "the budget and " if floor is not None else ""
    reason = f"{kind}: {reason}; held {budget}batch independence" + (f"; rejected {rejected}" if rejected else "")
    return kind, reason, table


def deploy(
    fp32_path: str | Path,
    *,
    check_batches: list[Mapping],
    quantize: str = "int8",
    reduce_range: bool = False,
    weight_type: str = "s8",
    per_channel: bool = True,
    fusion: bool = True,
    evaluate: Callable[[Path], Mapping[str, float]] | None = None,
    metric: str | None = None,
    floor: float | None = None,
    calibration: Iterable[Mapping] | None = None,
    static_format: str = "qoperator",
    batch_differ: Callable[[Path], int] | None = None,
    timer: Callable[[list[Path]], list[float]] | None = None,
) -> dict:
    """Turn an exported float32 graph into the folder's deployed model (see the module docstring):
    :func:`build_graphs`, then :func:`choose_graph` (``timer``: ms per call at batch 1 of the graphs, side
    by side), then :func:`ship`.

    Returns:
        :func:`ship`'s dict.
    """
    info = build_graphs(
        fp32_path, check_batches=check_batches, quantize=quantize, reduce_range=reduce_range, weight_type=weight_type,
        per_channel=per_channel, fusion=fusion, evaluate=evaluate, metric=metric, floor=floor, calibration=calibration,
        static_format=static_format, batch_differ=batch_differ,
    )
    ms = None
    if timer is not None:
        kinds = [k for k, f in info["files"].items() if f]
        ms = dict(zip(kinds, timer([Path(fp32_path).parent / info["files"][k] for k in kinds])))
    return ship(fp32_path, info, ms=ms)


def build_graphs(
    fp32_path: str | Path,
    *,
    check_batches: list[Mapping],
    quantize: str = "int8",
    reduce_range: bool = False,
    weight_type: str = "s8",
    per_channel: bool = True,
    fusion: bool = True,
    evaluate: Callable[[Path], Mapping[str, float]] | None = None,
    metric: str | None = None,
    floor: float | None = None,
    calibration: Iterable[Mapping] | None = None,
    static_format: str = "qoperator",
    batch_differ: Callable[[Path], int] | None = None,
) -> dict:
    """Build the graphs ``quantize`` asks for beside the export, each verified and (given the callbacks)
    evaluated; :func:`ship` then picks the one that becomes ``model.onnx``.

    Args:
        fp32_path: the exporter's graph, usually ``<folder>/model.onnx``; the outputs go to its folder as
            ``model_fp32.onnx``, ``model_int8.onnx`` (dynamic), ``model_int8_static.onnx``.
        check_batches: batches of the graph's inputs (``input_ids``, ``attention_mask``, and
            ``token_type_ids`` where the graph takes them; ``[B, T]`` int, torch or numpy) on which
            rewrites are verified and logit errors measured; real, padded sentences.
        quantize: ``"none"``, ``"int8"`` (dynamic), ``"int8_static"`` or ``"all"`` (:func:`kinds_for`).
        reduce_range, weight_type, per_channel: see :func:`quantize_int8` (both int8 schemes).
        fusion: try the fused-kernel rewrite (kept only where verified).
        evaluate: ``path -> {metric: value}`` (fractions), e.g. :func:`prune_attattr.deploy.onnx_eval.evaluate_onnx`
            on the dev split one sentence at a time; called on every graph.
        metric, floor: the metric that judges and its lowest allowed value (e.g. unpruned - ``export.max_drop``).
        calibration: inputs of static quantization (:func:`quantize_int8_static`), training sentences;
            required for ``int8_static``/``all``.
        static_format: ``"qoperator"`` or ``"qdq"`` (:func:`quantize_int8_static`).
        batch_differ: ``path -> number of dev predictions that differ between batch 1 and batch 16``
            (:func:`prune_attattr.deploy.onnx_eval.batch_differences`); called on every graph.

    Returns:
        ``{"deployed": None, "precision": None, "files": {kind: staged name or None}, "mb", "quantization":
        {kind: {...}} or None, "fusion": {kind: {...}}, "max_abs_diff_int8_vs_float32", "max_abs_diff_vs_float32":
        {kind: float}, "metrics": {kind: {...}} (with ``evaluate``), "batch_differ": {kind: int} (with
        ``batch_differ``), "floor", "metric", "note": None}``, kinds among float32, int8, int8_static.

    Raises:
        ValueError: ``quantize``/``weight_type`` unknown, ``floor`` without ``evaluate`` and ``metric``,
            static int8 without ``calibration``.
        RunError: ``fp32_path`` does not exist or is not a float32 graph.
    """
    kinds = kinds_for(quantize)
    if floor is not None and (evaluate is None or metric is None):
        raise ValueError("a floor (budget) needs evaluate and metric: the deployed model's metric must be measured")
    calibration = list(calibration) if calibration is not None else None
    if "int8_static" in kinds and not calibration:
        raise ValueError(f"quantize '{quantize}' builds a static int8 graph: give calibration inputs (training sentences)")
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise RunError(f"{fp32_path}: no ONNX graph to deploy; export it first (export.onnx: true)")
    if graph_precision(fp32_path) != "float32":
        raise RunError(f"{fp32_path} is already quantized; deploy() takes the exporter's float32 graph")
    folder = fp32_path.parent
    batches = list(check_batches)
    out: dict = {
        "deployed": None, "precision": None, "quantization": None, "max_abs_diff_int8_vs_float32": None,
        "max_abs_diff_vs_float32": {}, "metric": metric, "floor": floor, "budget": None, "note": None,
    }
    staged: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".deploy-") as tmp:
        work = Path(tmp)
        raw = work / "export.onnx"
        shutil.copyfile(fp32_path, raw)
        f32, f32_info = _fused_float(raw, work, batches, fusion)
        out["fusion"] = {"float32": f32_info}
        built = {"float32": f32}
        quant: dict = {}
        weights = weight_type + (" (7-bit range)" if reduce_range else "") + (", per channel" if per_channel else ", per tensor")
        common = {"weight_type": weight_type, "reduce_range": reduce_range, "per_channel": per_channel}
        if "int8" in kinds:
            q8, q8_info = _fused_int8(raw, work, batches, fusion, reduce_range, weight_type, per_channel)
            out["fusion"]["int8"] = q8_info
            out["max_abs_diff_vs_float32"]["int8"] = out["max_abs_diff_int8_vs_float32"] = q8_info.pop("max_abs_diff_vs_float32")
            built["int8"] = q8
            quant["int8"] = {
                "method": "onnxruntime.quantization.quantize_dynamic", "activations": "u8 (per tensor, per call)", "weights": weights, **common,
            }
        if "int8_static" in kinds:
            s8, s8_info = _fused_static(raw, work, batches, fusion, calibration, reduce_range, weight_type, per_channel, static_format)
            out["fusion"]["int8_static"] = s8_info
            out["max_abs_diff_vs_float32"]["int8_static"] = s8_info.pop("max_abs_diff_vs_float32")
            built["int8_static"] = s8
            quant["int8_static"] = {
                "method": f"onnxruntime.quantization.quantize_static ({static_format}, MinMax calibration)",
                "activations": f"u8 (per tensor, fixed scales from {len(calibration)} calibration batches)",
                "weights": weights, "calibration_batches": len(calibration), "format": static_format, **common,
            }
        out["quantization"] = quant or None
        # into the folder under their own names: the evaluation reads the tokenizer beside the graph
        for kind in GRAPH_KINDS:
            (folder / STAGED_NAMES[kind]).unlink(missing_ok=True)
        for kind, path in built.items():
            os.replace(path, folder / STAGED_NAMES[kind])
            staged[kind] = folder / STAGED_NAMES[kind]
    out["files"] = {k: (STAGED_NAMES[k] if k in staged else None) for k in GRAPH_KINDS}
    if evaluate is not None:
        out["metrics"] = {k: dict(evaluate(p)) for k, p in staged.items()}
    if batch_differ is not None:
        out["batch_differ"] = {k: int(batch_differ(p)) for k, p in staged.items()}
    return out


def ship(fp32_path: str | Path, info: dict, *, ms: Mapping[str, float | None] | None = None) -> dict:
    """Ship one of :func:`build_graphs`'s graphs as ``model.onnx`` (:func:`choose_graph` on its metrics,
    budget, batch differences and ``ms``, ms per call at batch 1), in one rename that replaces the
    export; the other graphs keep their staged names.

    Returns:
        ``info`` completed: ``"deployed": "model.onnx"``, ``"precision"``: the shipped kind, ``"files"``
        (the shipped kind's entry is ``model.onnx``), ``"mb"``, ``"choice": {"reason", "candidates"}``,
        ``"budget"`` (with a floor) and ``"note"`` (when a quantized graph was built and not shipped).
    """
    folder = Path(fp32_path).parent
    metric, floor = info.get("metric"), info.get("floor")
    kinds = [k for k, f in info["files"].items() if f]
    values = {k: (info.get("metrics") or {}).get(k, {}).get(metric) for k in kinds} if metric else {}
    kind, reason, table = choose_graph(kinds, values=values, floor=floor, batch_differ=info.get("batch_differ"), ms=ms)
    os.replace(folder / info["files"][kind], folder / "model.onnx")
    info["files"][kind] = "model.onnx"
    info["deployed"], info["precision"] = "model.onnx", kind
    info["choice"] = {"reason": reason, "candidates": table}
    if floor is not None and len(kinds) > 1:
        info["budget"] = {
            "metric": metric, "floor": floor, **{k: values.get(k) for k in kinds},
            "within": {k: table[k]["within_budget"] for k in kinds},
            "int8_within": table["int8"]["within_budget"] if "int8" in table else None,
        }
    if kind == "float32" and len(kinds) > 1:
        info["note"] = f"shipped float32 (model.onnx): {reason}"
    info["mb"] = {k: _mb(folder / v) for k, v in info["files"].items() if v}
    return info
