"""The main job: fine-tune, score heads, prune incrementally, report, export (one Accelerate pipeline).

``run(recipe)`` is what ``prune-attattr recipe.yaml`` calls. It composes one function per stage:

    load (data, tokenizer, model; :func:`check_run`; fine-tune)  -> :func:`prepare`
    evaluate the unpruned model                                   -> :func:`evaluate_unpruned`
    head importance, one method at a time                         -> :func:`importance_stage`
    pruning curves                                                -> :func:`curves_stage`
    recovery of export candidates, budget search (recipe's
      ``recovery`` section; every process)                        -> :func:`recovery_stage`
    export: choose the step and prune (every process)             -> :func:`choose_export`
            save, reload check, ONNX, latency (main process)      -> :func:`save_export`
    analyses                                                      -> :func:`analyses_stage`
    report and atomic write                                       -> :func:`build_report`, :func:`write_outputs`

Outputs go to a temporary folder next to ``<output_dir>/<run_name>`` and are renamed into place only
when every stage succeeded, so a failure, Ctrl-C or SIGTERM leaves no half-written export.

Each method's importance scores and each evaluated pruning step are cached on disk (keyed on the
model's bytes, the tokenised examples, the settings and the seed; see :mod:`prune_attattr.cache`),
so a re-run after an interruption resumes where it stopped; the report lists the reused stages.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from . import importance as imp
from .cache import StageCache, cache_root, digest, encoded_digest, model_fingerprint
from .checks import chance_level, check_model_inputs, load_tokenizer, refuse_export_at_chance  # issue 17
from .config import Recipe
from .errors import OutputExists, RunError
from .evaluation import evaluate_model
from .models import align_labels, check_labels, forward_logits, input_names, load_classifier, num_heads_total, resolve_model_path
from .progress import console
from .report import print_chance_warning  # issue 17
from .pruning import count_parameters, heads_to_prune, prune_heads, pruned_heads_of, pruning_curve
from .tasks import Encoded, Examples, encode, load_task_data, make_dataloader

__all__ = [
    "RunError",
    "OutputExists",
    "load_task_data",
    "RunContext",
    "Prepared",
    "ExportChoice",
    "prepare",
    "check_run",
    "evaluate_unpruned",
    "importance_stage",
    "curves_stage",
    "RecoveryState",
    "recovery_train_set",
    "iterative_curve",
    "model_cost",
    "recovery_stage",
    "choose_export",
    "save_export",
    "analyses_stage",
    "build_report",
    "write_outputs",
    "run",
]

STAGE_CACHE_VERSION = 1  # bump when a change in the code changes importance scores or metrics


@dataclass
class RunContext:
    """What the stages share: the accelerator, tokenizer, labels, timings, the stage cache and what it reused."""

    recipe: Recipe
    accelerator: object
    tokenizer: object
    pad_id: int
    metrics: list[str]
    labels: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    quiet: bool = False
    cache: StageCache | None = None
    reused: list[str] = field(default_factory=list)

    def print(self, *args, **kwargs):
        if self.accelerator.is_main_process and not self.quiet:
            console().print(*args, **kwargs)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.print(f"[bold cyan]== {name}[/]")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.print(f"   {name}: {self.timings[name]:.1f} s")

    def loader(self, data: Encoded, batch_size: int):
        return self.accelerator.prepare(make_dataloader(data, batch_size=batch_size, pad_id=self.pad_id))

    def agree(self, value):
        """The main process's ``value``, on every process (so all take the same branch)."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def cached(self, key: str):
        """The stage cache's value for ``key`` as the main process reads it (None: compute)."""
        value = self.cache.get(key) if self.cache is not None and self.accelerator.is_main_process else None
        return self.agree(value)

    def store(self, key: str, value) -> None:
        if self.cache is not None and self.accelerator.is_main_process:
            self.cache.put(key, value)


def _split_train(recipe: Recipe, train: Examples | None, dev: Examples):
    """Importance examples and fine-tuning examples, disjoint when both come from the train split."""
    rng = random.Random(recipe.seed)
    n_imp = recipe.importance.examples
    if recipe.importance.source == "train_heldout":
        if train is None:
            raise RunError("importance.source 'train_heldout' needs a training split; use importance.source dev")
        order = list(range(len(train)))
        rng.shuffle(order)
        if n_imp >= len(order):
            raise RunError(f"importance.examples {n_imp} leaves no training data (train split has {len(order)})")
        heldout, pool = order[:n_imp], order[n_imp:]
        imp_examples = train.subset(heldout)
    else:
        pool = list(range(len(train))) if train is not None else []
        rng.shuffle(pool)
        idx = list(range(len(dev)))
        random.Random(recipe.seed + 1).shuffle(idx)
        imp_examples = dev.subset(sorted(idx[:n_imp]))
    ft = None
    if recipe.finetune.enabled:
        if train is None:
            raise RunError("finetune.enabled needs a training split")
        n = recipe.finetune.train_examples or len(pool)
        ft = train.subset(pool[:n])
    return imp_examples, ft


def check_run(recipe: Recipe, model: torch.nn.Module, *, has_train: bool, labels: list[str]) -> None:
    """Every check that needs the loaded model (or the data), made before any long stage.

    Raises:
        RunError: ``export.heads`` above the model's head count; ``pruning.step_fraction`` that removes
            zero heads per step; an analysis whose input is missing (triggers without a training
            split, universality sets without a split or with labels the model does not have).
    """
    r = recipe
    total = num_heads_total(model)
    if r.export.enabled and r.export.heads is not None and r.export.heads > total:
        raise RunError(f"export.heads {r.export.heads} exceeds the model's {total} heads; use at most {total}")
    if r.pruning.enabled and int(round(r.pruning.step_fraction * total)) == 0:
        raise RunError(
            f"pruning.step_fraction {r.pruning.step_fraction:g} removes 0 of the model's {total} heads per step "
            f"(rounds to zero); use at least {1 / total:.4g} (one head per step)"
        )
    a = r.analyses
    if a.triggers.enabled and not has_train:
        raise RunError("analyses.triggers extracts patterns from training examples; give data.train_file or disable it")
    if a.universality.enabled:
        from .analyses import check_universality_sets

        check_universality_sets(r, labels)


@dataclass
class Prepared:
    """A fine-tuned model with its data, ready for importance, pruning or analyses.

    ``model_key``: digest of the model's bytes and labels (and seed when the classifier head was
    initialised at random), the root of every stage-cache key."""

    ctx: RunContext
    model: torch.nn.Module
    model_path: Path
    dev_enc: Encoded
    imp_enc: Encoded
    dev_loader: object
    imp_loader: object
    finetune_info: dict | None
    model_key: str = ""
    unpruned_latency: dict | None = None  # ONNX Runtime latency of ``model`` on the latency feeds, measured once


def prepare(recipe: Recipe, accelerator=None, *, quiet: bool = False, use_cache: bool = True) -> Prepared:
    """Load data, tokenizer and model, run :func:`check_run`, fine-tune (or reuse the cached fine-tuned
    model), build the dataloaders.

    Args:
        use_cache: False: ignore cached fine-tuned models and stage results (new results are still stored).

    Raises:
        RunError, DataError, prune_attattr.models.ModelError: bad input.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    r = recipe
    if r.runtime.threads:
        torch.set_num_threads(r.runtime.threads)
    if accelerator is None:
        accelerator = Accelerator(cpu=r.runtime.cpu, mixed_precision=r.runtime.mixed_precision)
    set_seed(r.seed)
    model_path = resolve_model_path(r.model.path, r.model.revision)
    train, dev, labels, metric_names = load_task_data(r)
    tokenizer = load_tokenizer(model_path)  # issue 17: a folder without tokenizer files is named, not the data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    root = cache_root(r.finetune.cache_dir)
    ctx = RunContext(r, accelerator, tokenizer, pad_id, metric_names, labels, quiet=quiet, cache=StageCache(root, enabled=use_cache))
    imp_examples, ft_examples = _split_train(r, train, dev)
    id2label = dict(enumerate(labels))
    # the model as the run will see it (fine-tuning keeps its architecture): checks before any long stage;
    # a model used as it is must have a trained head whose labels are the task's, in the task's order
    if ft_examples is not None:
        model = load_classifier(model_path, id2label=id2label)
    else:
        model = load_classifier(model_path, require_trained_head=True)
    check_run(r, model, has_train=train is not None, labels=labels)
    check_model_inputs(r, model, tokenizer, model_path)  # issue 17: vocabulary vs embeddings, model.max_length vs positions
    with ctx.stage("tokenize"):
        dev_enc = encode(tokenizer, dev, r.model.max_length)
        imp_enc = encode(tokenizer, imp_examples, r.model.max_length)
        ft_enc = encode(tokenizer, ft_examples, r.model.max_length) if ft_examples is not None else None
    label_order = None
    if ft_enc is None:  # a model used as it is: its labels must be the task's, in the task's order
        label_order = check_labels(model, labels, r.data.label_map)  # model class ids in the task's order
        if label_order != list(range(len(labels))):
            align_labels(model, label_order)
            ctx.print(f"   the model's classes {label_order} reordered to the task's labels {labels} (classifier rows permuted)")
    finetune_info = None
    model_dir = model_path
    if ft_enc is not None:
        from .finetune import finetune

        del model
        with ctx.stage("fine-tune"):
            model_dir, finetune_info = finetune(
                model_path, tokenizer, ft_enc, id2label=id2label, settings=r.finetune, seed=r.seed,
                accelerator=accelerator, use_cache=use_cache,
            )
        if finetune_info["cached"]:
            ctx.reused.append("fine-tune")
        ctx.print(
            f"   fine-tuned model {'reused from cache' if finetune_info['cached'] else 'trained'}: {model_dir}"
            + ("" if finetune_info["cached"] else f" ({len(ft_enc)} examples)")
        )
        model = load_classifier(model_dir)
    model = model.to(accelerator.device)
    fingerprint = ctx.agree(model_fingerprint(model_dir) if accelerator.is_main_process else None)
    # a classifier head initialised at random (no fine-tuning, base model without one) depends on the seed;
    # the device type and precision change the figures in their last digits (the process count does not)
    model_key = digest(
        "model", fingerprint, labels, label_order, None if ft_enc is not None else r.seed, accelerator.device.type,
        str(accelerator.mixed_precision),
    )
    dev_loader = ctx.loader(dev_enc, r.pruning.eval_batch_size)
    imp_loader = ctx.loader(imp_enc, r.importance.batch_size)
    return Prepared(ctx, model, model_path, dev_enc, imp_enc, dev_loader, imp_loader, finetune_info, model_key)


def _importance(method: str, model, loader, ctx: RunContext) -> torch.Tensor:
    r = ctx.recipe
    bound = {"max_tokens_per_forward": r.importance.max_tokens_per_forward}
    if method == "attattr":
        a = r.importance.attattr
        return imp.attattr_importance(
            model, loader, ctx.accelerator, steps=a.steps, target=a.target, mode=a.mode, quadrature=a.quadrature, chunk_size=a.chunk_size, **bound
        )
    if method == "taylor":
        return imp.taylor_importance(model, loader, ctx.accelerator, **bound)
    if method == "accuracy_difference":
        return imp.accuracy_difference_importance(model, loader, ctx.accelerator, metrics=ctx.metrics, **bound)
    if method == "attention":
        return imp.attention_importance(model, loader, ctx.accelerator, **bound)
    if method == "random":
        return imp.random_importance(model, seed=r.seed)
    raise RunError(f"unknown method {method}")


def _pruned_key(model) -> list:
    return sorted((int(k), sorted(v)) for k, v in pruned_heads_of(model).items() if v)


def _importance_key(prep: Prepared, method: str, model) -> str:
    r = prep.ctx.recipe
    # every importance setting but the method list (adding a method keeps the others' entries); the
    # examples enter through their tokens
    settings = r.importance.model_dump(exclude={"methods"} if method == "attattr" else {"methods", "attattr"})
    settings.update(metrics=prep.ctx.metrics, seed=r.seed)
    return digest("importance", STAGE_CACHE_VERSION, prep.model_key, encoded_digest(prep.imp_enc), method, settings, _pruned_key(model))


def _eval_key(prep: Prepared, model) -> str:
    r = prep.ctx.recipe
    settings = {"batch_size": r.pruning.eval_batch_size, "metrics": prep.ctx.metrics}
    return digest("evaluate", STAGE_CACHE_VERSION, prep.model_key, encoded_digest(prep.dev_enc), settings, _pruned_key(model))


def cached_importance(prep: Prepared, method: str, model=None) -> tuple[torch.Tensor, bool]:
    """``(scores [layers, heads], reused)`` of ``method`` on ``model`` (default: the prepared model),
    from the stage cache when the same model, examples and settings were scored before."""
    model = prep.model if model is None else model
    ctx = prep.ctx
    key = _importance_key(prep, method, model)
    hit = ctx.cached(key)
    if hit is not None:
        return torch.tensor(hit, dtype=torch.float32), True
    scores = _importance(method, model, prep.imp_loader, ctx)
    ctx.store(key, scores.tolist())
    return scores, False


def cached_evaluate(prep: Prepared, model, *, description: str | None = None) -> tuple[dict, bool]:
    """``(metrics, reused)`` of ``model`` on the dev loader, from the stage cache when possible."""
    ctx = prep.ctx
    key = _eval_key(prep, model)
    hit = ctx.cached(key)
    if hit is not None:
        return hit, True
    metrics = evaluate_model(model, prep.dev_loader, ctx.accelerator, ctx.metrics, description=description)
    ctx.store(key, metrics)
    return metrics, False


def evaluate_unpruned(prep: Prepared) -> dict:
    """Metrics of the unpruned model on the dev split (cached)."""
    ctx = prep.ctx
    with ctx.stage("evaluate unpruned"):
        baseline, reused = cached_evaluate(prep, prep.model, description="dev")
        if reused:
            ctx.reused.append("evaluate unpruned")
    ctx.print("   unpruned: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in baseline.items() if k != "loss") + (" (reused)" if reused else ""))
    return baseline


def importance_stage(prep: Prepared) -> dict[str, torch.Tensor]:
    """Head importance ``[layers, heads]`` per method of ``importance.methods`` (each cached)."""
    ctx = prep.ctx
    scores: dict[str, torch.Tensor] = {}
    for method in ctx.recipe.importance.methods:
        name = f"importance: {method}"
        with ctx.stage(name):
            scores[method], reused = cached_importance(prep, method)
        if reused:
            ctx.reused.append(name)
            ctx.print("   reused from cache")
    return scores


def curves_stage(prep: Prepared, scores: dict[str, torch.Tensor], recovery: RecoveryState | None = None) -> dict[str, list]:
    """One pruning curve per method (:func:`prune_attattr.pruning.pruning_curve`); every evaluated step
    (and every re-scoring with ``pruning.rescore``) is cached, so an interrupted curve resumes.
    ``pruning.schedule: iterative``: ``export.method``'s curve is :func:`iterative_curve` (``recovery``)."""
    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    curves = {}
    for method in r.importance.methods if r.pruning.enabled else []:
        name = f"pruning curve: {method}"
        if r.pruning.schedule == "iterative" and method == r.export.method and recovery is not None:  # issue 10
            with ctx.stage(name + " (iterative, with recovery)"):
                curves[method] = iterative_curve(prep, scores[method], method, recovery)
            continue
        counts = {"steps": 0, "reused": 0}

        def evaluate(m, _counts=counts):
            metrics, reused = cached_evaluate(prep, m)
            _counts["steps"] += 1
            _counts["reused"] += reused
            return metrics

        def rescore(m, _method=method):
            return cached_importance(prep, _method, m)[0]

        with ctx.stage(name):
            curves[method] = pruning_curve(
                prep.model,
                scores[method],
                evaluate,
                step_fraction=r.pruning.step_fraction,
                rescore_fn=rescore if r.pruning.rescore else None,
                on_step=lambda s, _m=method: ctx.print(f"   {_m}: {s.heads_kept:3d} heads kept -> {metric} {100 * s.metrics[metric]:.2f}%"),
            )
        if counts["reused"]:
            ctx.reused.append(f"{name} ({counts['reused']}/{counts['steps']} steps)")
    return curves


def _example_batches(loader_data: Encoded, pad_id: int, batch_size: int, count: int) -> list[dict]:
    dl = make_dataloader(loader_data, batch_size=batch_size, pad_id=pad_id)
    # sorted by length: take batches spread over the range of lengths
    batches = list(dl)
    pick = np.linspace(0, len(batches) - 1, num=min(count, len(batches))).round().astype(int)
    return [batches[i] for i in sorted(set(pick.tolist()))]


@dataclass
class ExportChoice:
    """The pruned model chosen for export, with its metrics (the same on every process)."""

    method: str
    rule: str
    model: torch.nn.Module
    pruned_heads: dict[int, list[int]]
    metrics: dict

    def info(self, total: int) -> dict:
        return {
            "method": self.method,
            "rule": self.rule,
            "heads_kept": total - sum(len(v) for v in self.pruned_heads.values()),
            "pruned_heads": {str(k): v for k, v in self.pruned_heads.items()},
            "metrics": self.metrics,
            "parameters": count_parameters(self.model),
        }


def _exact_heads_target(prep: Prepared, scores: torch.Tensor, curve: list) -> tuple[int | None, dict[int, list[int]]]:
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


def _within_budget(curve: list, metric: str, floor: float) -> list[int]:
    """Indices of the curve steps whose ``metric`` is at least ``floor`` (1e-12 tolerance), least pruned first."""
    return [i for i, s in enumerate(curve) if s.metrics[metric] >= floor - 1e-12]


def choose_export(prep: Prepared, scores: dict, curves: dict, baseline: dict) -> ExportChoice:
    """Pick the step to export (``export.heads`` or the most pruned within ``export.max_drop``), prune a
    copy of the model, and evaluate it when it is not a curve step. Runs on every process (evaluation
    gathers across processes)."""
    ctx = prep.ctx
    e = ctx.recipe.export
    metric = ctx.metrics[0]
    curve = curves[e.method]
    if e.heads is not None:
        index, pruned = _exact_heads_target(prep, scores[e.method], curve)
        step = curve[index] if index is not None else None
        rule = f"exactly {e.heads} heads kept"
    else:
        within = _within_budget(curve, metric, baseline[metric] - e.max_drop)
        step = curve[max(within)] if within else curve[0]  # heads kept fall along the curve: the last is the most pruned
        pruned = {int(k): v for k, v in step.pruned_heads.items()}
        rule = f"most pruned step with {metric} >= unpruned - {100 * e.max_drop:g} points"
    pruned_model = prune_heads(copy.deepcopy(prep.model), pruned)
    metrics = step.metrics if step is not None else cached_evaluate(prep, pruned_model)[0]
    return ExportChoice(e.method, rule, pruned_model, pruned, metrics)


def save_export(prep: Prepared, choice: ExportChoice, out: Path) -> dict:
    """Save the chosen model under ``out`` (main process): checkpoint, reload check, ONNX with its
    PyTorch check, latency pruned vs unpruned. Returns the report's ``export`` entry.

    Raises:
        RunError: ONNX logits differ from PyTorch by more than 1e-4.
    """
    from .checkpoint import load_pruned, save_pruned
    from .export import check_onnx, export_onnx_folder

    ctx = prep.ctx
    e = ctx.recipe.export
    info = choice.info(num_heads_total(prep.model))
    model_dir = save_pruned(choice.model, out / "model", ctx.tokenizer)
    info["checkpoint_mb"] = (model_dir / "model.safetensors").stat().st_size / 2**20
    checks = _example_batches(prep.dev_enc, ctx.pad_id, 8, 4)
    reloaded = load_pruned(model_dir)
    cpu_model = copy.deepcopy(choice.model).cpu()
    with torch.no_grad():
        info["reload_max_abs_diff"] = max(
            float((forward_logits(reloaded, b) - forward_logits(cpu_model, b)).abs().max()) for b in checks
        )
    if e.onnx:
        onnx_path = export_onnx_folder(cpu_model, out / "onnx", checks[-1], ctx.tokenizer, opset=e.onnx_opset)
        diff = check_onnx(cpu_model, onnx_path, checks)
        if diff > 1e-4:
            raise RunError(f"ONNX logits differ from PyTorch by {diff:.2e} (> 1e-4); the export was not written")
        # latency: pruned vs unpruned on the same inputs
        feeds = _latency_feeds(prep)
        lat_u = _onnx_latency(prep, prep.model, feeds, checks[-1])
        lat_p = _onnx_latency(prep, cpu_model, feeds, path=onnx_path)
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
    return info


def export_stage(prep: Prepared, scores: dict, curves: dict, baseline: dict, tmp: Path | None, choice: ExportChoice | None = None) -> dict | None:
    """:func:`choose_export` (unless ``choice`` is given: the recovered model of :func:`recovery_stage`) on
    every process, then :func:`save_export` on the main process (``tmp``)."""
    ctx = prep.ctx
    with ctx.stage("export"):
        choice = choice if choice is not None else choose_export(prep, scores, curves, baseline)
        if ctx.accelerator.is_main_process:
            return save_export(prep, choice, tmp)
        return choice.info(num_heads_total(prep.model))


# ---- recovery (issue 10): training data, iterative curve, recovery of export candidates, budget search ----


def recovery_train_set(recipe: Recipe, tokenizer) -> Encoded:
    """Tokenised recovery examples: the first ``recovery.train_examples`` of the shuffled training pool,
    disjoint from the importance examples (the split of :func:`_split_train`).

    Raises:
        RunError: no training split.
    """
    train, dev, _, _ = load_task_data(recipe)
    if train is None:
        raise RunError("recovery.enabled needs a training split")
    as_finetune = recipe.finetune.model_copy(update={"enabled": True, "train_examples": recipe.recovery.train_examples})
    _, examples = _split_train(recipe.model_copy(update={"finetune": as_finetune}), train, dev)
    return encode(tokenizer, examples, recipe.model.max_length)


@dataclass
class RecoveryState:
    """What the recovery stages share within one run: the recovery data and the teacher's logits (computed
    once), and for ``pruning.schedule: iterative`` the briefly recovered model of each curve step."""

    train: Encoded | None = None
    loader: object = None
    table: torch.Tensor | None = None
    teacher_seconds: float | None = None
    snapshots: dict[int, torch.nn.Module] = field(default_factory=dict)

    def ensure(self, prep: Prepared) -> None:
        """Build the recovery dataloader and (distillation on) the teacher logits the first time."""
        from .recovery import recovery_dataloader, teacher_logits

        if self.loader is not None:
            return
        r, ctx = prep.ctx.recipe, prep.ctx
        self.train = recovery_train_set(r, ctx.tokenizer)
        self.loader = recovery_dataloader(self.train, batch_size=r.recovery.batch_size, pad_id=ctx.pad_id, seed=r.seed)
        start = time.perf_counter()
        self.table = teacher_logits(prep.model, self.loader, ctx.accelerator) if r.recovery.alpha > 0 else None
        self.teacher_seconds = round(time.perf_counter() - start, 1)


def iterative_curve(prep: Prepared, scores: torch.Tensor, method: str, state: RecoveryState) -> list:
    """Pruning curve of ``pruning.schedule: iterative``: prune a step, evaluate, recover briefly (in place, on
    the first ``recovery.iterative_examples`` recovery examples, one epoch), re-score with ``method``, prune
    again (Michel et al. 2019's iterative pruning with recovery between steps). Not stage-cached: the
    weights change along the curve. Step ``k``'s recovered model is kept in ``state.snapshots[k]``."""
    from accelerate.utils import set_seed

    from .recovery import recover, recovery_dataloader

    ctx, r = prep.ctx, prep.ctx.recipe
    metric = ctx.metrics[0]
    calls = [0]

    def rescore(work):
        step = calls[0]
        calls[0] += 1
        if not pruned_heads_of(work):
            return scores
        state.ensure(prep)
        n = min(r.recovery.iterative_examples, len(state.train))
        loader = recovery_dataloader(state.train.subset(range(n)), batch_size=r.recovery.batch_size, pad_id=ctx.pad_id, seed=r.seed + step)
        table = state.table[:n] if state.table is not None else None
        set_seed(r.seed + step)  # dropout draws independent of which earlier stages ran or came from the cache
        recover(work, None, loader, ctx.accelerator, r.recovery.model_copy(update={"epochs": 1}), cached_teacher=table)
        state.snapshots[step] = copy.deepcopy(work)
        return _importance(method, work, prep.imp_loader, ctx)

    return pruning_curve(
        prep.model,
        scores,
        lambda m: evaluate_model(m, prep.dev_loader, ctx.accelerator, ctx.metrics),
        step_fraction=r.pruning.step_fraction,
        rescore_fn=rescore,
        on_step=lambda s: ctx.print(f"   {method} (iterative): {s.heads_kept:3d} heads kept -> {metric} {100 * s.metrics[metric]:.2f}%"),
    )


def _latency_feeds(prep: Prepared) -> dict:
    """The ONNX latency inputs: the first ``export.latency_batch`` dev examples, padded, as the model's inputs."""
    n, dev_enc = prep.ctx.recipe.export.latency_batch, prep.dev_enc
    batch = next(iter(make_dataloader(dev_enc.subset(range(min(len(dev_enc), n))), batch_size=n, pad_id=prep.ctx.pad_id)))
    return {k: batch[k].numpy() for k in input_names(prep.model) if k in batch}


def _onnx_latency(prep: Prepared, model, feeds: dict, example: dict | None = None, path: Path | None = None) -> dict:
    """ONNX Runtime latency (:func:`prune_attattr.export.onnx_latency`, ms) of ``model`` on ``feeds``: of the
    graph at ``path``, or of ``model`` exported (with ``example``) to a temporary file. The one latency
    measurement of the export and recovery stages, so their figures compare; the unpruned model's is
    measured once per run (``prep.unpruned_latency``)."""
    from .export import export_onnx, onnx_latency

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


def model_cost(prep: Prepared, model, feeds: dict, example: dict) -> dict:
    """Heads kept, parameters, analytic FLOPs per token at the latency inputs' length
    (:func:`prune_attattr.cost.flops_per_token`), and (``export.onnx``, main process) the ONNX Runtime
    median latency in ms of one call on ``feeds``."""
    from .cost import flops_per_token

    e = prep.ctx.recipe.export
    seq = int(feeds["input_ids"].shape[1])
    flops = flops_per_token(model, seq)
    out = {
        "heads_kept": num_heads_total(model) - sum(len(v) for v in pruned_heads_of(model).values()),
        "parameters": count_parameters(model),
        "seq_len": seq,
        "attention_flops_per_token": flops["attention"],
        "total_flops_per_token": flops["total"],
        "latency_ms": None,
    }
    if e.onnx and prep.ctx.accelerator.is_main_process:
        out["latency_ms"] = _onnx_latency(prep, model, feeds, example)["median_ms"]
    return out


@dataclass
class Recovered:
    """The export candidate chosen after recovery, and the report's ``recovery`` entry."""

    choice: ExportChoice
    report: dict


def recovery_stage(prep: Prepared, scores: dict, curves: dict, baseline: dict, state: RecoveryState) -> Recovered:
    """Stage "recovery": recover export candidates and pick the one ``export`` asks for, judged after recovery.

    ``export.heads``: recovers that step. ``export.max_drop``: :func:`prune_attattr.budget.search_budget`
    over ``curves[export.method]``, starting above the most pruned step within budget before recovery;
    each candidate tried is a copy of the pruned model (of its briefly recovered model with
    ``pruning.schedule: iterative``) trained by :func:`prune_attattr.recovery.recover`. Runs on every
    process. The unpruned model and every tried one get their cost (:func:`model_cost`) and metric
    before/after recovery in the report.

    Raises:
        RunError: ``export.heads`` above the model's head count.
    """
    from accelerate.utils import set_seed

    from .budget import search_budget
    from .recovery import recover

    ctx, r = prep.ctx, prep.ctx.recipe
    e, rec = r.export, r.recovery
    metric = ctx.metrics[0]
    model = prep.model
    total = num_heads_total(model)
    curve = curves[e.method]
    models: dict[int, torch.nn.Module] = {}
    infos: dict[int, dict] = {}
    with ctx.stage("recovery"):
        state.ensure(prep)

        def start_model(i: int, pruned: dict, on_curve: bool) -> torch.nn.Module:
            snaps = state.snapshots if on_curve else {}  # a step off the curve starts from the unpruned model
            if i in snaps:
                return copy.deepcopy(snaps[i])
            base = snaps[i - 1] if i - 1 in snaps else model
            return prune_heads(copy.deepcopy(base), {int(k): v for k, v in pruned.items()})

        def recovered_metric(i: int, pruned: dict | None = None) -> float:
            on_curve = pruned is None
            pruned = curve[i].pruned_heads if on_curve else pruned
            student = start_model(i, pruned, on_curve)
            before = curve[i].metrics if on_curve else evaluate_model(student, prep.dev_loader, ctx.accelerator, ctx.metrics)
            set_seed(r.seed)  # each candidate's dropout draws: the same whatever ran, or came from the cache, before
            info = recover(student, None, state.loader, ctx.accelerator, rec, cached_teacher=state.table)
            after = evaluate_model(student, prep.dev_loader, ctx.accelerator, ctx.metrics)
            models[i], infos[i] = student, {"before": before, "after": after, "recovery": info}
            ctx.print(
                f"   recovered {e.method} with {total - sum(len(v) for v in pruned.values())} heads: {metric} "
                f"{100 * before[metric]:.2f}% -> {100 * after[metric]:.2f}% ({info['seconds'] / 60:.1f} min)"
            )
            return after[metric]

        kept = [s.heads_kept for s in curve]
        if e.heads is not None:
            index, pruned = _exact_heads_target(prep, scores[e.method], curve)
            if index is not None:
                recovered_metric(index)
            else:
                index = len(curve)  # a step off the curve
                recovered_metric(index, pruned)
            tried = [index]
            rule = f"exactly {e.heads} heads kept, after recovery"
        else:
            floor = baseline[metric] - e.max_drop
            within = _within_budget(curve, metric, floor)
            choice = search_budget(kept, floor, recovered_metric, known_within=max(within) if within else 0)
            index, tried = choice.index, choice.tried
            rule = (
                f"most pruned step with {metric} >= unpruned - {100 * e.max_drop:g} points after recovery "
                f"(binary search over the curve; heads kept of the steps tried: {[kept[i] for i in tried]})"
            )
            if infos[index]["after"][metric] < floor - 1e-12:
                rule += "; no recovered step met the budget, the least pruned one tried is exported"
        feeds = _latency_feeds(prep)
        example = _example_batches(prep.dev_enc, ctx.pad_id, 8, 1)[0]
        rows = [{"label": "unpruned", "metric_before": baseline[metric], "metric_after": None, **model_cost(prep, model, feeds, example)}]
        for i in tried:
            cost = model_cost(prep, models[i], feeds, example)
            rows.append({
                "label": f"{cost['heads_kept']} heads",
                "exported": i == index,
                "metric_before": infos[i]["before"][metric],
                "metric_after": infos[i]["after"][metric],
                "recovery_minutes": round(infos[i]["recovery"]["seconds"] / 60, 2),
                **cost,
            })
    chosen = models[index]
    report = {
        "settings": rec.model_dump(mode="json"),
        "schedule": r.pruning.schedule,
        "train_examples": len(state.train),
        "teacher_seconds": state.teacher_seconds,
        "latency_batch": int(feeds["input_ids"].shape[0]),
        "tried_heads": [row["heads_kept"] for row in rows[1:]],
        "exported_heads": rows[1 + tried.index(index)]["heads_kept"],
        "models": rows,
    }
    pruned = pruned_heads_of(chosen)
    return Recovered(ExportChoice(e.method, rule, chosen, pruned, infos[index]["after"]), report)


# ---- end of recovery block ------------------------------------------------------------------------


def analyses_stage(prep: Prepared, tmp: Path | None) -> dict:
    """The analyses the recipe enables (files under ``tmp/analyses`` on the main process)."""
    a = prep.ctx.recipe.analyses
    if not (a.tree.enabled or a.triggers.enabled or a.effectiveness.enabled or a.connections.enabled or a.universality.enabled):
        return {}
    from .analyses import run_analyses

    return run_analyses(prep, tmp / "analyses" if tmp is not None else None)


def build_report(prep: Prepared, baseline: dict, scores: dict, curves: dict, export_info: dict | None, analyses: dict, resolved: dict) -> dict:
    """The report dict (written as ``report.json``)."""
    ctx, r = prep.ctx, prep.ctx.recipe
    return {
        "run_name": r.run_name,
        "model": str(r.model.path),
        "model_short": Path(str(prep.model_path)).name if r.model.path != "embedded" else "embedded MiniLM-L6",
        "task": r.data.task,
        "primary_metric": ctx.metrics[0],
        "eval_split": "dev",
        "eval_examples": len(prep.dev_enc),
        "importance_examples": len(prep.imp_enc),
        "importance_source": r.importance.source,
        "total_heads": num_heads_total(prep.model),
        "processes": ctx.accelerator.num_processes,
        "baseline": baseline,
        "baseline_parameters": count_parameters(prep.model),
        "finetune": prep.finetune_info,
        "timings": ctx.timings,
        "reused": list(ctx.reused),
        "curves": {m: [s.to_dict() for s in c] for m, c in curves.items()},
        "importance": {m: s.tolist() for m, s in scores.items()},
        "export": export_info,
        "analyses": analyses,
        "recipe": resolved,
    }


def write_outputs(report: dict, tmp: Path, final: Path, *, recipe_source: str | None = None) -> None:
    """Write recipe, importance, plot, Markdown and JSON into ``tmp``, then rename it to ``final`` (main process)."""
    from .report import print_report, write_json, write_markdown, write_plot

    resolved, curves = report["recipe"], report["curves"]
    (tmp / "recipe.yaml").write_text(
        (f"# resolved from {recipe_source}\n" if recipe_source else "") + yaml.safe_dump(resolved, sort_keys=False)
    )
    (tmp / "importance.json").write_text(json.dumps(report["importance"], indent=1) + "\n")
    if curves:
        write_plot(report, tmp / "curves.png")
    write_markdown(report, tmp / "report.md", "curves.png" if curves else None)
    write_json(report, tmp / "report.json")
    if curves:
        print_report(report, console())
    if report.get("recovery"):  # recovery (issue 10)
        from .report import recovery_table, write_tradeoff_plot

        write_tradeoff_plot(report, tmp / "tradeoff.png")
        console().print(recovery_table(report))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def run(recipe: Recipe, *, force: bool = False, recipe_source: str | None = None, use_cache: bool = True) -> dict:
    """Run every stage of ``recipe`` and return the report dict (also written to ``report.json``).

    Args:
        use_cache: False (``--no-cache``): recompute the fine-tuning and every stage (results are still
            stored for the next run).

    Raises:
        OutputExists: ``<output_dir>/<run_name>`` exists and ``force`` is False.
        RunError, DataError, prune_attattr.models.ModelError: bad input found while running.
    """
    from accelerate import Accelerator

    r = recipe
    final = Path(r.output_dir) / r.run_name
    if final.exists() and not force:
        raise OutputExists(f"{final} exists; pass --force to replace it or set run_name")
    if r.runtime.threads:
        torch.set_num_threads(r.runtime.threads)
    accelerator = Accelerator(cpu=r.runtime.cpu, mixed_precision=r.runtime.mixed_precision)
    resolved = r.model_dump(mode="json")
    if accelerator.is_main_process:
        console().print("[bold]prune-attattr[/] resolved recipe" + (f" ({recipe_source})" if recipe_source else "") + ":")
        console().print(yaml.safe_dump(resolved, sort_keys=False).rstrip())
        console().print(f"processes: {accelerator.num_processes}, device: {accelerator.device}, torch threads: {torch.get_num_threads()}")

    tmp = None
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{r.run_name}.tmp-", dir=final.parent))
    try:
        prep = prepare(r, accelerator, use_cache=use_cache)
        baseline = evaluate_unpruned(prep)
        chance = chance_level(prep.ctx.metrics[0], baseline[prep.ctx.metrics[0]], prep.dev_enc.labels, prep.ctx.labels)  # issue 17
        print_chance_warning(chance, prep.ctx.print)  # issue 17: loud when the unpruned model is at chance
        refuse_export_at_chance(r, chance)  # issue 17: export.max_drop refuses to choose at chance (RunError)
        scores = importance_stage(prep)
        recovery = RecoveryState() if r.recovery.enabled else None  # recovery (issue 10)
        curves = curves_stage(prep, scores, recovery)
        recovered = recovery_stage(prep, scores, curves, baseline, recovery) if recovery is not None else None
        export_info = export_stage(prep, scores, curves, baseline, tmp, recovered.choice if recovered else None) if r.export.enabled else None
        analyses = analyses_stage(prep, tmp)
        report = build_report(prep, baseline, scores, curves, export_info, analyses, resolved)
        report["recovery"] = recovered.report if recovered is not None else None
        report["chance"] = chance  # issue 17
        if prep.ctx.reused:
            prep.ctx.print("reused from cache: " + ", ".join(prep.ctx.reused))
        if accelerator.is_main_process:
            write_outputs(report, tmp, final, recipe_source=recipe_source)
            tmp = None
            prep.ctx.print(f"[bold green]wrote {final}/[/]: " + ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in final.iterdir())))
        accelerator.wait_for_everyone()
        return report
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
