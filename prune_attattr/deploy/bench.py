"""Side-by-side ONNX Runtime timing of a run's models on real dev sentences, and their file sizes.

:func:`time_models` times several graphs on the same batches: batch 1 (each sentence alone, as a
server answering one request at a time) and batch 16 (consecutive sentences, padded to the longest).
Every model first runs the whole batch set once untimed (warm-up: ONNX Runtime allocates per shape).
Then, in each of ``rounds`` rounds, the models take turns, each running the whole batch set, the order
rotating from round to round, so that drift (other processes, frequency scaling, heat) hits all models
alike; a model's figure for a round is its mean milliseconds per call over the batch set, the reported
figure the median over rounds. Each turn starts with one untimed call: ONNX Runtime's worker threads
busy-wait for a while after a call, and the previous model's would otherwise slow the first calls
down. (Alternating call by call would pay that on every call: measured on 2 cores, it doubled the
batch-1 latency of MiniLM; turning the busy-waiting off instead slowed batch 16 2.3x.) Given several
thread counts (and a ``split``), each model has one session per layout, all of them take turns, and each
model and batch size is reported at its fastest layout (:func:`serving_threads`, :func:`serving_split`:
deployment tables time one thread, the run's count, and batches split between one-thread sessions,
because a small graph can be faster and steadier on one core).

:func:`bench_run` (``prune-attattr bench exported/<run>``) re-times a finished run on the current
machine. A run folder's layout::

    exported/<run>/
        recipe.yaml, report.json           the resolved recipe (dev data, runtime.threads), the report
        onnx/model.onnx                    the deployed pruned model (int8 when export.quantize int8 held the budget)
        onnx/model_fp32.onnx               its float32 graph, when model.onnx is int8
        onnx/model_int8.onnx               the int8 graph the budget rejected (model.onnx is then float32)
        onnx/config.json, tokenizer files
        unpruned/onnx/model.onnx, model_fp32.onnx, ...   the unpruned fine-tuned model, exported and
                                           deployed the same way (no budget), when the run kept it

Rows, in this order where the files exist: unpruned float32, unpruned int8, pruned float32, pruned
int8; a file's precision is read from its graph (:func:`prune_attattr.deploy.quantize.graph_precision`),
metrics from ``report.json`` (``export.deployment``, written by :func:`prune_attattr.deploy.deployment.deploy_run`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RunError

__all__ = [
    "Candidate", "BATCH_SIZES", "CPU_FLAGS", "feed_batches", "split_feeds", "thread_counts", "serving_threads", "serving_split", "layout_labels", "time_models", "folder_candidates", "candidates", "time_run", "bench_run",
    "cpu_name", "cpu_info",
]

BATCH_SIZES = (1, 16)
PRECISIONS = ("float32", "int8", "int8_static")  # prune_attattr.deploy.quantize.GRAPH_KINDS
LABELS = {"float32": "float32", "int8": "int8 dynamic", "int8_static": "int8 static"}
_FILES = ("model_fp32.onnx", "model.onnx", "model_int8.onnx", "model_int8_static.onnx")
#: /proc/cpuinfo flags that decide int8 speed: VNNI (8-bit dot products, AVX-512 or AVX) and AMX (tile int8 GEMMs)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass
class Candidate:
    """One graph to time: ``label`` for the table, ``metric`` (fraction) if known, ``deployed`` if shipped."""

    label: str
    path: Path
    metric: float | None = None
    deployed: bool = False
    precision: str | None = None  # None: read from the graph
    batch_differ: int | None = None  # dev predictions that differ between batch 1 and batch 16, if measured


def feed_batches(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, batch_size: int, names: Sequence[str], max_length: int | None = None) -> list[dict]:
    """Consecutive chunks of ``batch_size`` sentences (the last one may be shorter), tokenised as a user
    would (:func:`prune_attattr.deploy.onnx_eval.tokenize`): ``[{name: int64 [B, T]}, ...]``."""
    from .onnx_eval import tokenize

    out = []
    for i in range(0, len(texts), batch_size):
        p = pairs[i : i + batch_size] if pairs is not None else None
        out.append(tokenize(tokenizer, texts[i : i + batch_size], p, names, max_length))
    return out


def _rotated(n: int, k: int) -> list[int]:
    return [(k + j) % n for j in range(n)]


def thread_counts(threads: int | None | Sequence[int | None]) -> tuple[int | None, ...]:
    """The intra-op thread counts to time, in order, without repeats: ``2`` -> ``(2,)``, ``[1, 2]`` -> ``(1, 2)``
    (None = ONNX Runtime's default, all physical cores).

    Raises:
        ValueError: no count, or a count below 1.
    """
    counts = tuple(dict.fromkeys(threads if isinstance(threads, (list, tuple)) else (threads,)))
    if not counts or any(t is not None and t < 1 for t in counts):
        raise ValueError(f"thread counts must be at least 1 (got {list(counts)})")
    return counts


def serving_threads(threads: int | None) -> tuple[int | None, ...]:
    """The thread counts a deployment table times each graph at: one thread and ``threads`` (the run's
    ``runtime.threads``; None = all cores), each graph and batch size reported at the faster.

    Why one thread as well: a small graph splits each operator in two on 2 cores, and where the host lends
    the second core unevenly (shared virtual machines) every split waits for the slower half. Measured on
    a 2-core AMD EPYC VM (docs/benchmarks.md, "Thread count"): the main job's static int8 graph at batch 1
    took 0.72 ms (median) with 2 threads and 1.35 ms in the host's slow rounds, against 0.81 / 0.82 ms
    with 1 thread; the unpruned float32 graph is always faster with 2.
    """
    return thread_counts((1, threads))


def serving_split(threads: int | None) -> int | None:
    """The ``split`` of :func:`time_models` that deployment tables time beside :func:`serving_threads`:
    ``threads`` one-thread sessions taking a batch's parts at once (None for one thread or all cores).

    Why: on the same VM, in the rounds where the int8 graph with 2 intra-op threads fell to its one-thread
    speed at batch 16 (18.75 ms), two one-thread sessions on the batch's halves kept 10.08 ms; the float32
    graph ran the same either way (docs/benchmarks.md, "Thread count")."""
    return threads if threads is not None and threads > 1 else None


def _thread_label(t: int | None) -> str:
    return "all" if t is None else str(t)


def layout_labels(counts: Sequence[int | None], split: int | None, batch: int) -> list[str]:
    """The layouts :func:`time_models` times at ``batch``: each intra-op thread count (``"1"``, ``"2"``,
    ``"all"``) and, for ``batch`` > 1 with ``split``, ``"<split>x1"`` in place of ``"1"``."""
    labels = [_thread_label(t) for t in counts]
    if split and batch > 1:
        labels = [x for x in labels if x != "1"] + [f"{split}x1"]
    return labels


def split_feeds(tokenizer, texts, pairs, batch_size: int, split: int, names, max_length) -> list[list[dict]]:
    """Per batch of ``batch_size`` consecutive sentences, at most ``split`` consecutive parts of
    ``ceil(len / split)`` sentences, each tokenised and padded on its own (:func:`feed_batches`)."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        out.append(feed_batches(tokenizer, chunk, pairs[i : i + batch_size] if pairs is not None else None, -(-len(chunk) // split), names, max_length))
    return out


def time_models(
    models: Sequence[Candidate],
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    tokenizer=None,
    threads: int | None | Sequence[int | None] = None,
    split: int | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    rounds: int = 5,
    warmup: int = 1,
    max_length: int | None = None,
    session_factory: Callable | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Time ``models`` side by side on ``texts`` (see the module docstring for the protocol).

    Args:
        tokenizer: one tokenizer for every model; default: each model's own, saved beside its graph (a model
            whose vocabulary was pruned takes other ids for the same text).
        threads: ONNX Runtime intra-op threads per session (None = all cores), or several counts
            (:func:`thread_counts`): each model then has one session per count, every session takes its
            turn in every round, and each model and batch size is reported at the count with the lower median.
        split: also time each batch of more than one sentence cut into ``split`` consecutive parts, each padded
            to its own longest and run at once on its own one-thread session (layout ``"<split>x1"``: data
            parallelism, one session per core, as CPU servers run); the one-thread layout is then not
            timed at those batch sizes (it does the same work on one core). None: no split.
        session_factory: ``(path, threads) -> session`` (default :func:`prune_attattr.deploy.quantize.session`).

    Returns:
        One row per model, in order: ``{"label", "file", "precision", "metric", "batch_differ", "deployed",
        "mb", "ms": {"1": median ms per call, "16": ...}, "speedup": {"1": ref ms / ms, ...}, "threads":
        {"1": the layout of "ms", ...}, "ms_by_threads": {"1": {"1": ms, "2": ms}, "16": {"2": ms, "2x1": ms}}}``;
        keys are strings (JSON); a layout is an intra-op thread count (``"all"`` for None) or ``"<split>x1"``.
        ``mb`` is the file size in MiB (None when there is no file). The speed-up compares each model's
        fastest layout with the first model's fastest.

    Raises:
        ValueError: no models, no texts, ``rounds`` < 1, a thread count < 1 or ``split`` < 2.
    """
    from .onnx_eval import load_folder_tokenizer
    from .quantize import graph_precision, logits, session

    if not models or not texts or rounds < 1:
        raise ValueError("time_models needs at least one model, one text and one round")
    counts = thread_counts(threads)
    if split is not None and split < 2:
        raise ValueError(f"split needs at least 2 sessions (got {split})")
    factory = session_factory or session
    folders = [Path(m.path).parent for m in models]
    tokenizers = {f: tokenizer if tokenizer is not None else load_folder_tokenizer(f) for f in dict.fromkeys(folders)}
    sessions = {(m, _thread_label(t)): factory(models[m].path, t) for m in range(len(models)) for t in counts}
    parts = {m: [factory(models[m].path, 1) for _ in range(split)] for m in range(len(models))} if split else {}
    names = list(dict.fromkeys(i.name for s in sessions.values() for i in s.get_inputs()))
    pool = ThreadPoolExecutor(max_workers=split) if split else None

    def run(m: int, layout: str, x) -> None:
        if layout.endswith("x1"):  # the batch's parts on the one-thread sessions at once (ONNX Runtime frees the GIL)
            for f in [pool.submit(logits, s, part) for s, part in zip(parts[m], x)]:
                f.result()
        else:
            logits(sessions[(m, layout)], x)

    ms: list[dict[str, float]] = [{} for _ in models]
    chosen: list[dict[str, str]] = [{} for _ in models]
    by_layout: list[dict[str, dict[str, float]]] = [{} for _ in models]
    try:
        for b in batch_sizes:
            layouts = layout_labels(counts, split, b)
            feeds: dict[tuple, list] = {}
            for f, tok in tokenizers.items():
                whole = feed_batches(tok, texts, pairs, b, names, max_length)
                for layout in layouts:  # every intra-op layout shares the whole batches
                    feeds[(f, layout)] = split_feeds(tok, texts, pairs, b, split, names, max_length) if layout.endswith("x1") else whole
            turns = [(m, layout) for m in range(len(models)) for layout in layouts]
            for _ in range(warmup):
                for m, layout in turns:
                    for x in feeds[(folders[m], layout)]:
                        run(m, layout, x)
            per_round: dict[tuple, list[float]] = {k: [] for k in turns}
            for r in range(rounds):
                for j in _rotated(len(turns), r):
                    m, layout = turns[j]
                    batches = feeds[(folders[m], layout)]
                    run(m, layout, batches[0])  # untimed: the previous session's threads stop busy-waiting
                    start = clock()
                    for x in batches:
                        run(m, layout, x)
                    per_round[(m, layout)].append(1000 * (clock() - start) / len(batches))
            for m in range(len(models)):
                med = {layout: float(np.median(per_round[(m, layout)])) for layout in layouts}
                best = min(layouts, key=lambda k: med[k])  # ties: the first layout
                ms[m][str(b)], chosen[m][str(b)], by_layout[m][str(b)] = med[best], best, med
    finally:
        if pool is not None:
            pool.shutdown()
    rows = []
    for m, c in enumerate(models):
        path = Path(c.path)
        rows.append(
            {
                "label": c.label,
                "file": str(path),
                "precision": c.precision or graph_precision(path),
                "metric": c.metric,
                "batch_differ": c.batch_differ,
                "deployed": c.deployed,
                "mb": path.stat().st_size / 2**20 if path.is_file() else None,
                "ms": ms[m],
                "speedup": {k: ms[0][k] / v for k, v in ms[m].items()},
                "threads": chosen[m],
                "ms_by_threads": by_layout[m],
            }
        )
    return rows


def folder_candidates(which: str, folder: str | Path, info: dict | None = None, metric: str | None = None) -> list[Candidate]:
    """The graphs of one deployed ONNX folder, float32 first: labels ``"<which> float32"``,
    ``"<which> int8 dynamic"``, ``"<which> int8 static"``.

    ``info``: the folder's :func:`prune_attattr.deploy.quantize.deploy` dict (files, metrics, batch
    differences); without it the folder's ``model*.onnx`` files are found by name and their kind read
    from the graph. A folder's shipped graph is ``model.onnx``; ``deployed`` marks the pruned one's.
    """
    from .quantize import graph_precision

    folder = Path(folder)
    files: dict[str, Path] = {}
    if info is not None:
        files = {k: folder / v for k, v in info["files"].items() if v}
    else:
        for name in _FILES:
            if (folder / name).is_file():
                files.setdefault(graph_precision(folder / name), folder / name)
    out = []
    for precision in PRECISIONS:
        if precision in files:
            value = ((info or {}).get("metrics") or {}).get(precision, {}).get(metric) if metric else None
            differ = ((info or {}).get("batch_differ") or {}).get(precision)
            path = files[precision]
            deployed = which == "pruned" and path.name == "model.onnx"
            out.append(Candidate(f"{which} {LABELS[precision]}", path, metric=value, deployed=deployed, precision=precision, batch_differ=differ))
    return out


def candidates(run_dir: str | Path, deployment: dict | None = None, metric: str | None = None) -> list[Candidate]:
    """The graphs of a run folder (layout in the module docstring): unpruned, then pruned (:func:`folder_candidates`).

    ``deployment``: the report's ``export.deployment`` (files and metrics per model), optional.
    """
    run_dir = Path(run_dir)
    out = []
    for which, folder in (("unpruned", run_dir / "unpruned" / "onnx"), ("pruned", run_dir / "onnx")):
        info = (deployment or {}).get(which)
        if info is not None and not all((folder / v).is_file() for v in info["files"].values() if v):
            info = None  # files moved or re-deployed since the report: trust the folder
        out += folder_candidates(which, folder, info, metric)
    return out


def cpu_info() -> dict:
    """``{"model": the CPU's model name, "flags": the :data:`CPU_FLAGS` that /proc/cpuinfo lists}``
    (``platform.processor()`` and no flags where there is no /proc/cpuinfo): int8 kernels run much faster
    with VNNI or AMX, so int8 timings and speed-ups hold for CPUs with the same flags."""
    import platform

    name, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": name, "flags": flags}
    model = listed = None  # the first processor's lines
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and listed is None:
            listed = set(value.split())
    return {"model": model or name, "flags": [f for f in CPU_FLAGS if f in (listed or ())]}


def cpu_name(info: dict | None = None) -> str:
    """One line naming the CPU (:func:`cpu_info`), its core count and whether ``avx512_vnni`` and
    ``amx_int8`` are listed, e.g. ``"Intel(R) Xeon(R) Processor, 2 logical cores, avx512_vnni yes, amx_int8 yes"``."""
    import os

    info = info or cpu_info()
    flags = ", ".join(f"{f} {'yes' if f in info['flags'] else 'no'}" for f in ("avx512_vnni", "amx_int8"))
    return f"{info['model']}, {os.cpu_count()} logical cores, {flags}"


def time_run(
    models: Sequence[Candidate],
    examples,
    run_dir: str | Path,
    *,
    sentences: int,
    threads: int | None | Sequence[int | None],
    rounds: int,
    split: int | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    max_length: int | None = None,
) -> list[dict]:
    """:func:`time_models` on the first ``sentences`` of ``examples`` (:class:`prune_attattr.tasks.Examples`,
    pairs included), each row's ``file`` relative to ``run_dir`` where it lies inside it: the timing of
    a run's graphs, shared by the export stage (:func:`prune_attattr.deploy.deployment.deploy_run`) and
    :func:`bench_run`."""
    n = min(sentences, len(examples))
    rows = time_models(
        models,
        examples.texts[:n],
        examples.pairs[:n] if examples.pairs is not None else None,
        threads=threads,
        split=split,
        batch_sizes=batch_sizes,
        rounds=rounds,
        max_length=max_length,
    )
    for r in rows:
        try:
            r["file"] = str(Path(r["file"]).relative_to(run_dir))
        except ValueError:  # a graph outside the run folder keeps its path
            pass
    return rows


def bench_run(
    run_dir: str | Path,
    *,
    threads: int | None | Sequence[int | None] = None,
    split: int | None = None,
    sentences: int = 256,
    rounds: int = 5,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    evaluate: bool = False,
) -> dict:
    """Re-time a finished run's graphs on this machine (``prune-attattr bench exported/<run>``).

    Sentences: the first ``sentences`` of the run's dev split (its ``recipe.yaml``); threads: one count or
    several (:func:`time_models`), default :func:`serving_threads` of the recipe's ``runtime.threads``
    (else torch's thread count, as the export stage): one thread and that count, and batches split
    between that many one-thread sessions (:func:`serving_split`; ``split`` sets it when ``threads`` is
    given), each graph at its fastest; the evaluation runs at the largest count. Metrics: the run's (``report.json``), or with
    ``evaluate`` measured here on the whole dev split (:func:`prune_attattr.deploy.onnx_eval.evaluate_onnx`, one
    example per call): int8 results depend on the CPU's integer kernels (VNNI or not), so a deployment
    box's accuracy can differ from the run's. Reads files only; writes nothing.

    Returns:
        ``{"run", "metric", "metric_source", "cpu" (:func:`cpu_name`, printed in the table's caption),
        "cpu_info" (:func:`cpu_info`), "threads", "split", "sentences", "rounds", "batch_sizes", "rows"}``, rows as
        :func:`time_models` gives them, file paths relative to ``run_dir``; with ``evaluate`` each row's
        ``batch_differ`` is measured here (:func:`prune_attattr.deploy.onnx_eval.batch_differences`).

    Raises:
        RunError: ``run_dir`` is no run folder (no ``recipe.yaml``, no ``onnx/model.onnx``).
        DataError: the recipe's dev data cannot be read here.
    """
    from ..config import RecipeError, load_recipe
    from ..tasks import load_task_data

    run_dir = Path(run_dir)
    if not (run_dir / "onnx" / "model.onnx").is_file():
        raise RunError(f"{run_dir}: no onnx/model.onnx; give a finished run folder, e.g. exported/<run_name>")
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
    except RecipeError as exc:
        raise RunError(f"{run_dir}: cannot read the run's recipe.yaml ({exc})") from None
    report = {}
    if (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    metric = report.get("primary_metric")
    deployment = (report.get("export") or {}).get("deployment")
    models = candidates(run_dir, deployment, metric)
    _, dev, _, metrics = load_task_data(recipe)
    metric = metric or metrics[0]
    n = min(sentences, len(dev))
    if threads is None:
        import torch

        resolved = recipe.runtime.threads or torch.get_num_threads()
        threads, split = serving_threads(resolved), split or serving_split(resolved)
    counts = thread_counts(threads)
    most = max((t for t in counts if t is not None), default=None) if None not in counts else None
    source = "report.json"
    if evaluate:
        import torch

        from ..evaluation import compute_metrics
        from .onnx_eval import batch_differences, predict_onnx

        for c in models:
            alone = predict_onnx(c.path, dev.texts, dev.pairs, batch_size=1, threads=most)
            c.metric = compute_metrics(metrics, torch.from_numpy(alone.argmax(-1)), torch.tensor(dev.labels))[metric]
            c.batch_differ = batch_differences(c.path, dev, threads=most, alone=alone)
        source = f"measured here on {len(dev)} dev examples"
    rows = time_run(models, dev, run_dir, sentences=n, threads=counts, split=split, rounds=rounds, batch_sizes=batch_sizes)
    cpu = cpu_info()
    return {
        "run": str(run_dir),
        "metric": metric,
        "metric_source": source,
        "cpu": cpu_name(cpu),
        "cpu_info": cpu,
        "threads": list(counts),
        "split": split,
        "sentences": n,
        "rounds": rounds,
        "batch_sizes": list(batch_sizes),
        "rows": rows,
    }
