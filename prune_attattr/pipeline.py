"""The main job: fine-tune, score heads, prune incrementally, report, export (one Accelerate pipeline).

``run(recipe)`` is what ``prune-attattr recipe.yaml`` calls. Outputs go to a temporary folder next
to ``<output_dir>/<run_name>`` and are renamed into place only when every stage succeeded, so a
failure or Ctrl-C leaves no half-written export.
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
from .config import Recipe
from .evaluation import evaluate_model
from .models import forward_logits, load_classifier, num_heads_total, resolve_model_path
from .progress import console
from .pruning import count_parameters, heads_to_prune, prune_heads, pruning_curve
from .tasks import GLUE_TASKS, Encoded, Examples, encode, glue_path, make_dataloader, read_examples

__all__ = ["RunError", "OutputExists", "load_task_data", "prepare", "Prepared", "run", "RunContext"]


class RunError(RuntimeError):
    """A run that cannot go on (message says why and what to do)."""


class OutputExists(RunError):
    """The run's output folder exists and ``force`` was not given."""


def load_task_data(recipe: Recipe) -> tuple[Examples | None, Examples, list[str], list[str]]:
    """``(train or None, dev, labels, metric names)`` for the recipe's task.

    Raises:
        DataError: missing file, column or undeclared label.
    """
    d = recipe.data
    if d.task == "custom":
        kw = dict(text_column=d.text_column, text_pair_column=d.text_pair_column, label_column=d.label_column, labels=d.labels)
        train = read_examples(d.train_file, **kw) if d.train_file else None
        dev = read_examples(d.dev_file, **kw)
        labels, metrics = list(d.labels), list(d.metrics or ["accuracy"])
    else:
        spec = GLUE_TASKS[d.task]
        kw = dict(text_column=spec.text_column, text_pair_column=spec.text_pair_column, label_column=spec.label_column, labels=spec.labels)
        train = read_examples(glue_path(spec.train_file), **kw) if spec.train_file else None
        dev = read_examples(glue_path(spec.dev_file), **kw)
        labels, metrics = list(spec.labels), list(d.metrics or spec.metrics)
    if d.dev_limit:
        dev = dev.subset(range(min(d.dev_limit, len(dev))))
    return train, dev, labels, metrics


@dataclass
class RunContext:
    """What the stages share: the accelerator, tokenizer, data and timings."""

    recipe: Recipe
    accelerator: object
    tokenizer: object
    pad_id: int
    metrics: list[str]
    labels: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    quiet: bool = False

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


@dataclass
class Prepared:
    """A fine-tuned model with its data, ready for importance, pruning or analyses."""

    ctx: RunContext
    model: torch.nn.Module
    model_path: Path
    dev_enc: Encoded
    imp_enc: Encoded
    dev_loader: object
    imp_loader: object
    finetune_info: dict | None


def prepare(recipe: Recipe, accelerator=None, *, quiet: bool = False) -> Prepared:
    """Load data and model, fine-tune (or reuse the cached fine-tuned model), build the dataloaders.

    Raises:
        RunError, DataError, prune_attattr.models.ModelError: bad input.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    r = recipe
    if r.runtime.threads:
        torch.set_num_threads(r.runtime.threads)
    if accelerator is None:
        accelerator = Accelerator(cpu=r.runtime.cpu, mixed_precision=r.runtime.mixed_precision)
    set_seed(r.seed)
    model_path = resolve_model_path(r.model.path)
    train, dev, labels, metric_names = load_task_data(r)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx = RunContext(r, accelerator, tokenizer, pad_id, metric_names, labels, quiet=quiet)
    imp_examples, ft_examples = _split_train(r, train, dev)
    id2label = dict(enumerate(labels))
    with ctx.stage("tokenize"):
        dev_enc = encode(tokenizer, dev, r.model.max_length)
        imp_enc = encode(tokenizer, imp_examples, r.model.max_length)
        ft_enc = encode(tokenizer, ft_examples, r.model.max_length) if ft_examples is not None else None
    finetune_info = None
    if ft_enc is not None:
        from .finetune import finetune

        with ctx.stage("fine-tune"):
            model_dir, finetune_info = finetune(
                model_path, tokenizer, ft_enc, id2label=id2label, settings=r.finetune, seed=r.seed, accelerator=accelerator
            )
        ctx.print(
            f"   fine-tuned model {'reused from cache' if finetune_info['cached'] else 'trained'}: {model_dir}"
            + ("" if finetune_info["cached"] else f" ({len(ft_enc)} examples)")
        )
    else:
        model_dir = model_path
    model = load_classifier(model_dir, id2label=None if ft_enc is not None else id2label).to(accelerator.device)
    if model.config.num_labels != len(labels):
        raise RunError(
            f"model.path {model_dir} has {model.config.num_labels} labels but the task has {len(labels)}; "
            "fine-tune it (finetune.enabled true) or pick a matching model"
        )
    dev_loader = ctx.loader(dev_enc, r.pruning.eval_batch_size)
    imp_loader = ctx.loader(imp_enc, r.importance.batch_size)
    return Prepared(ctx, model, model_path, dev_enc, imp_enc, dev_loader, imp_loader, finetune_info)


def _importance(method: str, model, loader, ctx: RunContext) -> torch.Tensor:
    r = ctx.recipe
    if method == "attattr":
        a = r.importance.attattr
        return imp.attattr_importance(
            model, loader, ctx.accelerator, steps=a.steps, target=a.target, mode=a.mode, quadrature=a.quadrature, chunk_size=a.chunk_size
        )
    if method == "taylor":
        return imp.taylor_importance(model, loader, ctx.accelerator)
    if method == "accuracy_difference":
        return imp.accuracy_difference_importance(model, loader, ctx.accelerator, metrics=ctx.metrics)
    if method == "attention":
        return imp.attention_importance(model, loader, ctx.accelerator)
    if method == "random":
        return imp.random_importance(model, seed=r.seed)
    raise RunError(f"unknown method {method}")


def _example_batches(loader_data: Encoded, pad_id: int, batch_size: int, count: int) -> list[dict]:
    dl = make_dataloader(loader_data, batch_size=batch_size, pad_id=pad_id)
    # sorted by length: take batches spread over the range of lengths
    batches = list(dl)
    pick = np.linspace(0, len(batches) - 1, num=min(count, len(batches))).round().astype(int)
    return [batches[i] for i in sorted(set(pick.tolist()))]


def _export(ctx: RunContext, model, scores, curves, baseline, dev_enc: Encoded, tmp: Path, dev_loader) -> dict:
    r = ctx.recipe
    e = r.export
    metric = ctx.metrics[0]
    total = num_heads_total(model)
    curve = curves[e.method]
    if e.heads is not None:
        if e.heads > total:
            raise RunError(f"export.heads {e.heads} exceeds the model's {total} heads")
        step = next((s for s in curve if s.heads_kept == e.heads), None)
        pruned = step.pruned_heads if step else heads_to_prune(scores[e.method], total - e.heads)
        rule = f"exactly {e.heads} heads kept"
    else:
        floor = baseline[metric] - e.max_drop
        ok = [s for s in curve if s.metrics[metric] >= floor - 1e-12]
        step = min(ok, key=lambda s: s.heads_kept) if ok else curve[0]
        pruned = step.pruned_heads
        rule = f"most pruned step with {metric} >= unpruned - {100 * e.max_drop:g} points"
    pruned_model = prune_heads(copy.deepcopy(model), {int(k): v for k, v in pruned.items()})
    metrics = step.metrics if step is not None else evaluate_model(pruned_model, dev_loader, ctx.accelerator, ctx.metrics)
    info = {
        "method": e.method,
        "rule": rule,
        "heads_kept": total - sum(len(v) for v in pruned.values()),
        "pruned_heads": {str(k): v for k, v in pruned.items()},
        "metrics": metrics,
        "parameters": count_parameters(pruned_model),
    }
    if not ctx.accelerator.is_main_process:
        return info
    from .export import check_onnx, export_onnx, load_pruned, onnx_latency, save_pruned

    model_dir = save_pruned(pruned_model, tmp / "model", ctx.tokenizer)
    info["checkpoint_mb"] = (model_dir / "model.safetensors").stat().st_size / 2**20
    checks = _example_batches(dev_enc, ctx.pad_id, 8, 4)
    reloaded = load_pruned(model_dir)
    cpu_model = pruned_model.cpu()
    with torch.no_grad():
        info["reload_max_abs_diff"] = max(
            float((forward_logits(reloaded, b) - forward_logits(cpu_model, b)).abs().max()) for b in checks
        )
    if e.onnx:
        onnx_path = export_onnx(cpu_model, tmp / "model.onnx", checks[-1], opset=e.onnx_opset)
        diff = check_onnx(cpu_model, onnx_path, checks)
        if diff > 1e-4:
            raise RunError(f"ONNX logits differ from PyTorch by {diff:.2e} (> 1e-4); the export was not written")
        # latency: pruned vs unpruned on the same inputs
        lat_batch = next(iter(make_dataloader(dev_enc.subset(range(min(len(dev_enc), e.latency_batch))), batch_size=e.latency_batch, pad_id=ctx.pad_id)))
        feeds = {k: lat_batch[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
        with tempfile.TemporaryDirectory() as d:
            base_path = export_onnx(copy.deepcopy(model).cpu(), Path(d) / "unpruned.onnx", checks[-1], opset=e.onnx_opset)
            threads = r.runtime.threads or torch.get_num_threads()
            lat_u = onnx_latency(base_path, feeds, e.latency_repeats, threads)
        lat_p = onnx_latency(onnx_path, feeds, e.latency_repeats, threads)
        info["onnx"] = {
            "file": "model.onnx",
            "mb": onnx_path.stat().st_size / 2**20,
            "max_abs_diff": diff,
            "latency_batch": int(feeds["input_ids"].shape[0]),
            "latency_seq": int(feeds["input_ids"].shape[1]),
            "latency_pruned": lat_p,
            "latency_unpruned": lat_u,
            "speedup": lat_u["median_ms"] / lat_p["median_ms"],
        }
    return info


def run(recipe: Recipe, *, force: bool = False, recipe_source: str | None = None) -> dict:
    """Run every stage of ``recipe`` and return the report dict (also written to ``report.json``).

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
        prep = prepare(r, accelerator)
        ctx, model, model_path = prep.ctx, prep.model, prep.model_path
        dev_enc, imp_enc, dev_loader, imp_loader = prep.dev_enc, prep.imp_enc, prep.dev_loader, prep.imp_loader
        finetune_info, metric_names = prep.finetune_info, ctx.metrics
        with ctx.stage("evaluate unpruned"):
            baseline = evaluate_model(model, dev_loader, accelerator, metric_names, description="dev")
        ctx.print("   unpruned: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in baseline.items() if k != "loss"))

        scores: dict[str, torch.Tensor] = {}
        for method in r.importance.methods:
            with ctx.stage(f"importance: {method}"):
                scores[method] = _importance(method, model, imp_loader, ctx)

        curves = {}
        for method in r.importance.methods if r.pruning.enabled else []:
            with ctx.stage(f"pruning curve: {method}"):
                rescore = (lambda m, _method=method: _importance(_method, m, imp_loader, ctx)) if r.pruning.rescore else None
                curves[method] = pruning_curve(
                    model,
                    scores[method],
                    lambda m: evaluate_model(m, dev_loader, accelerator, metric_names),
                    step_fraction=r.pruning.step_fraction,
                    rescore_fn=rescore,
                    on_step=lambda s, _m=method: ctx.print(
                        f"   {_m}: {s.heads_kept:3d} heads kept -> {metric_names[0]} {100 * s.metrics[metric_names[0]]:.2f}%"
                    ),
                )

        export_info = None
        if r.export.enabled:
            with ctx.stage("export"):
                export_info = _export(ctx, model, scores, curves, baseline, dev_enc, tmp, dev_loader) if accelerator.is_main_process else None

        analyses = {}
        a = r.analyses
        if a.tree.enabled or a.triggers.enabled or a.effectiveness.enabled or a.universality.enabled:
            from .analyses import run_analyses

            analyses = run_analyses(prep, tmp / "analyses" if tmp is not None else None)

        report = {
            "run_name": r.run_name,
            "model": str(r.model.path),
            "model_short": Path(str(model_path)).name if r.model.path != "embedded" else "embedded MiniLM-L6",
            "task": r.data.task,
            "primary_metric": metric_names[0],
            "eval_split": "dev",
            "eval_examples": len(dev_enc),
            "importance_examples": len(imp_enc),
            "importance_source": r.importance.source,
            "total_heads": num_heads_total(model),
            "processes": accelerator.num_processes,
            "baseline": baseline,
            "baseline_parameters": count_parameters(model),
            "finetune": finetune_info,
            "timings": ctx.timings,
            "curves": {m: [s.to_dict() for s in c] for m, c in curves.items()},
            "importance": {m: s.tolist() for m, s in scores.items()},
            "export": export_info,
            "analyses": analyses,
            "recipe": resolved,
        }
        if accelerator.is_main_process:
            from .report import print_report, write_json, write_markdown, write_plot

            (tmp / "recipe.yaml").write_text(
                (f"# resolved from {recipe_source}\n" if recipe_source else "") + yaml.safe_dump(resolved, sort_keys=False)
            )
            (tmp / "importance.json").write_text(json.dumps({m: s.tolist() for m, s in scores.items()}, indent=1) + "\n")
            if curves:
                write_plot(report, tmp / "curves.png")
            write_markdown(report, tmp / "report.md", "curves.png" if curves else None)
            write_json(report, tmp / "report.json")
            if curves:
                print_report(report, console())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            tmp = None
            ctx.print(f"[bold green]wrote {final}/[/]: " + ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in final.iterdir())))
        accelerator.wait_for_everyone()
        return report
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
