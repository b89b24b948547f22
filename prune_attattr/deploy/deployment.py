"""The export stage's deployment step in one call: build the pruned (and unpruned) ONNX folders' graphs,
judge them by their own dev metric and batch independence, time them side by side, ship the fastest
that holds (issues 16 and 21).

:func:`deploy_run` runs, on the main process, after :func:`prune_attattr.deploy.onnx_export.export_onnx_folder`
wrote ``<run>/onnx/model.onnx`` (pruned) and, for the comparison, ``<run>/unpruned/onnx/model.onnx``
(the unpruned fine-tuned model, exported the same way):

1. each folder's graphs are built and verified (:func:`prune_attattr.deploy.quantize.build_graphs`:
   float32 and, per ``export.quantize``, dynamic and/or static int8, the static one calibrated on
   training sentences) and every graph is evaluated by ONNX Runtime on the whole dev split one sentence
   at a time (:func:`prune_attattr.deploy.onnx_eval.predict_onnx`; the unpruned float32 graph's metric is
   the baseline) and again at batch 16, counting the predictions that change
   (:func:`prune_attattr.deploy.onnx_eval.batch_differences`);
2. every graph is timed at batch 1 and 16 on real dev sentences, side by side, with one thread, with
   ``threads``, and (batch 16) split between ``threads`` one-thread sessions, each at its fastest
   (:func:`prune_attattr.deploy.bench.time_run`, :func:`prune_attattr.deploy.bench.serving_threads`, :func:`prune_attattr.deploy.bench.serving_split`);
3. each folder ships the fastest graph at batch 1 that holds: the pruned one's metric at least
   ``baseline - max_drop``, and no prediction that depends on the batch (:func:`prune_attattr.deploy.quantize.choose_graph`;
   none holds: float32); the graph is renamed ``model.onnx`` (:func:`prune_attattr.deploy.quantize.ship`).

The returned dict is the report's ``export.deployment``; :func:`prune_attattr.report.deployment_table`
and :func:`prune_attattr.report.deployment_markdown` render its ``bench`` entry, and
``prune-attattr bench`` reads its metrics back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .bench import cpu_info, cpu_name, folder_candidates, serving_split, serving_threads, time_run
from .onnx_eval import differing_predictions, load_folder_tokenizer, predict_onnx, tokenize
from .quantize import build_graphs, ship
from ..tasks import Examples

__all__ = ["calibration_batches", "deploy_run"]


def calibration_batches(folder: str | Path, examples: Examples, *, count: int, max_length: int | None = None) -> list[dict]:
    """Inputs of static int8 calibration: the first ``count`` of ``examples`` (training sentences, never the
    dev split), one per batch so that no padding enters the activation ranges, tokenised by the folder's
    own tokenizer (:func:`prune_attattr.deploy.onnx_eval.tokenize`): ``[{name: int64 [1, T]}, ...]``."""
    tok = load_folder_tokenizer(folder)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in tok.model_input_names else [])
    out = []
    for i in range(min(count, len(examples))):
        pair = [examples.pairs[i]] if examples.pairs is not None else None
        out.append(tokenize(tok, [examples.texts[i]], pair, names, max_length))
    return out


def deploy_run(
    pruned_onnx: str | Path,
    unpruned_onnx: str | Path | None,
    *,
    check_batches: list[Mapping],
    examples: Examples,
    metrics: Sequence[str],
    quantize: str = "none",
    reduce_range: bool = False,
    weight_type: str = "s8",
    per_channel: bool = True,
    fusion: bool = True,
    max_drop: float | None = None,
    baseline: float | None = None,
    max_length: int | None = None,
    calibration: Examples | None = None,
    calibration_examples: int = 256,
    static_format: str = "qoperator",
    threads: int | None = None,
    bench_sentences: int = 256,
    bench_rounds: int = 5,
) -> dict:
    """Deploy, evaluate and time a run's models (see the module docstring).

    Args:
        pruned_onnx, unpruned_onnx: the exporter's float32 graphs (``.../onnx/model.onnx``), the
            tokenizer saved beside each; ``unpruned_onnx`` None: no comparison rows, ``baseline`` given.
        check_batches: padded batches of real inputs the rewrites are verified on (both models take them).
        examples, metrics: the whole dev split and the task's metric names (the first one judges).
        quantize, reduce_range, weight_type, per_channel, fusion, static_format: ``export.quantize`` etc.
            (:func:`prune_attattr.deploy.quantize.build_graphs`).
        max_drop: ``export.max_drop`` (fraction); None: no budget (``export.heads``): batch independence
            and speed decide.
        baseline: the judged metric of the unpruned model when ``unpruned_onnx`` is None.
        max_length: truncation of the evaluation, calibration and timing inputs (None: the tokenizer's own limit).
        calibration, calibration_examples: training examples for static int8 and how many of them calibrate.
        threads: ONNX Runtime intra-op threads (``runtime.threads``; None = all cores) of the evaluation; the
            timing tries one thread and split batches as well (:func:`prune_attattr.deploy.bench.serving_threads`,
            :func:`prune_attattr.deploy.bench.serving_split`).

    Returns:
        ``{"metric", "baseline": {"value", "source"}, "floor", "pruned": deploy dict, "unpruned": deploy
        dict or None, "loyalty": {kind: {"label", "probability"}} of the pruned folder's graphs against the
        unpruned float32 graph (dev split, one sentence at a time; None without it), "cpu": {"model",
        "flags"} (:func:`prune_attattr.deploy.bench.cpu_info`), "bench": {"metric", "cpu", "threads" (the counts timed),
        "sentences", "rounds", "batch_sizes", "rows"}}``; each deploy dict says which graph ships and why
        (``precision``, ``choice``), with every graph's metric and ``batch_differ``.

    Raises:
        ValueError: ``max_drop`` without an unpruned graph or a ``baseline``; static int8 without calibration examples.
    """
    import torch

    from ..evaluation import compute_metrics, loyalty

    metric = metrics[0]
    alone: dict[str, np.ndarray] = {}  # batch-1 logits per graph file: evaluated once, reused by the batch check

    def logits_alone(path: Path) -> np.ndarray:
        key = str(Path(path).resolve())
        if key not in alone:
            alone[key] = predict_onnx(path, examples.texts, examples.pairs, max_length=max_length, batch_size=1, threads=threads)
        return alone[key]

    def evaluate(path: Path) -> dict[str, float]:
        return compute_metrics(metrics, torch.from_numpy(logits_alone(path).argmax(-1)), torch.tensor(examples.labels))

    def batch_differ(path: Path) -> int:
        batched = predict_onnx(path, examples.texts, examples.pairs, max_length=max_length, batch_size=16, threads=threads)
        return differing_predictions(logits_alone(path), batched)

    def calibrate(onnx_path) -> list[dict] | None:
        if quantize not in ("int8_static", "all"):
            return None
        if calibration is None or len(calibration) == 0:
            raise ValueError(f"quantize '{quantize}' calibrates static int8 on training sentences: give calibration examples")
        return calibration_batches(Path(onnx_path).parent, calibration, count=calibration_examples, max_length=max_length)

    common = dict(
        check_batches=check_batches, quantize=quantize, reduce_range=reduce_range, weight_type=weight_type, per_channel=per_channel,
        fusion=fusion, evaluate=evaluate, metric=metric, static_format=static_format, batch_differ=batch_differ,
    )
    unpruned = build_graphs(unpruned_onnx, calibration=calibrate(unpruned_onnx), **common) if unpruned_onnx is not None else None
    if unpruned is not None:
        base = {"value": unpruned["metrics"]["float32"][metric], "source": "unpruned float32 ONNX graph, ONNX Runtime on the whole dev split"}
    else:
        base = {"value": baseline, "source": "given"}
    if max_drop is not None and base["value"] is None:
        raise ValueError("max_drop needs the unpruned graph or a baseline metric to measure the drop from")
    floor = base["value"] - max_drop if max_drop is not None else None
    pruned = build_graphs(pruned_onnx, floor=floor, calibration=calibrate(pruned_onnx), **common)

    # time every graph side by side under its staged name, then ship each folder's choice
    pruned_dir = Path(pruned_onnx).parent
    folders = [("pruned", pruned_dir, pruned)]
    if unpruned is not None:
        folders.insert(0, ("unpruned", Path(unpruned_onnx).parent, unpruned))
    models = [c for which, folder, info in folders for c in folder_candidates(which, folder, info, metric)]
    n = min(bench_sentences, len(examples))
    run_dir = pruned_dir.parent
    counts, split = serving_threads(threads), serving_split(threads)
    rows = time_run(models, examples, run_dir, sentences=n, threads=counts, split=split, rounds=bench_rounds, max_length=max_length)
    loyal = None  # before shipping renames a graph: the batch-1 logits are kept under the staged names
    if unpruned is not None:
        reference = torch.from_numpy(logits_alone(Path(unpruned_onnx).parent / unpruned["files"]["float32"]))
        loyal = {k: loyalty(torch.from_numpy(logits_alone(pruned_dir / f)), reference) for k, f in pruned["files"].items() if f}
    for which, folder, info in folders:
        ms = {r["precision"]: r["ms"]["1"] for r in rows if r["label"].startswith(which + " ")}
        ship(folder / "model.onnx", info, ms=ms)
        for r in rows:
            if r["label"].startswith(which + " "):
                name = info["files"][r["precision"]]
                r["file"] = str((folder / name).relative_to(run_dir)) if (folder / name).is_relative_to(run_dir) else str(folder / name)
                r["deployed"] = which == "pruned" and name == "model.onnx"

    cpu = cpu_info()
    return {
        "metric": metric,
        "baseline": base,
        "floor": floor,
        "pruned": pruned,
        "unpruned": unpruned,
        "loyalty": loyal,
        "cpu": cpu,
        "bench": {
            "metric": metric, "cpu": cpu_name(cpu), "threads": list(counts), "split": split, "sentences": n, "rounds": bench_rounds, "batch_sizes": [1, 16], "rows": rows,
        },
    }
