"""Stage "export": choose the pruned model to export, save it, check the reload and ONNX, time it.

:func:`choose_export` picks the curve step (``export.heads``, or the most pruned step within
``export.max_drop``) on every process; :func:`save_export` writes the checkpoint and ONNX on the main
process, checks both against PyTorch and measures the ONNX Runtime latency pruned vs unpruned
(:func:`measure_latency`, shared with the recovery stage's cost table). :func:`export_stage` runs both.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError
from ..prune.cost import unit_flops
from ..prune.curve import balance_for, choose_units, flops_fraction
from ..models import forward_logits, input_names, kept_neurons, num_heads_total
from ..prune.units import prune_units
from ..prune.heads import count_parameters, heads_to_prune
from ..prune.search import SearchError
from ..tasks import Encoded, make_dataloader
from .context import Prepared, cached_evaluation, mean_length
from .vocabulary import VocabularyExport, remap_batch, vocabulary_export

__all__ = [
    "ExportChoice",
    "example_batches",
    "exact_heads_target",
    "export_target",
    "within_budget",
    "choose_export",
    "latency_feeds",
    "measure_latency",
    "save_export",
    "shipped_entry",
    "export_stage",
]


@dataclass
class ExportChoice:
    """The pruned model chosen for export, with its metrics (the same on every process)."""

    method: str
    rule: str
    model: torch.nn.Module
    pruned_heads: dict[int, list[int]]
    metrics: dict
    pruned_neurons: dict[int, list[int]] = field(default_factory=dict)
    flops_fraction: float | None = None
    loyalty: dict | None = None  # {"label", "probability"} against the unpruned model (float32 PyTorch, dev split)
    removed_sublayers: dict[int, list[str]] = field(default_factory=dict)  # pruning.sublayers: {layer: ["attention", "ffn"]}

    def info(self, total: int) -> dict:
        return {
            "method": self.method,
            "rule": self.rule,
            "heads_kept": total - sum(len(v) for v in self.pruned_heads.values()),
            "pruned_heads": {str(k): v for k, v in self.pruned_heads.items()},
            "neurons_kept": sum(len(n) for n in kept_neurons(self.model)),
            "pruned_neurons": {str(k): v for k, v in self.pruned_neurons.items()},
            "removed_sublayers": {str(k): v for k, v in self.removed_sublayers.items()},
            "flops_fraction": self.flops_fraction,
            "metrics": self.metrics,
            "loyalty": self.loyalty,
            "parameters": count_parameters(self.model),
        }


def example_batches(loader_data: Encoded, pad_id: int, batch_size: int, count: int) -> list[dict]:
    """Up to ``count`` padded batches of ``batch_size`` examples spread over the range of lengths (the
    dataloader sorts by length): inputs of the reload and ONNX checks."""
    dl = make_dataloader(loader_data, batch_size=batch_size, pad_id=pad_id)
    # sorted by length: take batches spread over the range of lengths
    batches = list(dl)
    pick = np.linspace(0, len(batches) - 1, num=min(count, len(batches))).round().astype(int)
    return [batches[i] for i in sorted(set(pick.tolist()))]


def exact_heads_target(prep: Prepared, scores: torch.Tensor, curve: list) -> tuple[int | None, dict[int, list[int]]]:
    """``export.heads``: the index of the curve step keeping that many heads and its pruned heads, or, when
    no step does, ``(None, the lowest-scored heads)``.

    Raises:
        RunError: ``export.heads`` above the model's head count (check_run refuses it first; kept for callers
            that skip it).
    """
    heads, total = prep.ctx.recipe.export.heads, num_heads_total(prep.model)
    if heads > total:
        raise RunError(f"export.heads {heads} exceeds the model's {total} heads")
    index = next((i for i, s in enumerate(curve) if s.heads_kept == heads), None)
    pruned = curve[index].pruned_heads if index is not None else heads_to_prune(scores, total - heads)
    return index, {int(k): v for k, v in pruned.items()}


def export_target(prep: Prepared, head_scores: torch.Tensor, neuron_scores: torch.Tensor | None, curve: list):
    """The model ``export.heads`` or ``export.flops`` asks for: ``(index, pruned_heads, pruned_neurons,
    removed_sublayers, rule)`` with ``index`` the curve step that is that model, or None when no step is (the
    units are then chosen like the curve's: the lowest-scored heads, or
    :func:`prune_attattr.prune.curve.choose_units` at that budget, whole sublayers too with ``pruning.sublayers``).

    Raises:
        RunError: ``export.heads`` above the model's head count; an ``export.flops`` budget the curve's
            units cannot reach.
    """
    e, r = prep.ctx.recipe.export, prep.ctx.recipe
    if e.heads is not None:
        index, pruned = exact_heads_target(prep, head_scores, curve)
        return index, pruned, {}, {}, f"exactly {e.heads} heads kept"
    budget = float(e.flops)
    rule = f"FLOPs per token at most {100 * budget:g}% of the unpruned model's"
    if r.pruning.sublayers:
        rule = f"cost (FLOPs per token plus {r.pruning.sublayer_cost:g} of the unpruned FLOPs per present sublayer) at most {100 * budget:g}% of the unpruned model's"
    index = next((i for i, s in enumerate(curve) if s.budget is not None and abs(s.budget - budget) < 1e-9), None)
    if index is not None:
        s = curve[index]
        return index, _ints(s.pruned_heads), _ints(s.pruned_neurons), _ints(s.removed_sublayers), rule
    units = r.pruning.units if neuron_scores is not None else "heads"
    sublayers = prep.sublayer_scores.get(e.method) if units == "both" else None
    try:
        costs = unit_flops(prep.model, mean_length(prep.dev_enc))
        balance = balance_for(e.method, r.pruning.balance, r.importance.attattr.aggregate)
        choice = choose_units(prep.model, head_scores, neuron_scores, costs, budget, units, balance, sublayers, r.pruning.sublayer_cost)
    except SearchError as exc:
        raise RunError(f"export.flops {budget:g}: {exc}") from None
    if sublayers is not None:
        return None, choice.units.pruned_heads, choice.units.pruned_neurons, choice.removed, rule
    return None, choice.pruned_heads, choice.pruned_neurons, {}, rule


def _ints(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def prune_copy(prep: Prepared, pruned_heads: dict, pruned_neurons: dict | None = None, sublayers: dict | None = None) -> torch.nn.Module:
    """A structurally pruned copy of the prepared model (heads and neurons, original ids; whole sublayers
    ``{layer: ["attention", "ffn"]}`` removed)."""
    return prune_units(copy.deepcopy(prep.model), heads=pruned_heads, neurons=pruned_neurons, sublayers=sublayers)


def within_budget(curve: list, metric: str, floor: float) -> list[int]:
    """Indices of the curve steps whose ``metric`` is at least ``floor`` (1e-12 tolerance), least pruned first."""
    return [i for i, s in enumerate(curve) if s.metrics[metric] >= floor - 1e-12]


def choose_export(prep: Prepared, scores: dict, curves: dict, baseline: dict, neuron_scores: dict | None = None) -> ExportChoice:
    """Pick the model to export (``export.heads``, ``export.flops``, or the most pruned curve step within
    ``export.max_drop``: along a curve the cost falls, so the last step within budget is the cheapest),
    prune a copy of the model, and evaluate it when it is not a curve step. Runs on every process
    (evaluation gathers across processes)."""
    ctx = prep.ctx
    e = ctx.recipe.export
    metric = ctx.metrics[0]
    curve = curves[e.method]
    if e.heads is not None or e.flops is not None:
        index, pruned, neurons, sublayers, rule = export_target(prep, scores[e.method], (neuron_scores or {}).get(e.method), curve)
        step = curve[index] if index is not None else None
    else:
        within = within_budget(curve, metric, baseline[metric] - e.max_drop)
        step = curve[max(within)] if within else curve[0]
        pruned, neurons, sublayers = _ints(step.pruned_heads), _ints(step.pruned_neurons), _ints(step.removed_sublayers)
        rule = f"most pruned step with {metric} >= unpruned - {100 * e.max_drop:g} points"
    pruned_model = prune_copy(prep, pruned, neurons, sublayers)
    if step is not None and step.loyalty is not None:
        metrics, loyal = step.metrics, step.loyalty
    else:  # off the curve, or a step measured without loyalty: evaluated (stage-cached)
        metrics, loyal, _ = cached_evaluation(prep, pruned_model)
    fraction = flops_fraction(pruned_model, unit_flops(prep.model, mean_length(prep.dev_enc)))
    return ExportChoice(e.method, rule, pruned_model, pruned, metrics, neurons, fraction, loyal, sublayers)


def latency_feeds(prep: Prepared) -> dict:
    """The ONNX latency inputs: the first ``export.latency_batch`` dev examples, padded, as the model's inputs."""
    n, dev_enc = prep.ctx.recipe.export.latency_batch, prep.dev_enc
    batch = next(iter(make_dataloader(dev_enc.subset(range(min(len(dev_enc), n))), batch_size=n, pad_id=prep.ctx.pad_id)))
    return {k: batch[k].numpy() for k in input_names(prep.model) if k in batch}


def measure_latency(prep: Prepared, model, feeds: dict, example: dict | None = None, path: Path | None = None) -> dict:
    """ONNX Runtime latency (:func:`prune_attattr.deploy.onnx_export.onnx_latency`, ms) of ``model`` on ``feeds``: of the
    graph at ``path``, or of ``model`` exported (with ``example``) to a temporary file. The one latency
    measurement of the export and recovery stages, so their figures compare; the unpruned model's is
    measured once per run (``prep.unpruned_latency``)."""
    from ..deploy.onnx_export import export_onnx, onnx_latency

    if model is prep.model and path is None and prep.unpruned_latency is not None:
        return prep.unpruned_latency
    r = prep.ctx.recipe
    threads = r.runtime.threads or torch.get_num_threads()
    if path is not None:
        return onnx_latency(path, feeds, r.export.latency_repeats, threads)
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(copy.deepcopy(model).cpu(), Path(d) / "m.onnx", example, opset=r.export.onnx_opset)
        latency = onnx_latency(path, feeds, r.export.latency_repeats, threads)
    if model is prep.model:
        prep.unpruned_latency = latency
    return latency


def save_export(prep: Prepared, choice: ExportChoice, out: Path, baseline: dict | None = None, vocab: VocabularyExport | None = None) -> dict:
    """Save the chosen model under ``out`` (main process): checkpoint, reload check, ONNX with its
    PyTorch check, latency pruned vs unpruned. Returns the report's ``export`` entry, with ``labels`` (the
    class names written as both folders' ``id2label``, :func:`prune_attattr.tasks.label_names`) and
    ``shipped`` (:func:`shipped_entry`; ``baseline``: the unpruned model's dev metrics).

    ``vocab`` (``export.vocabulary: train``, :func:`prune_attattr.stages.vocabulary.vocabulary_export`):
    its model and rewritten tokenizer are what both folders ship; ``metrics`` and ``loyalty`` become
    theirs (the full-vocabulary figures stay as ``metrics_full_vocabulary``, ``loyalty_full_vocabulary``)
    and ``vocabulary`` says what was kept.

    Raises:
        RunError: ONNX logits differ from PyTorch by more than 1e-4.
    """
    from ..prune.checkpoint import load_pruned, save_pruned, set_label_names
    from ..deploy.onnx_export import check_onnx, export_onnx_folder
    from ..tasks import label_names

    ctx = prep.ctx
    e = ctx.recipe.export
    info = choice.info(num_heads_total(prep.model))
    names = label_names(ctx.recipe.data.task, ctx.labels)
    info["labels"] = names
    shipped_model, tokenizer = (vocab.model, vocab.tokenizer) if vocab is not None else (choice.model, ctx.tokenizer)
    checks = example_batches(prep.dev_enc, ctx.pad_id, 8, 4)
    if vocab is not None:
        info["metrics_full_vocabulary"], info["loyalty_full_vocabulary"] = info["metrics"], info.get("loyalty")
        info["metrics"], info["loyalty"], info["vocabulary"] = vocab.metrics, vocab.loyalty, vocab.info
        info["parameters"] = count_parameters(shipped_model)
        checks = [remap_batch(b, vocab.remap) for b in checks]  # new ids: valid inputs of both models
    model_dir = save_pruned(shipped_model, out / "model", tokenizer, label_names=names)
    info["checkpoint_mb"] = (model_dir / "model.safetensors").stat().st_size / 2**20
    reloaded = load_pruned(model_dir)
    cpu_model = copy.deepcopy(shipped_model).cpu()
    set_label_names(cpu_model.config, names)  # onnx/config.json names the classes too
    with torch.no_grad():
        info["reload_max_abs_diff"] = max(
            float((forward_logits(reloaded, b) - forward_logits(cpu_model, b)).abs().max()) for b in checks
        )
    if e.onnx:
        onnx_path = export_onnx_folder(cpu_model, out / "onnx", checks[-1], tokenizer, opset=e.onnx_opset)
        diff = check_onnx(cpu_model, onnx_path, checks)
        if diff > 1e-4:
            raise RunError(f"ONNX logits differ from PyTorch by {diff:.2e} (> 1e-4); the export was not written")
        # latency: pruned vs unpruned on the same inputs
        feeds = latency_feeds(prep)
        lat_u = measure_latency(prep, prep.model, feeds, checks[-1])
        lat_p = measure_latency(prep, cpu_model, _remap_feeds(feeds, vocab), path=onnx_path)
        info["onnx"] = {
            "file": "onnx/model.onnx",
            "mb": onnx_path.stat().st_size / 2**20,
            "max_abs_diff": diff,
            "latency_batch": int(feeds["input_ids"].shape[0]),
            "latency_seq": int(feeds["input_ids"].shape[1]),
            "latency_pruned": lat_p,
            "latency_unpruned": lat_u,
            "speedup": lat_u["median_ms"] / lat_p["median_ms"],
        }
        info["deployment"] = _deploy(prep, onnx_path, checks, out)
        if "cpu" not in info["deployment"]:  # the machine the timings ran on, with its int8-relevant flags
            from ..deploy.bench import cpu_info

            info["deployment"]["cpu"] = cpu_info()
    info["shipped"] = shipped_entry(prep, info, baseline)
    _warn_shipped(prep, info["shipped"])
    return info


def _remap_feeds(feeds: dict, vocab: VocabularyExport | None) -> dict:
    """Latency feeds (numpy) in the pruned vocabulary's ids when ``vocab`` is given."""
    if vocab is None:
        return feeds
    return {**feeds, "input_ids": vocab.remap.numpy()[feeds["input_ids"]]}


def shipped_entry(prep: Prepared, info: dict, baseline: dict | None) -> dict:
    """The report's ``export.shipped``: per shipped folder, its dev metric against the unpruned model's
    and its :func:`prune_attattr.checks.chance_level` test (the same test as the unpruned model's).

    ``model``: the PyTorch checkpoint (``info["metrics"]``, the PyTorch evaluation) against ``baseline``;
    ``onnx`` (with ONNX export): the deployed graph (``onnx/model.onnx``, int8 or float32) measured by ONNX
    Runtime on the dev split, against the unpruned float32 graph measured the same way.

    Returns:
        ``{folder: {"metric", "value", "baseline", "baseline_source", "chance", ["precision"]}}`` (fractions).
    """
    from ..checks import chance_level
    from ..tasks import label_names

    ctx = prep.ctx
    metric = ctx.metrics[0]
    names = label_names(ctx.recipe.data.task, ctx.labels)

    def entry(value, base, source):
        return {
            "metric": metric, "value": value, "baseline": base, "baseline_source": source,
            "chance": chance_level(metric, value, prep.dev_enc.labels, names),
        }

    out = {"model": entry(info["metrics"][metric], (baseline or {}).get(metric), "unpruned PyTorch model, dev split")}
    d = info.get("deployment")
    if d:
        p = d["pruned"]
        value = (p.get("metrics") or {}).get(p["precision"], {}).get(metric)
        if value is not None:
            out["onnx"] = {**entry(value, d["baseline"]["value"], d["baseline"]["source"]), "precision": p["precision"]}
    return out


def _warn_shipped(prep: Prepared, shipped: dict) -> None:
    """Print :func:`prune_attattr.checks.shipped_problems` in bold red as the export ends (again at the end of the run)."""
    from rich.markup import escape

    from ..checks import shipped_problems

    for line in shipped_problems(prep.ctx.recipe.export.model_dump(), shipped):
        prep.ctx.print(f"[bold red]WARNING: {escape(line)}[/]")


def _deploy(prep: Prepared, onnx_path: Path, checks: list[dict], out: Path) -> dict:
    """Issue 16: export the unpruned model the same way (``out/unpruned/onnx``), deploy both graphs
    (``export.quantize``; the pruned one judged by ``export.max_drop`` on its own dev metric, measured by
    ONNX Runtime on the whole dev split) and time them side by side (:func:`prune_attattr.deploy.deployment.deploy_run`)."""
    from ..deploy.deployment import deploy_run
    from ..deploy.onnx_export import export_onnx_folder
    from ..prune.checkpoint import set_label_names
    from ..tasks import label_names

    ctx, r = prep.ctx, prep.ctx.recipe
    e = r.export
    reference = copy.deepcopy(prep.model).cpu()
    set_label_names(reference.config, label_names(r.data.task, ctx.labels))
    unpruned = export_onnx_folder(reference, out / "unpruned" / "onnx", checks[-1], ctx.tokenizer, opset=e.onnx_opset)
    judged = e.heads is None and e.flops is None  # export.max_drop chose the model: it judges the shipped file too
    graphs = {"none": "float32", "int8": "float32 and dynamic int8", "int8_static": "float32 and static int8", "all": "float32, dynamic and static int8"}
    ctx.print(f"   deploying: {graphs[e.quantize]} graphs, dev metric and batch 1 vs 16 by ONNX Runtime, timing")
    deployment = deploy_run(
        onnx_path, unpruned, check_batches=checks, examples=prep.dev_examples, metrics=ctx.metrics, quantize=e.quantize,
        reduce_range=e.reduce_range, per_channel=e.per_channel, max_drop=e.max_drop if judged else None, max_length=r.model.max_length,
        calibration=_calibration_examples(prep), calibration_examples=e.calibration_examples, static_format=e.static_format,
        threads=r.runtime.threads or torch.get_num_threads(),
    )
    ctx.print(f"   shipped onnx/model.onnx: {deployment['pruned']['choice']['reason']}")
    return deployment


def _calibration_examples(prep: Prepared):
    """Training sentences for static int8 calibration (``export.calibration_examples``, shuffled with the
    run's seed; never the dev split), or None when ``export.quantize`` builds no static graph.

    Raises:
        RunError: static int8 asked for without a training split.
    """
    import random

    from ..tasks import load_task_data

    r = prep.ctx.recipe
    if r.export.quantize not in ("int8_static", "all"):
        return None
    train = load_task_data(r)[0]
    if train is None or len(train) == 0:
        raise RunError(f"export.quantize '{r.export.quantize}' calibrates on training sentences: give data.train_file, or use quantize int8")
    order = random.Random(r.seed).sample(range(len(train)), min(r.export.calibration_examples, len(train)))
    return train.subset(order)


def export_stage(
    prep: Prepared, scores: dict, curves: dict, baseline: dict, tmp: Path | None, choice: ExportChoice | None = None, neuron_scores: dict | None = None
) -> dict | None:
    """:func:`choose_export` (unless ``choice`` is given: the recovered model of
    :func:`prune_attattr.stages.recovery.recovery_stage`) on every process, then :func:`save_export` on
    the main process (``tmp``)."""
    ctx = prep.ctx
    with ctx.stage("export"):
        choice = choice if choice is not None else choose_export(prep, scores, curves, baseline, neuron_scores)
        vocab = vocabulary_export(prep, choice.model) if ctx.recipe.export.vocabulary == "train" else None  # every process: it evaluates
        refused = _vocabulary_refusal(prep, vocab, baseline)
        if refused is not None:
            ctx.print(f"   vocabulary: {refused}")
            vocab = None
        if ctx.accelerator.is_main_process:
            info = save_export(prep, choice, tmp, baseline, vocab)
            if refused is not None:
                info["vocabulary_refused"] = refused
            return info
        return choice.info(num_heads_total(prep.model))


def _vocabulary_refusal(prep: Prepared, vocab: VocabularyExport | None, baseline: dict) -> str | None:
    """Why the pruned vocabulary does not ship, or None: when ``export.max_drop`` chose the model (no
    ``export.flops``/``export.heads``), the budget judges what ships, so a vocabulary that takes the metric
    below the floor is dropped and the full vocabulary ships (the report says so)."""
    e = prep.ctx.recipe.export
    if vocab is None or e.heads is not None or e.flops is not None or e.max_drop is None:
        return None
    metric = prep.ctx.metrics[0]
    floor = baseline[metric] - e.max_drop
    if vocab.metrics[metric] >= floor - 1e-12:
        return None
    return (
        f"the training split's vocabulary ({vocab.info['kept']:,} of {vocab.info['total']:,} tokens) takes {metric} to "
        f"{100 * vocab.metrics[metric]:.2f}%, below the export.max_drop floor {100 * floor:.2f}% "
        f"({vocab.info['dev_texts_with_dropped_tokens']} of {vocab.info['dev_texts']} dev texts hold a dropped token); "
        "the full vocabulary ships"
    )
