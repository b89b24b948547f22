"""Files, figures and Markdown of the paper's analyses (attribution tree, effectiveness, connections, universality, triggers).

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the same
content as ``report.json``), so a notebook can re-render a saved run.
"""

from __future__ import annotations

from pathlib import Path

from .common import _acc, _dump
from .plots import _plt, _save

__all__ = ["write_analyses_files", "draw_tree", "plot_effectiveness", "plot_connections", "plot_universality", "plot_triggers", "analyses_markdown"]


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
