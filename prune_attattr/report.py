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
    "recovery_markdown",
    "recovery_table",
    "write_tradeoff_plot",
]

MARKERS = {"attattr": "A", "taylor": "T", "accuracy_difference": "D", "attention": "S", "random": "R"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _grid(report: dict) -> tuple[list[int], dict[str, dict[int, float]]]:
    metric = report["primary_metric"]
    by_method = {m: {s["heads_kept"]: s["metrics"][metric] for s in steps} for m, steps in report["curves"].items()}
    kept = sorted({k for v in by_method.values() for k in v}, reverse=True)
    return kept, by_method


def curves_table(report: dict):
    """A rich Table: one row per number of heads kept, one column per method (metric in %)."""
    from rich.table import Table

    kept, by_method = _grid(report)
    total = report["total_heads"]
    table = Table(title=f"{report['primary_metric']} (%) on {report['eval_split']} vs heads kept", show_lines=False)
    table.add_column("heads kept", justify="right")
    table.add_column("% heads", justify="right")
    for m in by_method:
        table.add_column(m, justify="right")
    for k in kept:
        row = [str(k), f"{100 * k / total:.0f}"]
        best = max((v[k] for v in by_method.values() if k in v), default=None)
        for v in by_method.values():
            cell = _pct(v.get(k))
            row.append(f"[bold green]{cell}[/]" if k in v and v[k] == best and len(by_method) > 1 else cell)
        table.add_row(*row)
    return table


def terminal_chart(report: dict, width: int = 61, height: int = 15) -> str:
    """A text chart of metric (%) versus heads kept, one letter per method (legend below)."""
    kept, by_method = _grid(report)
    total = report["total_heads"]
    values = [v for d in by_method.values() for v in d.values()]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        hi = lo + 0.01
    canvas = [[" "] * width for _ in range(height)]
    for method, d in by_method.items():
        mark = MARKERS.get(method, method[0].upper())
        for k, v in d.items():
            x = round((total - k) / total * (width - 1))
            y = round((hi - v) / (hi - lo) * (height - 1))
            canvas[y][x] = mark if canvas[y][x] in (" ", mark) else "*"
    lines = []
    for i, row in enumerate(canvas):
        label = hi - (hi - lo) * i / (height - 1)
        lines.append(f"{100 * label:6.1f} |{''.join(row)}")
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"{total} heads kept".ljust(width - 6) + "0")
    items = [f"{MARKERS.get(m, m[0].upper())}={m}" for m in by_method] + ["*=several"]
    row = ""
    for item in items:
        if row and len(row) + len(item) + 2 > width:
            lines.append(" " * 8 + row.rstrip(", "))
            row = ""
        row += item + ", "
    lines.append(" " * 8 + row.rstrip(", "))
    return "\n".join(lines)


def print_report(report: dict, console) -> None:
    """Print the curves table, the chart and the export summary with rich."""
    from rich.panel import Panel

    console.print(curves_table(report))
    console.print(Panel(terminal_chart(report), title=f"{report['primary_metric']} (%) vs heads kept", expand=False))
    exp = report.get("export")
    if exp:
        console.print(
            f"[bold]exported[/] {exp['method']} with {exp['heads_kept']}/{report['total_heads']} heads: "
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


def write_json(report: dict, path: Path) -> None:
    """``report.json`` (indent 2)."""
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def write_markdown(report: dict, path: Path, plot_name: str | None = "curves.png") -> None:
    """``report.md``: run summary, timings, curves table, export summary."""
    kept, by_method = _grid(report)
    total = report["total_heads"]
    metric = report["primary_metric"]
    lines = [f"# prune-attattr report: {report['run_name']}", ""]
    lines.append(
        f"Model `{report['model']}`, task `{report['task']}`; {metric} on {report['eval_split']} "
        f"({report['eval_examples']} examples). Unpruned: "
        + ", ".join(f"{k} {_pct(v)}%" for k, v in report["baseline"].items() if k != "loss")
        + f". Importance on {report['importance_examples']} examples ({report['importance_source']})."
    )
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    if by_method:
        lines += ["", f"## {metric} (%) versus heads kept", ""]
        if plot_name:
            lines += [f"![{metric} vs heads kept]({plot_name})", ""]
        lines.append("| heads kept | " + " | ".join(by_method) + " |")
        lines.append("| ---: | " + " | ".join("---:" for _ in by_method) + " |")
        for k in kept:
            lines.append(f"| {k}/{total} | " + " | ".join(_pct(v.get(k)) for v in by_method.values()) + " |")
    exp = report.get("export")
    if exp:
        lines += ["", "## Export", ""]
        lines.append(f"- method `{exp['method']}`, rule: {exp['rule']}")
        lines.append(f"- heads kept {exp['heads_kept']}/{total}; pruned heads per layer: `{json.dumps(exp['pruned_heads'])}`")
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
    lines += recovery_markdown(report, "tradeoff.png" if plot_name else None)
    if report.get("analyses"):
        from .analyses import markdown_section

        lines += markdown_section(report["analyses"])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(report: dict, path: Path) -> None:
    """PNG plot of metric (%) versus heads kept, all methods (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, by_method = _grid(report)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, d in by_method.items():
        xs = sorted(d, reverse=True)
        ax.plot(xs, [100 * d[x] for x in xs], marker="o", markersize=3.5, label=method)
    ax.axhline(100 * report["baseline"][report["primary_metric"]], color="grey", lw=0.8, ls="--", label="unpruned")
    ax.set_xlabel("heads kept")
    ax.set_ylabel(f"{report['primary_metric']} (%)")
    ax.set_title(f"{report['task']}: {report['primary_metric']} vs heads kept ({report['model_short']})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- recovery (issue 10): cost and accuracy of the tried models, metric-versus-latency plot --------


def _mflops(x: float) -> str:
    return f"{x / 1e6:.2f}"


def recovery_table(report: dict):
    """A rich Table of the unpruned model and every recovered candidate: cost, latency, metric before/after."""
    from rich.table import Table

    rec = report["recovery"]
    metric = report["primary_metric"]
    table = Table(title=f"recovery: {metric} (%) and cost per model ({rec['schedule']} pruning)")
    for col in ("model", "heads", "params", "attn MFLOP/tok", "total MFLOP/tok", "ONNX ms", "before", "after", "min"):
        table.add_column(col, justify="right")
    for m in rec["models"]:
        table.add_row(
            m["label"] + (" (exported)" if m.get("exported") else ""),
            str(m["heads_kept"]),
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
    lines.append(
        f"Pruned models fine-tuned on {rec['train_examples']} training examples (importance examples held out), "
        f"{s['epochs']} epoch(s), lr {s['learning_rate']:g}, loss (1 - alpha) CE + alpha T^2 KL(teacher || student) "
        f"with alpha {s['alpha']:g}, T {s['temperature']:g}; teacher = the unpruned model (logits computed once"
        + (f", {rec['teacher_seconds']:.0f} s" if rec.get("teacher_seconds") is not None else "")
        + f"). Pruning schedule: {rec['schedule']}."
    )
    lines.append(f"Candidates tried (heads kept, in order): {rec['tried_heads']}; exported: {rec['exported_heads']} heads.")
    seq = rec["models"][0]["seq_len"]
    lines += [
        "",
        f"FLOPs per token analytic at {seq} tokens (`prune_attattr.cost.flops_per_token`); ONNX Runtime latency "
        f"median of one batch of the export stage's latency inputs.",
        "",
    ]
    if plot_name and all(m.get("latency_ms") is not None for m in rec["models"]):
        lines += [f"![{metric} vs latency]({plot_name})", ""]
    lines.append(f"| model | heads | parameters | attention MFLOP/token | total MFLOP/token | ONNX ms | {metric} before (%) | after recovery (%) | recovery min |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in rec["models"]:
        lat = f"{m['latency_ms']:.2f}" if m.get("latency_ms") is not None else "-"
        mins = f"{m['recovery_minutes']:.1f}" if m.get("recovery_minutes") is not None else "-"
        name = m["label"] + (" **(exported)**" if m.get("exported") else "")
        lines.append(
            f"| {name} | {m['heads_kept']} | {m['parameters']:,} | {_mflops(m['attention_flops_per_token'])} | "
            f"{_mflops(m['total_flops_per_token'])} | {lat} | {_pct(m['metric_before'])} | {_pct(m.get('metric_after'))} | {mins} |"
        )
    return lines


def write_tradeoff_plot(report: dict, path: Path) -> bool:
    """PNG of metric (%) versus measured ONNX latency (ms): the unpruned model and each recovered candidate,
    before (hollow) and after (filled) recovery. Returns False (nothing written) without latencies."""
    rec = report.get("recovery")
    if not rec or not all(m.get("latency_ms") is not None for m in rec["models"]):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["primary_metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = rec["models"][0]
    ax.scatter([base["latency_ms"]], [100 * base["metric_before"]], color="black", marker="s", label="unpruned")
    cands = sorted(rec["models"][1:], key=lambda m: m["latency_ms"])
    xs = [m["latency_ms"] for m in cands]
    ax.plot(xs, [100 * m["metric_before"] for m in cands], ls=":", marker="o", mfc="none", color="tab:blue", label="pruned, before recovery")
    ax.plot(xs, [100 * m["metric_after"] for m in cands], ls="-", marker="o", color="tab:blue", label="after recovery")
    for m in cands:
        ax.annotate(f"{m['heads_kept']}h" + (" (exported)" if m.get("exported") else ""), (m["latency_ms"], 100 * m["metric_after"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(100 * base["metric_before"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"ONNX Runtime latency (ms per batch of {rec['latency_batch']})")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{report['task']}: {metric} vs latency ({report['model_short']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
