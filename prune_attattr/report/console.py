"""Rich console output of a run: curves table, terminal chart, recovery and deployment tables.

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the same
content as ``report.json``), so a notebook can re-render a saved run.
"""

from __future__ import annotations

from .common import MARKERS, _axis_label, _deployment_caption, _deployment_cells, _grid, _loyalty, _mflops, _pct, _row_label, by_flops, chance_warning, report_warnings

__all__ = ["curves_table", "terminal_chart", "print_chance_warning", "print_report", "recovery_table", "deployment_table"]


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


def print_chance_warning(chance: dict | None, print_fn) -> None:
    """Print :func:`chance_warning` in bold red through ``print_fn`` (a rich console's ``print``), if any."""
    from rich.markup import escape

    text = chance_warning(chance)
    if text:
        print_fn(f"[bold red]{escape(text)}[/]")


def print_report(report: dict, console) -> None:
    """Print the curves table, the chart and the export summary with rich (and the warnings last, in bold
    red, where a reader of the log looks: :func:`prune_attattr.report.common.report_warnings`)."""
    from rich.markup import escape
    from rich.panel import Panel

    console.print(curves_table(report))
    console.print(Panel(terminal_chart(report), title=f"{report['primary_metric']} (%) vs {_axis_label(report)}", expand=False))
    exp = report.get("export")
    if exp:
        neurons = f", {exp['neurons_kept']} neurons, {100 * exp['flops_fraction']:.0f}% FLOPs" if exp.get("flops_fraction") is not None and by_flops(report) else ""
        if exp.get("removed_sublayers"):
            neurons += f", {sum(len(v) for v in exp['removed_sublayers'].values())} whole sublayers removed"
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
    for line in report_warnings(report):
        console.print(f"[bold red]{escape(line)}[/]")


def recovery_table(report: dict):
    """A rich Table of the unpruned model and every recovered candidate: cost, latency, metric and loyalty
    to the unpruned model (label / probability, %; Xu et al. 2021) before and after recovery."""
    from rich.table import Table

    rec = report["recovery"]
    metric = report["primary_metric"]
    table = Table(title=f"recovery: {metric} (%) and cost per model ({rec['schedule']} pruning)")
    cols = ("model", "heads", "neurons", "FLOPs %", "params", "attn MFLOP/tok", "total MFLOP/tok", "ONNX ms", "before", "after",
            "loyal before", "loyal after", "min")
    for col in cols:
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
            _loyalty(m.get("loyalty_before")),
            _loyalty(m.get("loyalty_after")),
            f"{m['recovery_minutes']:.1f}" if m.get("recovery_minutes") is not None else "-",
        )
    table.caption = "loyalty: label / probability (%) against the unpruned model (Xu et al. 2021)"
    return table


def deployment_table(bench: dict):
    """A rich Table of the timed graphs (``deployment["bench"]`` of :func:`prune_attattr.deploy.deployment.deploy_run`,
    or :func:`prune_attattr.deploy.bench.bench_run`'s result): per row the metric (%), median ms and speed-up at
    each batch size, file size (MiB), how many times smaller than the first row, and (when measured) how
    many dev predictions differ between batch 1 and batch 16. The caption names the CPU and whether it
    lists avx512_vnni and amx_int8 (:func:`prune_attattr.deploy.bench.cpu_name`)."""
    from rich.table import Table

    head, cells = _deployment_cells(bench)
    table = Table(title="deployment: speed and size against the first row", caption=_deployment_caption(bench))
    for i, col in enumerate(head):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in cells:
        table.add_row(*row)
    return table
