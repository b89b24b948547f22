"""Stage "report": the report dict of a run, and every output file written and renamed into place at once.

:func:`build_report` assembles ``report.json``'s content from the stages' results; :func:`write_outputs`
renders it (:mod:`prune_attattr.report`) into the run's temporary folder and renames that folder to
``<output_dir>/<run_name>``, so a failure leaves no half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ..models import num_heads_total
from ..progress import console
from ..prune.heads import count_parameters
from .context import Prepared

__all__ = ["build_report", "write_outputs"]


def build_report(
    prep: Prepared, baseline: dict, scores: dict, curves: dict, export_info: dict | None, analyses: dict, resolved: dict,
    neuron_scores: dict | None = None,
) -> dict:
    """The report dict (written as ``report.json``); ``neuron_scores``: method -> ``[layers, neurons]``."""
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
        "neuron_importance": {m: s.tolist() for m, s in (neuron_scores or {}).items()},
        "export": export_info,
        "analyses": analyses,
        "recipe": resolved,
    }


def write_outputs(report: dict, tmp: Path, final: Path, *, recipe_source: str | None = None) -> None:
    """Write recipe, importance, plot, Markdown and JSON into ``tmp``, then rename it to ``final`` (main process)."""
    from ..report import print_report, write_cards, write_json, write_markdown, write_neuron_heatmaps, write_plot

    resolved, curves = report["recipe"], report["curves"]
    (tmp / "recipe.yaml").write_text(
        (f"# resolved from {recipe_source}\n" if recipe_source else "") + yaml.safe_dump(resolved, sort_keys=False)
    )
    importance = dict(report["importance"])
    if report.get("neuron_importance"):  # heads as before, neurons beside them
        importance = {"heads": importance, "neurons": report["neuron_importance"]}
        write_neuron_heatmaps(report, tmp / "neuron_importance.png")
    (tmp / "importance.json").write_text(json.dumps(importance, indent=1) + "\n")
    if curves:
        write_plot(report, tmp / "curves.png")
    write_markdown(report, tmp / "report.md", "curves.png" if curves else None)
    write_json(report, tmp / "report.json")
    write_cards(report, tmp)  # model/README.md, onnx/README.md: figures from the same report
    if curves:
        print_report(report, console())
    if report.get("recovery"):  # recovery (issue 10)
        from ..report import recovery_table, write_tradeoff_plot

        write_tradeoff_plot(report, tmp / "tradeoff.png")
        console().print(recovery_table(report))
    deployment = (report.get("export") or {}).get("deployment")
    if deployment:  # issue 16: the shipped graphs against the unpruned ones
        from ..report import deployment_table

        console().print(deployment_table(deployment["bench"]))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
