"""A deployable ONNX folder: transformer kernel fusion and dynamic int8 quantization, each verified.

:func:`deploy` takes the float32 graph :func:`prune_attattr.deploy.onnx_export.export_onnx_folder` wrote
(``onnx/model.onnx``, from the torch.onnx dynamo exporter) and leaves in the same folder:

=========================  ======================================================================
``quantize: none``         ``model.onnx``: float32, fused
``quantize: int8``         ``model.onnx``: int8 (the **deployed** model), ``model_fp32.onnx``: float32
int8 below the budget      ``model.onnx``: float32 (shipped), ``model_int8.onnx``: the rejected int8
=========================  ======================================================================

and returns a dict for ``report.json`` that says which file is which, with both graphs' logit
errors and (given an evaluator) their dev metrics.

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
bias), plus ``SkipLayerNormalization`` and ``BiasGelu`` (``tests/test_quantize.py`` checks this).

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
    "deploy",
]

QUANTIZE_CHOICES = ("none", "int8")
WEIGHT_TYPES = ("s8", "u8")
FUSION_TOLERANCE = 1e-4  # the export's own ONNX-vs-PyTorch bound (float reassociation only)
INT8_FUSION_SLACK = 1.25  # a fused int8 graph may be at most this much further from float32 than the unfused one
_INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention", "DequantizeLinear"}


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


def fuse(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Rewrite ``src`` with ONNX Runtime's transformer kernels (fused attention, SkipLayerNormalization,
    BiasGelu; onnxscript's ``optimize_for_ort``) into ``dst``.

    Returns:
        The contrib-operator counts of ``dst`` (:func:`contrib_ops`), e.g. ``{"Attention": 6, ...}``.

    Raises:
        ImportError: onnxscript without ``rewriter.ort_fusions`` (onnxscript < 0.3).
        Exception: whatever the rewriter raises on a graph it cannot handle (callers fall back).
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet():
        model = ir.load(str(src))
        model, _ = optimize_for_ort(model)
        ir.save(model, str(dst))
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


def _op_types(path: str | Path) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(n.domain, n.op_type) for n in graph.node]


def graph_precision(path: str | Path) -> str:
    """``"int8"`` when the graph has integer (quantized) kernels, else ``"float32"``."""
    return "int8" if any(op in _INT8_OPS for _, op in _op_types(path)) else "float32"


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
    plain = quantize_int8(raw, work / "int8.onnx", reduce_range=reduce_range, weight_type=weight_type, per_channel=per_channel)
    plain_err = max_logit_diff(raw, plain, batches)
    info: dict = {"fused": False, "ops": {}, "note": None, "max_abs_diff_vs_float32": plain_err}
    if not enabled:
        info["note"] = "fusion off"
        return plain, info
    ok, ops, note = _try_fuse(plain, work / "int8_fused.onnx")
    if not ok:
        info["note"] = note
        return plain, info
    err = max_logit_diff(raw, work / "int8_fused.onnx", batches)
    if err > INT8_FUSION_SLACK * plain_err + FUSION_TOLERANCE:
        info["note"] = f"fused int8 graph is further from float32 ({err:.2e}) than the unfused one ({plain_err:.2e}); kept unfused"
        return plain, info
    info.update(fused=True, ops=ops, max_abs_diff_vs_float32=err)
    return work / "int8_fused.onnx", info


def _mb(path: Path) -> float:
    return path.stat().st_size / 2**20


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
) -> dict:
    """Turn an exported float32 graph into the folder's deployed model (see the module docstring).

    Args:
        fp32_path: the exporter's graph, usually ``<folder>/model.onnx``; the outputs go to its folder.
        check_batches: batches of the graph's inputs (``input_ids``, ``attention_mask``, and
            ``token_type_ids`` where the graph takes them; ``[B, T]`` int, torch or numpy) on which
            rewrites are verified and logit errors measured; real, padded sentences.
        quantize: ``"none"`` or ``"int8"``.
        reduce_range, weight_type, per_channel: see :func:`quantize_int8`.
        fusion: try the fused-kernel rewrite (kept only where verified).
        evaluate: ``path -> {metric: value}`` (fractions), e.g. :func:`prune_attattr.deploy.onnx_eval.evaluate_onnx`
            on the dev split; called on the float32 and (when quantizing) the int8 graph.
        metric, floor: the metric that judges and its lowest allowed value (e.g. unpruned - ``export.max_drop``);
            an int8 graph below it is not shipped: ``model.onnx`` is then the float32 graph.

    Returns:
        ``{"deployed": "model.onnx", "precision": "int8"|"float32", "files": {"float32": name,
        "int8": name or None}, "mb": {...}, "quantization": {...} or None, "fusion": {"float32": {...},
        "int8": {...}}, "max_abs_diff_int8_vs_float32": float or None, "metrics": {"float32": {...},
        "int8": {...}} (with ``evaluate``), "budget": {...} or None, "note": str or None}``; file names
        relative to the folder.

    Raises:
        ValueError: ``quantize``/``weight_type`` unknown, ``floor`` without ``evaluate`` and ``metric``.
        RunError: ``fp32_path`` does not exist or is not a float32 graph.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize '{quantize}': choose from {list(QUANTIZE_CHOICES)}")
    if floor is not None and (evaluate is None or metric is None):
        raise ValueError("a floor (budget) needs evaluate and metric: the deployed model's metric must be measured")
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise RunError(f"{fp32_path}: no ONNX graph to deploy; export it first (export.onnx: true)")
    if graph_precision(fp32_path) != "float32":
        raise RunError(f"{fp32_path} is already quantized; deploy() takes the exporter's float32 graph")
    folder = fp32_path.parent
    batches = list(check_batches)
    out: dict = {"deployed": "model.onnx", "quantization": None, "max_abs_diff_int8_vs_float32": None, "budget": None, "note": None}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".deploy-") as tmp:
        work = Path(tmp)
        raw = work / "export.onnx"
        shutil.copyfile(fp32_path, raw)
        f32, f32_info = _fused_float(raw, work, batches, fusion)
        out["fusion"] = {"float32": f32_info}
        q8 = None
        if quantize == "int8":
            q8, q8_info = _fused_int8(raw, work, batches, fusion, reduce_range, weight_type, per_channel)
            out["fusion"]["int8"] = q8_info
            out["max_abs_diff_int8_vs_float32"] = q8_info.pop("max_abs_diff_vs_float32")
            out["quantization"] = {
                "method": "onnxruntime.quantization.quantize_dynamic",
                "activations": "u8 (per tensor, per call)",
                "weights": weight_type + (" (7-bit range)" if reduce_range else "") + (", per channel" if per_channel else ", per tensor"),
                "weight_type": weight_type,
                "reduce_range": reduce_range,
                "per_channel": per_channel,
            }
        # into the folder under their own names first: the evaluation reads the tokenizer beside the graph
        for stale in ("model_fp32.onnx", "model_int8.onnx"):
            (folder / stale).unlink(missing_ok=True)
        os.replace(f32, folder / "model_fp32.onnx")
        f32 = folder / "model_fp32.onnx"
        if q8 is not None:
            os.replace(q8, folder / "model_int8.onnx")
            q8 = folder / "model_int8.onnx"
    metrics = {"float32": dict(evaluate(f32))} if evaluate is not None else None
    if metrics is not None and q8 is not None:
        metrics["int8"] = dict(evaluate(q8))
    ship_int8 = q8 is not None
    if q8 is not None and floor is not None:
        value = metrics["int8"][metric]
        ship_int8 = value >= floor
        out["budget"] = {"metric": metric, "floor": floor, "int8": value, "float32": metrics["float32"][metric], "int8_within": ship_int8}
        if not ship_int8:
            out["note"] = (
                f"int8 {metric} {100 * value:.2f}% is below the budget's floor {100 * floor:.2f}% "
                f"(export.max_drop); shipped float32 (model.onnx), the int8 graph is kept as model_int8.onnx"
            )
    # the last step replaces model.onnx (the export) in one rename, so a failure above leaves it in place
    if ship_int8:
        files = {"float32": "model_fp32.onnx", "int8": "model.onnx"}
        os.replace(q8, folder / "model.onnx")
    else:
        files = {"float32": "model.onnx", "int8": "model_int8.onnx" if q8 is not None else None}
        os.replace(f32, folder / "model.onnx")
    out["precision"] = "int8" if ship_int8 else "float32"
    out["files"] = files
    out["mb"] = {k: _mb(folder / v) for k, v in files.items() if v}
    if metrics is not None:
        out["metrics"] = metrics
    return out
