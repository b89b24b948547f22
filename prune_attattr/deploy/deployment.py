"""The export stage's deployment step in one call: deploy the pruned (and unpruned) ONNX folders,
judge the shipped model by its own dev metric, time all graphs side by side (issue 16).

:func:`deploy_run` runs, on the main process, after :func:`prune_attattr.deploy.onnx_export.export_onnx_folder`
wrote ``<run>/onnx/model.onnx`` (pruned) and, for the comparison, ``<run>/unpruned/onnx/model.onnx``
(the unpruned fine-tuned model, exported the same way):

1. the unpruned folder is deployed (:func:`prune_attattr.deploy.quantize.deploy`, no budget) and its float32
   graph's dev metric, measured by ONNX Runtime (:func:`prune_attattr.deploy.onnx_eval.evaluate_onnx`), is the
   baseline;
2. the pruned folder is deployed with the floor ``baseline - max_drop``: an int8 graph below it is not
   shipped (``model.onnx`` stays float32, and the result says so);
3. every graph is timed at batch 1 and 16 on real dev sentences (:func:`prune_attattr.deploy.bench.time_run`).

The returned dict is the report's ``export.deployment``; :func:`prune_attattr.report.deployment_table`
and :func:`prune_attattr.report.deployment_markdown` render its ``bench`` entry, and
``prune-attattr bench`` reads its metrics back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .bench import cpu_name, folder_candidates, time_run
from .onnx_eval import evaluate_onnx
from .quantize import deploy
from ..tasks import Examples

__all__ = ["deploy_run"]


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
    eval_batch_size: int = 1,
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
        quantize, reduce_range, weight_type, per_channel, fusion: ``export.quantize`` etc. (:func:`prune_attattr.deploy.quantize.deploy`).
        max_drop: ``export.max_drop`` (fraction); None: no budget (``export.heads``), int8 ships as is.
        baseline: the judged metric of the unpruned model when ``unpruned_onnx`` is None.
        max_length: truncation of the evaluation and timing inputs (None: the tokenizer's own limit).
        eval_batch_size: examples per ONNX Runtime call in the evaluation (1: each alone, independent of
            batching; four passes over the dev split, so raise it for large dev sets and models).
        threads: ONNX Runtime intra-op threads (``runtime.threads``; None = all cores).

    Returns:
        ``{"metric", "baseline": {"value", "source"}, "floor", "pruned": deploy dict, "unpruned":
        deploy dict or None, "bench": {"metric", "cpu", "threads", "sentences", "rounds", "batch_sizes", "rows"}}``.

    Raises:
        ValueError: ``max_drop`` without an unpruned graph or a ``baseline``.
    """
    metric = metrics[0]

    def evaluate(path: Path) -> dict[str, float]:
        return evaluate_onnx(path, examples, metrics, max_length=max_length, batch_size=eval_batch_size, threads=threads)

    common = dict(check_batches=check_batches, quantize=quantize, reduce_range=reduce_range, weight_type=weight_type, per_channel=per_channel, fusion=fusion, evaluate=evaluate, metric=metric)
    unpruned = deploy(unpruned_onnx, **common) if unpruned_onnx is not None else None
    if unpruned is not None:
        base = {"value": unpruned["metrics"]["float32"][metric], "source": "unpruned float32 ONNX graph, ONNX Runtime on the whole dev split"}
    else:
        base = {"value": baseline, "source": "given"}
    if max_drop is not None and base["value"] is None:
        raise ValueError("max_drop needs the unpruned graph or a baseline metric to measure the drop from")
    floor = base["value"] - max_drop if max_drop is not None else None
    pruned = deploy(pruned_onnx, floor=floor, **common)
    models = folder_candidates("pruned", Path(pruned_onnx).parent, pruned, metric)
    if unpruned is not None:
        models = folder_candidates("unpruned", Path(unpruned_onnx).parent, unpruned, metric) + models
    n = min(bench_sentences, len(examples))
    rows = time_run(models, examples, Path(pruned_onnx).parent.parent, sentences=n, threads=threads, rounds=bench_rounds, max_length=max_length)
    return {
        "metric": metric,
        "baseline": base,
        "floor": floor,
        "pruned": pruned,
        "unpruned": unpruned,
        "bench": {"metric": metric, "cpu": cpu_name(), "threads": threads, "sentences": n, "rounds": bench_rounds, "batch_sizes": [1, 16], "rows": rows},
    }

