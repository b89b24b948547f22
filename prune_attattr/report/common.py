"""Shared pieces of every rendering: number formats, the curves grid, the chance warning, method settings.

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the same
content as ``report.json``), so a notebook can re-render a saved run.
"""

from __future__ import annotations

import json
from pathlib import Path


__all__ = ["MARKERS", "by_flops", "chance_warning", "report_warnings", "method_settings"]


MARKERS = {"attattr": "A", "taylor": "T", "fisher": "F", "accuracy_difference": "D", "attention": "S", "random": "R"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _loyalty(x: dict | None) -> str:
    """``"label / probability"`` loyalty in % (:func:`prune_attattr.evaluation.loyalty`), ``-`` when not measured."""
    return "-" if not x else f"{100 * x['label']:.1f} / {100 * x['probability']:.1f}"


def by_flops(report: dict) -> bool:
    """Whether the report's curves are on the FLOPs axis (``pruning.units`` neurons or both) rather than
    heads kept (the paper's curves)."""
    return (report.get("recipe") or {}).get("pruning", {}).get("units", "heads") != "heads"


def _x(report: dict, step: dict):
    """A step's position on the report's axis: heads kept, or the FLOPs budget (fraction) it was pruned to."""
    if not by_flops(report):
        return step["heads_kept"]
    return round(step["budget"] if step.get("budget") is not None else step["flops_fraction"], 4)


def _axis_label(report: dict) -> str:
    return "FLOPs kept (%)" if by_flops(report) else "heads kept"


def _row_label(report: dict, x) -> str:
    return f"{100 * x:.0f}%" if by_flops(report) else f"{x}/{report['total_heads']}"


def _grid(report: dict) -> tuple[list, dict[str, dict]]:
    metric = report["primary_metric"]
    by_method = {m: {_x(report, s): s["metrics"][metric] for s in steps} for m, steps in report["curves"].items()}
    kept = sorted({k for v in by_method.values() for k in v}, reverse=True)
    return kept, by_method


def chance_warning(chance: dict | None) -> str | None:
    """The warning line when the unpruned model is at chance (``chance``: the report's ``chance`` entry,
    :func:`prune_attattr.checks.chance_level`); None when it is not or the check did not apply."""
    from ..checks import chance_message

    if not chance or not chance.get("at_chance"):
        return None
    return "WARNING: " + chance_message(chance)


def report_warnings(report: dict) -> list[str]:
    """Every warning of a run, each a line starting with ``WARNING:``: the unpruned model at chance
    (:func:`chance_warning`), then what the export ships when it is at chance or, with its size set by
    ``export.flops``/``export.heads``, further below the unpruned model than ``export.max_drop``
    (:func:`prune_attattr.checks.shipped_problems` on the report's ``export.shipped``). The same lines go to
    the console, report.md, report.json (``warnings``) and the model cards."""
    from ..checks import shipped_problems

    first = chance_warning(report.get("chance"))
    lines = [first] if first else []
    shipped = (report.get("export") or {}).get("shipped") or {}
    export_settings = (report.get("recipe") or {}).get("export") or {}
    lines += ["WARNING: " + x for x in shipped_problems(export_settings, shipped)]
    return lines


def _mflops(x: float) -> str:
    return f"{x / 1e6:.2f}"


def _ms(row: dict, b: str, several: bool = False) -> str:
    v = row["ms"].get(b)
    if v is None:
        return "-"
    return f"{v:.2f} ({_layout_short(str((row.get('threads') or {}).get(b, '?')))})" if several else f"{v:.2f}"


def _layout_short(label: str) -> str:
    return "all" if label == "all" else f"{label}t"


def _layout_words(label: str) -> str:
    if label.endswith("x1"):
        return f"split between {label[:-2]} one-thread sessions"
    return "all cores" if label == "all" else f"{label} thread" + ("s" if label != "1" else "")


def _thread_counts(bench: dict) -> list:
    t = bench.get("threads")
    return list(t) if isinstance(t, (list, tuple)) else [t]


def _several_layouts(bench: dict) -> bool:
    """Whether a timing chose between layouts (several thread counts, or a split): its cells then name theirs."""
    return len(_thread_counts(bench)) > 1 or bool(bench.get("split"))


def _times(row: dict, key: str, b: str | None = None) -> str:
    v = row[key].get(b) if b is not None else row[key]
    return "-" if v is None else f"{v:.2f}x"


def _deployment_cells(bench: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the deployment table (shared by the rich and Markdown renderers)."""
    sizes = [str(b) for b in bench.get("batch_sizes", [1, 16])]
    ref_mb = bench["rows"][0]["mb"] if bench["rows"] else None
    head = ["model", "file", f"{bench.get('metric') or 'metric'} (%)"]
    for b in sizes:
        head += [f"ms, batch {b}", f"speed-up, batch {b}"]
    head += ["MB", "smaller"]
    differ = any(r.get("batch_differ") is not None for r in bench["rows"])
    if differ:  # issue 21: dev predictions that change between batch 1 and batch 16
        head.append("differ, batch 1 vs 16")
    several = _several_layouts(bench)
    cells = []
    for r in bench["rows"]:
        row = [r["label"] + (" (deployed)" if r.get("deployed") else ""), r["file"], _pct(r.get("metric"))]
        for b in sizes:
            row += [_ms(r, b, several), _times(r, "speedup", b)]
        mb = r.get("mb")
        row += ["-" if mb is None else f"{mb:.1f}", "-" if not (mb and ref_mb) else f"{ref_mb / mb:.2f}x"]
        if differ:
            row.append("-" if r.get("batch_differ") is None else str(r["batch_differ"]))
        cells.append(row)
    return head, cells


def _deployment_caption(bench: dict) -> str:
    counts = ["all" if t is None else str(t) for t in _thread_counts(bench)]
    split = bench.get("split")
    if _several_layouts(bench):
        threads = f"each graph at the fastest of {' and '.join(counts)} intra-op thread(s)"
        if split:
            threads += f" and, in batches, the batch split between {split} one-thread sessions run at once ({split}x1t)"
        threads += " (in brackets)"
    else:
        threads = f"{counts[0]} thread(s)"
    note = _layouts_note(bench)
    return (
        f"ONNX Runtime on {bench.get('cpu', 'this CPU')}, {threads}; median over {bench.get('rounds')} alternating "
        f"rounds of the mean ms per call on {bench.get('sentences')} dev sentences; speed-up and size against the first row"
        + (f"; metric from {bench['metric_source']}" if bench.get("metric_source") else "")
        + (f"; threads: {note}" if note else "")
    )


def _layouts_note(bench: dict) -> str | None:
    """One line giving, for the first row's graph and the deployed one, the median ms of every layout
    timed at each batch size (:func:`prune_attattr.deploy.bench.time_models`), e.g. ``"unpruned float32:
    batch 1 1 thread 7.16, 2 threads 4.36 ms; ...; deployed: batch 1 1 thread 0.84, 2 threads 1.25 ms; batch
    16 2 threads 19.42, split between 2 one-thread sessions 9.96 ms"``: what each way of using the cores
    gave (on shared hosts intra-op threads can stop helping small graphs; docs/benchmarks.md, "Thread count").
    None when one layout was timed per batch size or rows lack the figures."""
    rows = bench.get("rows") or []
    deployed = next((r for r in rows if r.get("deployed")), None)
    if not rows or deployed is None:
        return None
    parts = []
    for r in (rows[0], deployed):
        by = r.get("ms_by_threads") or {}
        if not by or all(len(v) < 2 for v in by.values()):
            return None
        sizes = "; ".join(f"batch {b} " + ", ".join(f"{_layout_words(k)} {v:.2f}" for k, v in layouts.items()) + " ms" for b, layouts in by.items())
        parts.append(f"{'deployed' if r is deployed else r['label']}: {sizes}")
    return "; ".join(parts)


_FIXED_SETTINGS = {
    "taylor": {
        "target": "gold",
        "quantity": "|mask gradient of the cross-entropy|, summed over examples (Michel et al. 2019, Eq. 4); heads per layer-normalised, neurons not",
    },
    "fisher": {"target": "gold", "quantity": "squared mask gradient of the cross-entropy, summed over examples (empirical Fisher, Kwon et al. 2022, 4.1)"},
    "accuracy_difference": {"target": "gold", "quantity": "metric drop with the head alone masked (Michel et al. 2019, 3.1)"},
    "attention": {"target": None, "quantity": "max attention probability over token pairs, summed over examples"},
    "random": {"target": None, "quantity": "random scores (seeded)"},
}


def method_settings(report: dict) -> dict[str, dict]:
    """How each method's head scores were computed, from the run's resolved recipe.

    AttAttr: ``{"mode", "quadrature", "steps", "target"}`` (Hao et al. 2021, Eq. 3: the paper uses
    left Riemann, m = 20, gold label); the baselines: their target and what they measure.
    """
    rec = report.get("recipe") or {}
    imp = rec.get("importance") or {}
    out: dict[str, dict] = {}
    for m in report.get("importance") or report.get("curves") or imp.get("methods") or []:
        if m == "attattr":
            a = imp.get("attattr") or {}
            out[m] = {k: a.get(k) for k in ("mode", "quadrature", "steps", "target")}
            out[m]["quantity"] = "max over token pairs of the attribution, summed over examples (Hao et al. 2021, 4.1)" + (
                "; neurons: max over tokens of the attribution of the intermediate activations (Dai et al. 2022)"
                if m in (report.get("neuron_importance") or {})
                else ""
            )
        else:
            out[m] = dict(_FIXED_SETTINGS.get(m, {}))
        out[m]["examples"] = report.get("importance_examples")
    return out


def _settings_lines(report: dict) -> list[str]:
    settings = method_settings(report)
    if not settings:
        return []
    lines = ["", "## How each method scored heads" + (" and neurons" if report.get("neuron_importance") else ""), ""]
    for m, s in settings.items():
        if m == "attattr":
            paper = s["quadrature"] == "left" and s["steps"] == 20 and s["target"] == "gold"
            lines.append(
                f"- `attattr`: {s['quadrature']} quadrature, {s['steps']} steps, target {s['target']} label, mode {s['mode']}"
                + (" (the paper's procedure: left Riemann, m = 20)" if paper else " (not the paper's m = 20 left Riemann sum)")
            )
        else:
            target = f", target {s['target']} label" if s.get("target") else ""
            lines.append(f"- `{m}`: {s.get('quantity', '')}{target}")
    return lines


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"
