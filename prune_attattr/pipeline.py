"""The main job: fine-tune, score heads, prune incrementally, report, export (one Accelerate pipeline).

``run(recipe)`` is what ``prune-attattr recipe.yaml`` calls. It composes the stages of
:mod:`prune_attattr.stages`, one module each:

    load (data, tokenizer, model; check_run; fine-tune)     -> stages.prepare.prepare
    evaluate the unpruned model                              -> stages.prepare.evaluate_unpruned
    head importance, one method at a time                    -> stages.importance.importance_stage
    neuron importance (pruning.units neurons or both)        -> stages.importance.neuron_importance_stage
    sublayer importance (pruning.sublayers)                  -> stages.importance.sublayer_importance_stage
    pruning curves                                           -> stages.curves.curves_stage
    recovery of export candidates, budget search (recipe's
      ``recovery`` section; every process)                   -> stages.recovery.recovery_stage
    export: choose the step and prune (every process)        -> stages.export.choose_export
            save, reload check, ONNX, latency (main process) -> stages.export.save_export
    analyses                                                 -> stages.analyses.analyses_stage
    report and atomic write                                  -> stages.report.build_report, write_outputs

Outputs go to a temporary folder next to ``<output_dir>/<run_name>`` and are renamed into place only
when every stage succeeded, so a failure, Ctrl-C or SIGTERM leaves no half-written export.

Each method's importance scores, each evaluated pruning step and each recovered candidate are cached
on disk (keyed on the model's bytes, the tokenised examples, the settings and the seed; see
:mod:`prune_attattr.cache`), so a re-run after an interruption resumes where it stopped; the report
lists the reused stages.

The stages' public names are importable from here too (``from prune_attattr.pipeline import prepare``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .checks import chance_level, export_refusal
from .config import Recipe
from .errors import OutputExists, RunError
from .progress import console
from .report import print_chance_warning
from .stages.analyses import analyses_stage
from .stages.context import Prepared, RunContext
from .stages.curves import curves_stage, iterative_curve
from .stages.export import ExportChoice, choose_export, export_stage, save_export
from .stages.importance import importance_stage, neuron_importance_stage, sublayer_importance_stage
from .stages.prepare import check_run, evaluate_unpruned, prepare
from .stages.recovery import RecoveryState, model_cost, recovery_stage, recovery_train_set
from .stages.report import build_report, write_outputs
from .tasks import label_names, load_task_data

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
    "export_stage",
    "analyses_stage",
    "build_report",
    "write_outputs",
    "run",
]


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
        chance = chance_level(prep.ctx.metrics[0], baseline[prep.ctx.metrics[0]], prep.dev_enc.labels, label_names(r.data.task, prep.ctx.labels))
        print_chance_warning(chance, prep.ctx.print)  # loud when the unpruned model is at chance
        refusal = export_refusal(r, chance)
        if refusal is not None:  # export.max_drop has nothing to choose from: the report says so, nothing is exported
            report = build_report(prep, baseline, {}, {}, None, {}, resolved)
            report.update(chance=chance, export_refused=refusal)
            if accelerator.is_main_process:
                write_outputs(report, tmp, final, recipe_source=recipe_source)
                tmp = None
            accelerator.wait_for_everyone()
            raise RunError(f"{refusal} (report without export: {final}/report.md)")
        scores = importance_stage(prep)
        neuron_scores = neuron_importance_stage(prep)
        prep.sublayer_scores = sublayer_importance_stage(prep)
        recovery = RecoveryState() if r.recovery.enabled else None  # recovery (issue 10)
        curves = curves_stage(prep, scores, recovery, neuron_scores)
        recovered = recovery_stage(prep, scores, curves, baseline, recovery, neuron_scores) if recovery is not None else None
        export_info = (
            export_stage(prep, scores, curves, baseline, tmp, recovered.choice if recovered else None, neuron_scores) if r.export.enabled else None
        )
        analyses = analyses_stage(prep, tmp)
        report = build_report(prep, baseline, scores, curves, export_info, analyses, resolved, neuron_scores)
        report["recovery"] = recovered.report if recovered is not None else None
        report["chance"] = chance
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
