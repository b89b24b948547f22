"""Stage "analyses": the paper's analyses the recipe enables (:func:`prune_attattr.analyses.run_analyses`)."""

from __future__ import annotations

from pathlib import Path

from .context import Prepared

__all__ = ["analyses_stage"]


def analyses_stage(prep: Prepared, tmp: Path | None) -> dict:
    """The analyses the recipe enables (files under ``tmp/analyses`` on the main process)."""
    a = prep.ctx.recipe.analyses
    if not (a.tree.enabled or a.triggers.enabled or a.effectiveness.enabled or a.connections.enabled or a.universality.enabled):
        return {}
    from ..analyses import run_analyses
    from ..report import write_analyses_files

    summary = run_analyses(prep)
    if tmp is not None and prep.ctx.accelerator.is_main_process:
        write_analyses_files(summary, tmp / "analyses")
    return summary
