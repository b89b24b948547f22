"""PNG figures of a run (matplotlib, Agg backend): curves, neuron importance, accuracy vs speed-up.

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the same
content as ``report.json``), so a notebook can re-render a saved run.
"""

from __future__ import annotations

from pathlib import Path

from .common import _axis_label, by_flops

__all__ = ["write_plot", "write_neuron_heatmaps", "write_tradeoff_plot"]


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
