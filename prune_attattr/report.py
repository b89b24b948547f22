"""Reports of a run: rich console table and terminal chart, ``report.json``, ``report.md`` and a PNG plot.

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the
same content as ``report.json``), so a notebook can re-render a saved run.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "curves_table",
    "terminal_chart",
    "print_report",
    "write_json",
    "write_markdown",
    "write_plot",
    "write_neuron_heatmaps",
    "by_flops",
    "recovery_markdown",
    "recovery_table",
    "write_tradeoff_plot",
    "chance_warning",
    "print_chance_warning",
    "method_settings",
    "analyses_markdown",
    "write_analyses_files",
    "draw_tree",
    "plot_effectiveness",
    "plot_connections",
    "plot_universality",
    "plot_triggers",
    "deployment_table",
    "deployment_markdown",
]

MARKERS = {"attattr": "A", "taylor": "T", "fisher": "F", "accuracy_difference": "D", "attention": "S", "random": "R"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


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


def curves_table(report: dict):
    """A rich Table: one row per step (heads kept, or FLOPs kept), one column per curve (metric in %)."""
    from rich.table import Table

    kept, by_method = _grid(report)
    total = report["total_heads"]
    flops = by_flops(report)
    table = Table(title=f"{report['primary_metric']} (%) on {report['eval_split']} vs {_axis_label(report)}", show_lines=False)
    table.add_column(_axis_label(report), justify="right")
    if not flops:
        table.add_column("% heads", justify="right")
    for m in by_method:
        table.add_column(m, justify="right")
    for k in kept:
        row = [_row_label(report, k) if flops else str(k)] + ([] if flops else [f"{100 * k / total:.0f}"])
        best = max((v[k] for v in by_method.values() if k in v), default=None)
        for v in by_method.values():
            cell = _pct(v.get(k))
            row.append(f"[bold green]{cell}[/]" if k in v and v[k] == best and len(by_method) > 1 else cell)
        table.add_row(*row)
    return table


def terminal_chart(report: dict, width: int = 61, height: int = 15) -> str:
    """A text chart of metric (%) versus heads kept (or FLOPs kept), one letter per curve (legend below)."""
    kept, by_method = _grid(report)
    flops = by_flops(report)
    hi_x = 1.0 if flops else report["total_heads"]
    lo_x = min(kept) if flops and kept else 0
    values = [v for d in by_method.values() for v in d.values()]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        hi = lo + 0.01
    canvas = [[" "] * width for _ in range(height)]
    marks = {}
    for method, d in by_method.items():
        mark = MARKERS.get(method, method[0].upper())
        if mark in marks.values():
            mark = next((c for c in method.upper() + "0123456789" if c.isalnum() and c not in marks.values()), "?")
        marks[method] = mark
        for k, v in d.items():
            x = round((hi_x - k) / max(hi_x - lo_x, 1e-9) * (width - 1))
            y = round((hi - v) / (hi - lo) * (height - 1))
            canvas[y][x] = mark if canvas[y][x] in (" ", mark) else "*"
    lines = []
    for i, row in enumerate(canvas):
        label = hi - (hi - lo) * i / (height - 1)
        lines.append(f"{100 * label:6.1f} |{''.join(row)}")
    lines.append(" " * 7 + "+" + "-" * width)
    left, right = ("100% FLOPs kept", f"{100 * lo_x:.0f}%") if flops else (f"{hi_x} heads kept", "0")
    lines.append(" " * 8 + left.ljust(width - len(right)) + right)
    items = [f"{marks[m]}={m}" for m in by_method] + ["*=several"]
    row = ""
    for item in items:
        if row and len(row) + len(item) + 2 > width:
            lines.append(" " * 8 + row.rstrip(", "))
            row = ""
        row += item + ", "
    lines.append(" " * 8 + row.rstrip(", "))
    return "\n".join(lines)


def chance_warning(chance: dict | None) -> str | None:
    """The warning line when the unpruned model is at chance (``chance``: the report's ``chance`` entry,
    :func:`prune_attattr.checks.chance_level`); None when it is not or the check did not apply."""
    from .checks import chance_message

    if not chance or not chance.get("at_chance"):
        return None
    return "WARNING: " + chance_message(chance)


def print_chance_warning(chance: dict | None, print_fn) -> None:
    """Print :func:`chance_warning` in bold red through ``print_fn`` (a rich console's ``print``), if any."""
    from rich.markup import escape

    text = chance_warning(chance)
    if text:
        print_fn(f"[bold red]{escape(text)}[/]")


def print_report(report: dict, console) -> None:
    """Print the curves table, the chart and the export summary with rich (and the chance-level
    warning last, where a reader of the log looks)."""
    from rich.panel import Panel

    console.print(curves_table(report))
    console.print(Panel(terminal_chart(report), title=f"{report['primary_metric']} (%) vs {_axis_label(report)}", expand=False))
    exp = report.get("export")
    if exp:
        neurons = f", {exp['neurons_kept']} neurons, {100 * exp['flops_fraction']:.0f}% FLOPs" if exp.get("flops_fraction") is not None and by_flops(report) else ""
        console.print(
            f"[bold]exported[/] {exp['method']} with {exp['heads_kept']}/{report['total_heads']} heads{neurons}: "
            f"{report['primary_metric']} {_pct(exp['metrics'][report['primary_metric']])}% "
            f"(unpruned {_pct(report['baseline'][report['primary_metric']])}%), "
            f"{exp['parameters']:,} parameters, {exp['checkpoint_mb']:.1f} MB"
            + (
                f"; ONNX max |diff| {exp['onnx']['max_abs_diff']:.2e}, latency {exp['onnx']['latency_pruned']['median_ms']:.1f} ms "
                f"vs {exp['onnx']['latency_unpruned']['median_ms']:.1f} ms unpruned"
                if exp.get("onnx")
                else ""
            )
        )
    print_chance_warning(report.get("chance"), console.print)


def write_json(report: dict, path: Path) -> None:
    """``report.json`` (indent 2), with ``method_settings`` (see :func:`method_settings`) added and, first,
    ``warnings``: a list of lines (the chance-level warning), empty when there is none."""
    warning = chance_warning(report.get("chance"))
    out = {"warnings": [warning] if warning else [], **report, "method_settings": method_settings(report)}
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


def write_markdown(report: dict, path: Path, plot_name: str | None = "curves.png") -> None:
    """``report.md``: run summary, timings, curves table, export summary."""
    kept, by_method = _grid(report)
    total = report["total_heads"]
    metric = report["primary_metric"]
    lines = [f"# prune-attattr report: {report['run_name']}", ""]
    warning = chance_warning(report.get("chance"))
    if warning:
        lines += [f"> **{warning}**", ""]
    lines.append(
        f"Model `{report['model']}`, task `{report['task']}`; {metric} on {report['eval_split']} "
        f"({report['eval_examples']} examples). Unpruned: "
        + ", ".join(f"{k} {_pct(v)}%" for k, v in report["baseline"].items() if k != "loss")
        + f". Importance on {report['importance_examples']} examples ({report['importance_source']})."
    )
    lines += _settings_lines(report)
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    if by_method:
        axis = _axis_label(report)
        lines += ["", f"## {metric} (%) versus {axis}", ""]
        if by_flops(report):
            lines += [
                "FLOPs per token at the dev split's mean length (`prune_attattr.cost.unit_flops`), as a fraction of the "
                "unpruned model's; heads and feed-forward neurons chosen together under each budget (`prune_attattr.search`). "
                "Curves named `(heads)` prune heads only; accuracy_difference and attention score heads only.",
                "",
            ]
        if plot_name:
            lines += [f"![{metric} vs {axis}]({plot_name})", ""]
        lines.append(f"| {axis} | " + " | ".join(by_method) + " |")
        lines.append("| ---: | " + " | ".join("---:" for _ in by_method) + " |")
        for k in kept:
            lines.append(f"| {_row_label(report, k)} | " + " | ".join(_pct(v.get(k)) for v in by_method.values()) + " |")
    if report.get("export_refused"):
        lines += ["", "## Export", "", f"Nothing exported: {report['export_refused']}."]
    exp = report.get("export")
    if exp:
        lines += ["", "## Export", ""]
        lines.append(f"- method `{exp['method']}`, rule: {exp['rule']}")
        lines.append(f"- heads kept {exp['heads_kept']}/{total}; pruned heads per layer: `{json.dumps(exp['pruned_heads'])}`")
        if exp.get("pruned_neurons"):
            lines.append(
                f"- feed-forward neurons kept {exp['neurons_kept']}; pruned per layer: "
                + ", ".join(f"layer {k}: {len(v)}" for k, v in exp["pruned_neurons"].items())
            )
        if exp.get("flops_fraction") is not None:
            lines.append(f"- FLOPs per token: {100 * exp['flops_fraction']:.1f}% of the unpruned model's (dev mean length)")
        lines.append(f"- {metric}: {_pct(exp['metrics'][metric])}% (unpruned {_pct(report['baseline'][metric])}%)")
        lines.append(f"- parameters {exp['parameters']:,} (unpruned {report['baseline_parameters']:,}); checkpoint {exp['checkpoint_mb']:.1f} MB")
        lines.append(f"- reload max |logit diff|: {exp['reload_max_abs_diff']:.2e}")
        if exp.get("onnx"):
            o = exp["onnx"]
            lines.append(
                f"- ONNX: max |logit diff| vs PyTorch {o['max_abs_diff']:.2e}; latency (batch {o['latency_batch']}, "
                f"seq {o['latency_seq']}) median {o['latency_pruned']['median_ms']:.2f} ms vs "
                f"{o['latency_unpruned']['median_ms']:.2f} ms unpruned ({o['speedup']:.2f}x)"
            )
        lines.append("- reload: `prune_attattr.load_pruned('model')`")
        lines += deployment_markdown(exp.get("deployment"))
    lines += recovery_markdown(report, "tradeoff.png" if plot_name else None)
    if report.get("analyses"):
        lines += analyses_markdown(report["analyses"])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(report: dict, path: Path) -> None:
    """PNG plot of metric (%) versus heads kept (or FLOPs kept, measured), all curves (matplotlib, Agg backend)."""
    plt = _plt()
    metric = report["primary_metric"]
    flops = by_flops(report)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, steps in report["curves"].items():
        pts = sorted(((100 * s["flops_fraction"] if flops else s["heads_kept"]), 100 * s["metrics"][metric]) for s in steps)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3.5, label=method, ls="--" if "(" in method else "-")
    ax.axhline(100 * report["baseline"][metric], color="grey", lw=0.8, ls="--", label="unpruned")
    ax.set_xlabel("FLOPs per token kept (%)" if flops else "heads kept")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{report['task']}: {metric} vs {_axis_label(report)} ({report['model_short']})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_neuron_heatmaps(report: dict, path: Path) -> bool:
    """PNG of each method's feed-forward neuron importance, one row of panels per method: layers x neurons,
    each layer's scores sorted in decreasing order (log scale where positive). False without neuron scores."""
    scores = report.get("neuron_importance") or {}
    if not scores:
        return False
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(len(scores), 1, figsize=(8, 1.4 + 1.2 * len(scores)), dpi=120, squeeze=False)
    for ax, (method, table) in zip(axes[:, 0], scores.items()):
        grid = -np.sort(-np.asarray(table, dtype=float), axis=1)
        positive = grid > 0
        shown = np.where(positive, np.log10(np.where(positive, grid, 1.0)), np.nan) if positive.all(axis=None) else grid
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_ylabel("layer")
        ax.set_title(f"{method}" + (" (log10)" if shown is not grid else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("neurons, sorted by importance within each layer")
    _save(fig, path)
    return True


# ---- recovery (issue 10): cost and accuracy of the tried models, metric-versus-latency plot --------


def _mflops(x: float) -> str:
    return f"{x / 1e6:.2f}"


def recovery_table(report: dict):
    """A rich Table of the unpruned model and every recovered candidate: cost, latency, metric before/after."""
    from rich.table import Table

    rec = report["recovery"]
    metric = report["primary_metric"]
    table = Table(title=f"recovery: {metric} (%) and cost per model ({rec['schedule']} pruning)")
    for col in ("model", "heads", "neurons", "FLOPs %", "params", "attn MFLOP/tok", "total MFLOP/tok", "ONNX ms", "before", "after", "min"):
        table.add_column(col, justify="right")
    for m in rec["models"]:
        table.add_row(
            m["label"] + (" (exported)" if m.get("exported") else ""),
            str(m["heads_kept"]),
            str(m.get("neurons_kept", "-")),
            f"{100 * m['flops_fraction']:.1f}" if m.get("flops_fraction") is not None else "-",
            f"{m['parameters'] / 1e6:.2f}M",
            _mflops(m["attention_flops_per_token"]),
            _mflops(m["total_flops_per_token"]),
            f"{m['latency_ms']:.2f}" if m.get("latency_ms") is not None else "-",
            _pct(m["metric_before"]),
            _pct(m.get("metric_after")),
            f"{m['recovery_minutes']:.1f}" if m.get("recovery_minutes") is not None else "-",
        )
    return table


def recovery_markdown(report: dict, plot_name: str | None = "tradeoff.png") -> list[str]:
    """``report.md`` lines of the recovery section (empty when the run had no recovery)."""
    rec = report.get("recovery")
    if not rec:
        return []
    metric = report["primary_metric"]
    s = rec["settings"]
    lines = ["", "## Recovery", ""]
    if s.get("mode") == "least_squares":
        lines.append(
            f"Pruned models recovered without training by least squares (Kwon et al. 2022): layer by layer, the kept heads' "
            f"and neurons' scales that best reproduce the unpruned model's sublayer outputs on {s['least_squares_examples']} "
            f"training examples, folded into the weights. Pruning schedule: {rec['schedule']}."
        )
    else:
        lines.append(
            f"Pruned models fine-tuned on {rec['train_examples']} training examples (importance examples held out), "
            f"{s['epochs']} epoch(s), lr {s['learning_rate']:g}, loss (1 - alpha) CE + alpha T^2 KL(teacher || student) "
            f"with alpha {s['alpha']:g}, T {s['temperature']:g}; teacher = the unpruned model (logits computed once"
            + (f", {rec['teacher_seconds']:.0f} s" if rec.get("teacher_seconds") is not None else "")
            + f"). Pruning schedule: {rec['schedule']}."
        )
    tried = ", ".join(m["label"] for m in rec["models"][1:])
    lines.append(f"Candidates tried, in order: {tried}; exported: {next(m['label'] for m in rec['models'][1:] if m.get('exported'))}.")
    seq = rec["models"][0]["seq_len"]
    lines += [
        "",
        f"FLOPs per token analytic at {seq} tokens (`prune_attattr.cost.flops_per_token`); ONNX Runtime latency "
        f"median of one batch of the export stage's latency inputs.",
        "",
    ]
    if plot_name and all(m.get("latency_ms") is not None for m in rec["models"]):
        lines += [f"![{metric} vs latency]({plot_name})", ""]
    lines.append(
        f"| model | heads | neurons | FLOPs kept (%) | parameters | attention MFLOP/token | total MFLOP/token | ONNX ms | "
        f"{metric} before (%) | after recovery (%) | recovery min |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in rec["models"]:
        lat = f"{m['latency_ms']:.2f}" if m.get("latency_ms") is not None else "-"
        mins = f"{m['recovery_minutes']:.1f}" if m.get("recovery_minutes") is not None else "-"
        name = m["label"] + (" **(exported)**" if m.get("exported") else "")
        lines.append(
            f"| {name} | {m['heads_kept']} | {m.get('neurons_kept', '-')} | "
            + (f"{100 * m['flops_fraction']:.1f}" if m.get("flops_fraction") is not None else "-")
            + f" | {m['parameters']:,} | {_mflops(m['attention_flops_per_token'])} | "
            f"{_mflops(m['total_flops_per_token'])} | {lat} | {_pct(m['metric_before'])} | {_pct(m.get('metric_after'))} | {mins} |"
        )
    return lines


def write_tradeoff_plot(report: dict, path: Path) -> bool:
    """PNG of metric (%) versus measured ONNX Runtime speed-up over the unpruned model, one point per model
    the budget search tried, before (hollow) and after (filled) recovery; points, not joined (the order
    in which the search tried them means nothing). Returns False (nothing written) without latencies."""
    rec = report.get("recovery")
    if not rec or not all(m.get("latency_ms") is not None for m in rec["models"]):
        return False
    plt = _plt()
    metric = report["primary_metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = rec["models"][0]
    ax.scatter([1.0], [100 * base["metric_before"]], color="black", marker="s", label="unpruned")
    cands = rec["models"][1:]
    speed = [base["latency_ms"] / m["latency_ms"] for m in cands]
    ax.scatter(speed, [100 * m["metric_before"] for m in cands], facecolors="none", edgecolors="tab:blue", label="pruned, before recovery")
    ax.scatter(speed, [100 * m["metric_after"] for m in cands], color="tab:blue", label="after recovery")
    for x, m in zip(speed, cands):
        ax.annotate(m["label"].replace(" neurons", "n").replace(" heads", "h") + (" (exported)" if m.get("exported") else ""),
                    (x, 100 * m["metric_after"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(x=0.2)
    ax.axhline(100 * base["metric_before"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"ONNX Runtime speed-up vs unpruned (batch {rec['latency_batch']}, one run each)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{report['task']}: {metric} vs speed-up ({report['model_short']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


# ---- deployment (issue 16): the shipped graphs timed side by side -------------------------------


def _ms(row: dict, b: str) -> str:
    v = row["ms"].get(b)
    return "-" if v is None else f"{v:.2f}"


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
    cells = []
    for r in bench["rows"]:
        row = [r["label"] + (" (deployed)" if r.get("deployed") else ""), r["file"], _pct(r.get("metric"))]
        for b in sizes:
            row += [_ms(r, b), _times(r, "speedup", b)]
        mb = r.get("mb")
        row += ["-" if mb is None else f"{mb:.1f}", "-" if not (mb and ref_mb) else f"{ref_mb / mb:.2f}x"]
        cells.append(row)
    return head, cells


def _deployment_caption(bench: dict) -> str:
    threads = bench.get("threads") or "all"
    return (
        f"ONNX Runtime on {bench.get('cpu', 'this CPU')}, {threads} thread(s); median over {bench.get('rounds')} alternating "
        f"rounds of the mean ms per call on {bench.get('sentences')} dev sentences; speed-up and size against the first row"
        + (f"; metric from {bench['metric_source']}" if bench.get("metric_source") else "")
    )


def deployment_table(bench: dict):
    """A rich Table of the timed graphs (``deployment["bench"]`` of :func:`prune_attattr.deployment.deploy_run`,
    or :func:`prune_attattr.bench.bench_run`'s result): per row the metric (%), median ms and speed-up at
    each batch size, file size (MiB) and how many times smaller than the first row."""
    from rich.table import Table

    head, cells = _deployment_cells(bench)
    table = Table(title="deployment: speed and size against the first row", caption=_deployment_caption(bench))
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in cells:
        table.add_row(*row)
    return table


def deployment_markdown(deployment: dict) -> list[str]:
    """``report.md`` lines of the deployment section: which file ships, the budget decision, the timing table.

    ``deployment``: the report's ``export.deployment`` (:func:`prune_attattr.deployment.deploy_run`);
    empty list when None.
    """
    if not deployment:
        return []
    bench, pruned = deployment["bench"], deployment["pruned"]
    lines = ["", "## Deployment", ""]
    q = pruned.get("quantization")
    shipped = f"`onnx/{pruned['deployed']}` is {pruned['precision']}"
    if pruned["files"].get("float32") and pruned["files"]["float32"] != pruned["deployed"]:
        shipped += f"; the float32 graph is `onnx/{pruned['files']['float32']}`"
    if q:
        shipped += f" (int8: {q['method']}, weights {q['weights']}, activations {q['activations']})"
    lines.append(f"- shipped: {shipped}")
    fused = pruned["fusion"].get(pruned["precision"], {})
    lines.append(
        "- fused ONNX Runtime kernels: " + (", ".join(f"{k} x{v}" for k, v in fused.get("ops", {}).items()) or "none")
        + (f" ({fused['note']})" if fused.get("note") else "")
    )
    if pruned.get("max_abs_diff_int8_vs_float32") is not None:
        lines.append(f"- int8 max |logit diff| vs float32 on the check batches: {pruned['max_abs_diff_int8_vs_float32']:.3g}")
    base = deployment.get("baseline") or {}
    if deployment.get("floor") is not None:
        lines.append(
            f"- budget: {deployment['metric']} >= {_pct(deployment['floor'])}% (unpruned {_pct(base.get('value'))}%, {base.get('source')})"
        )
    if pruned.get("note"):
        lines.append(f"- **{pruned['note']}**")
    head, cells = _deployment_cells(bench)
    lines += ["", _deployment_caption(bench) + ".", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in head[2:]) + " |")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines += ["", "Re-time on another machine: `prune-attattr bench <run folder>`."]
    return lines


# --- per-method settings ------------------------------------------------------------------------

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


# --- analyses rendering (data from prune_attattr.analyses.run_analyses) -----------------------------


def _plt():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Lay out, write and close a matplotlib figure (every PNG of the report)."""
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_analyses_files(summary: dict, out_dir: Path) -> None:
    """Write each analysis' JSON and PNG under ``out_dir`` (``tree_<i>``, ``effectiveness``,
    ``connections``, ``universality``, ``triggers``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in summary.get("trees", []):
        _dump(out_dir / f"{t['file']}.json", t)
        draw_tree(t, out_dir / f"{t['file']}.png")
    for name, plot in (("effectiveness", plot_effectiveness), ("connections", plot_connections), ("universality", plot_universality)):
        if summary.get(name):
            _dump(out_dir / f"{name}.json", summary[name])
            plot(summary[name], out_dir / f"{name}.png")
    if summary.get("triggers"):
        _dump(out_dir / "triggers.json", {"labels": summary.get("labels"), **summary["triggers"]})
        plot_triggers(summary["triggers"], summary.get("labels") or [], out_dir / "triggers.png")


def draw_tree(tree: dict, path: Path) -> None:
    """PNG of an attribution tree (``AttributionTree.to_dict()``): tokens on the x axis by position,
    layers on the y axis, edges key -> query; the title names the predicted class."""
    plt = _plt()
    tokens, n_layers = tree["tokens"], tree["num_layers"]
    joined = {node["position"]: node["layer"] for node in tree["nodes"]}
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * n + 1), 0.45 * n_layers + 2.5), dpi=130)
    for t, layer in joined.items():  # a token's representation exists from the input up to where it joins
        ax.plot([t, t], [0, layer], color="0.85", lw=1, zorder=0)
    for e in tree["edges"]:
        ax.annotate("", xy=(e["query"], e["layer"] + 1), xytext=(e["key"], e["layer"]), arrowprops=dict(arrowstyle="->", color=plt.cm.viridis(min(1.0, e["score"])), lw=1 + 2 * e["score"]))
        ax.text((e["query"] + e["key"]) / 2, e["layer"] + 0.5, f"{e['score']:.2f}", fontsize=7, ha="center", color="0.3")
    for t, layer in joined.items():
        ax.scatter([t], [layer], s=70, color="crimson" if t == tree["root"] else "tab:blue", zorder=3)
        ax.text(t, layer + 0.18, tokens[t], fontsize=8, ha="center", va="bottom", zorder=4)
    ax.set_xticks(range(n))
    ax.set_xticklabels(tokens, rotation=60, fontsize=8)
    ax.set_yticks(range(n_layers + 1))
    ax.set_yticklabels(["input"] + [f"layer {i}" for i in range(1, n_layers + 1)], fontsize=8)
    ax.set_ylim(-0.5, n_layers + 0.8)
    ax.set_title(f"attribution tree (tau = {tree['threshold']}); prediction: {tree['prediction']}", fontsize=9)
    _save(fig, path)


def plot_effectiveness(result: dict, path: Path) -> None:
    """PNG like the paper's Figure 2: accuracy vs heads masked in every layer, attribution vs attention
    (solid: largest first; dashed: smallest first, the sanity check)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    colors = {"attribution": "tab:red", "attention": "tab:blue"}
    for r, by_order in result["accuracy"].items():
        for o, ys in by_order.items():
            ax.plot(result["k"], [100 * y for y in ys], marker="o" if o == "largest" else None, markersize=4, ls="-" if o == "largest" else "--", color=colors.get(r), label=f"{r} scores, {o} first")
    ax.set_xlabel("heads masked in every layer (per example)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(result["k"])
    ax.set_title(f"effectiveness of attribution ({result['examples']} examples; {result['quadrature']} m = {result['steps']}, gold label)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_connections(result: dict, path: Path) -> None:
    """PNG: accuracy vs fraction of single attention connections pruned, both orders."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [100 * f for f in result["fractions"]]
    ax.plot(xs, [100 * a for a in result["attribution"]], marker="o", label="pruned by attribution (largest first)")
    ax.plot(xs, [100 * a for a in result["attention"]], marker="s", label="pruned by attention score (largest first)")
    ax.set_xlabel("attention connections pruned per example (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"pruning single connections ({result['examples']} examples; not the paper's head-level experiment)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_universality(result: dict, path: Path) -> None:
    """PNG: scatter of the first set's head importance against every other set's, with Pearson r."""
    import numpy as np

    plt = _plt()
    names = list(result["maps"])
    first = np.asarray(result["maps"][names[0]]).flatten()
    others = names[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(4.2 * len(others), 4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], others):
        y = np.asarray(result["maps"][name]).flatten()
        r = next(p["r"] for p in result["pearson"] if p["a"] == names[0] and p["b"] == name)
        ax.scatter(first, y, s=12, alpha=0.7)
        ax.set_xlabel(f"{names[0]}", fontsize=8)
        ax.set_ylabel(f"{name}", fontsize=8)
        ax.set_title(f"Pearson r = {r:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("head importance (AttAttr, summed over examples)", fontsize=9)
    _save(fig, path)


def _trigger_name(p: dict) -> str:
    return " ".join(i["token"] for i in p["inserted"]) or "(nothing)"


def plot_triggers(result: dict, labels: list[str], path: Path) -> None:
    """PNG: per-class accuracy before and after each of the paper-table triggers (grouped bars)."""
    import numpy as np

    plt = _plt()
    by_rank = {p["rank"]: p for p in result["patterns"]}
    shown = [by_rank[r] for r in result["paper_table"]["patterns"]]
    if not shown:
        return
    names = labels or [str(c) for c in range(len(result["accuracy_before"]))]
    groups = ["before"] + [f"#{p['rank']}: {_trigger_name(p)}" for p in shown]
    x = np.arange(len(groups))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4.2), dpi=120)
    for c, name in enumerate(names):
        ys = [result["accuracy_before"][c]] + [p["accuracy_after"][c] for p in shown]
        ax.bar(x + c * width, [100 * (y or 0) for y in ys], width, color=plt.cm.tab10(c), label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2)
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("accuracy per class (%)")
    mean = result["paper_table"]["mean_drop_points"]
    ax.set_title("adversarial triggers: the 3 with the largest mean drop (#: rank by attribution)" + (f"; mean drop {mean:.1f} points" if mean is not None else ""), fontsize=8)
    ax.legend(fontsize=7, ncol=len(names))
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def analyses_markdown(summary: dict) -> list[str]:
    """Markdown lines of the report's "Analyses" section."""
    if not summary or not any(k in summary for k in ("trees", "effectiveness", "connections", "universality", "triggers")):
        return []
    labels = summary.get("labels") or []
    lines = ["", "## Analyses", ""]
    for t in summary.get("trees", []):
        toks = t["tokens"]
        lines += [
            f"### Attribution tree: “{t['text']}” (prediction: {t['prediction']})",
            "",
            f"{t['quadrature']} m = {t['steps']}, predicted label, tau = {t['threshold']}. Root `{toks[t['root']]}`; edges key -> query (layer, score):",
            "",
        ]
        lines += [f"- `{toks[e['key']]}` -> `{toks[e['query']]}` (layer {e['layer'] + 1}, {e['score']:.2f})" for e in t["edges"]]
        lines += ["", f"![tree](analyses/{t['file']}.png)", ""]
    eff = summary.get("effectiveness")
    if eff:
        lines += [
            "### Effectiveness (section 4.1): the top-k heads of every layer masked per example",
            "",
            f"{eff['examples']} dev examples; heads ranked per example by max-pooled attribution ({eff['quadrature']} m = {eff['steps']}, gold label) or by max attention probability.",
            "",
            "![effectiveness](analyses/effectiveness.png)",
            "",
            "| heads masked per layer | attribution, largest first | attention, largest first | attribution, smallest first | attention, smallest first |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        a = eff["accuracy"]
        for i, k in enumerate(eff["k"]):
            lines.append(f"| {k} | {_acc(a['attribution']['largest'][i])} | {_acc(a['attention']['largest'][i])} | {_acc(a['attribution']['smallest'][i])} | {_acc(a['attention']['smallest'][i])} |")
        lines.append("")
    con = summary.get("connections")
    if con:
        lines += ["### Connection pruning (a variant of 4.1, not the paper's experiment)", "", "![connections](analyses/connections.png)", ""]
        lines += ["| connections pruned | by attribution | by attention |", "| ---: | ---: | ---: |"]
        lines += [f"| {100 * f:g}% | {_acc(x)} | {_acc(y)} |" for f, x, y in zip(con["fractions"], con["attribution"], con["attention"])]
        lines.append("")
    uni = summary.get("universality")
    if uni:
        lines += ["### Universality of important heads (section 4.2)", "", "![universality](analyses/universality.png)", "", "| set A | set B | Pearson r |", "| --- | --- | ---: |"]
        lines += [f"| {p['a']} | {p['b']} | {p['r']:.3f} |" for p in uni["pearson"]]
        lines.append("")
    trig = summary.get("triggers")
    if trig:
        s = trig["settings"]
        names = labels or [str(c) for c in range(len(trig["accuracy_before"]))]
        lines += [
            "### Adversarial triggers (section 6, as the official code)",
            "",
            f"Patterns from the first {s['examples']} training examples ({trig['source_examples']} used"
            + (f", under {s['min_tokens']} tokens skipped" if s["min_tokens"] else "")
            + f"), predicted label, {s['quadrature']} m = {s['steps']}: {trig['patterns_found']} patterns, {trig['patterns_valid']} with score >= {s['threshold']}, "
            f"{trig['patterns_attacked']} attacked. Each is inserted into every one of {trig['dev_examples']} dev examples ("
            + ", ".join(f"{n} {c}" for n, c in zip(trig["dev_per_class"], names))
            + ").",
            "",
            "![triggers](analyses/triggers.png)",
            "",
        ]
        by_rank = {p["rank"]: p for p in trig["patterns"]}
        table = trig["paper_table"]
        if table["patterns"]:
            lines += ["The 3 triggers with the largest mean accuracy drop (the paper's Table 3; # = rank by attribution):", ""]
            head = "| class | before | " + " | ".join(f"#{r}: `{_trigger_name(by_rank[r])}`" for r in table["patterns"]) + " | avg. drop (points) |"
            lines += [head, "| --- | ---: | " + " | ".join("---:" for _ in table["patterns"]) + " | ---: |"]
            for c, name in enumerate(names):
                cells = " | ".join(_acc(by_rank[r]["accuracy_after"][c]) for r in table["patterns"])
                d = table["avg_drop_per_class"][c]
                lines.append(f"| {name} | {_acc(trig['accuracy_before'][c])} | {cells} | {'-' if d is None else f'{d:.1f}'} |")
            lines += ["", f"Mean drop over classes and the 3 triggers: {table['mean_drop_points']:.1f} points.", ""]
        lines += ["All attacked patterns:", ""]
        lines.append("| # | score | layer-head | top-1 (query, key) | top-2 (query, key) | inserted | " + " | ".join(f"{n} after" for n in names) + " | mean drop |")
        lines.append("| ---: | ---: | --- | --- | --- | --- | " + " | ".join("---:" for _ in names) + " | ---: |")
        for p in trig["patterns"]:
            md = p["mean_drop_points"]
            lines.append(
                f"| {p['rank']} | {p['score']:.3f} | {p['layer'] + 1}-{p['head'] + 1} | `{p['top1_tokens'][0]}`, `{p['top1_tokens'][1]}` | `{p['top2_tokens'][0]}`, `{p['top2_tokens'][1]}` | "
                + f"`{_trigger_name(p)}` | "
                + " | ".join(_acc(a) for a in p["accuracy_after"])
                + f" | {'-' if md is None else f'{md:.1f}'} |"
            )
        lines.append("")
    return lines
