"""``report.md`` and ``report.json`` of a run.

All functions take the plain ``report`` dict that :func:`prune_attattr.pipeline.run` builds (the same
content as ``report.json``), so a notebook can re-render a saved run.
"""

from __future__ import annotations

import json
from pathlib import Path

from .analyses import analyses_markdown
from .common import _axis_label, _deployment_caption, _deployment_cells, _grid, _loyalty, _mflops, _pct, _row_label, _settings_lines, by_flops, method_settings, report_warnings

__all__ = ["write_json", "write_markdown", "recovery_markdown", "deployment_markdown"]


def write_json(report: dict, path: Path) -> None:
    """``report.json`` (indent 2), with ``method_settings`` (see :func:`method_settings`) added and, first,
    ``warnings``: a list of lines (:func:`prune_attattr.report.common.report_warnings`: the unpruned model at
    chance, an exported model at chance or below ``export.max_drop``), empty when there is none."""
    out = {"warnings": report_warnings(report), **report, "method_settings": method_settings(report)}
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


def write_markdown(report: dict, path: Path, plot_name: str | None = "curves.png") -> None:
    """``report.md``: run summary, timings, curves table, export summary."""
    kept, by_method = _grid(report)
    total = report["total_heads"]
    metric = report["primary_metric"]
    lines = [f"# prune-attattr report: {report['run_name']}", ""]
    for warning in report_warnings(report):
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
                "FLOPs per token at the dev split's mean length (`prune_attattr.prune.cost.unit_flops`), as a fraction of the "
                "unpruned model's; heads and feed-forward neurons chosen together under each budget (`prune_attattr.prune.search`). "
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
        if exp.get("labels"):
            lines.append("- labels (`id2label` of `model/` and `onnx/`): " + ", ".join(f"{i} `{n}`" for i, n in enumerate(exp["labels"])))
        lines.append(f"- heads kept {exp['heads_kept']}/{total}; pruned heads per layer: `{json.dumps(exp['pruned_heads'])}`")
        if exp.get("pruned_neurons"):
            lines.append(
                f"- feed-forward neurons kept {exp['neurons_kept']}; pruned per layer: "
                + ", ".join(f"layer {k}: {len(v)}" for k, v in exp["pruned_neurons"].items())
            )
        if exp.get("removed_sublayers"):
            lines.append(
                "- whole sublayers removed (the identity; `prune_attattr_removed_sublayers` in `model/config.json`): "
                + ", ".join(f"layer {k}: {' and '.join(v)}" for k, v in exp["removed_sublayers"].items())
            )
        if exp.get("flops_fraction") is not None:
            lines.append(f"- FLOPs per token: {100 * exp['flops_fraction']:.1f}% of the unpruned model's (dev mean length)")
        lines.append(f"- {metric}: {_pct(exp['metrics'][metric])}% (unpruned {_pct(report['baseline'][metric])}%)")
        lines.append(f"- parameters {exp['parameters']:,} (unpruned {report['baseline_parameters']:,}); checkpoint {exp['checkpoint_mb']:.1f} MB")
        if exp.get("vocabulary_refused"):
            lines.append(f"- vocabulary: {exp['vocabulary_refused']}")
        v = exp.get("vocabulary")
        if v:
            full = (exp.get("metrics_full_vocabulary") or {}).get(metric)
            lines.append(
                f"- vocabulary: {v['kept']:,} of {v['total']:,} tokens kept ({v['from_training_texts']:,} from the training split, "
                f"{v['special']} special, {v['single_characters']:,} single characters); {v['dev_texts_with_dropped_tokens']} of "
                f"{v['dev_texts']} dev texts held a dropped token ({v['dev_tokens_dropped']} tokens); word embeddings "
                f"{v['embedding_mb']['before']:.1f} -> {v['embedding_mb']['after']:.1f} MB float32"
                + (f"; {metric} {_pct(full)}% with every token" if full is not None else "")
            )
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
        f"FLOPs per token analytic at {seq} tokens (`prune_attattr.prune.cost.flops_per_token`); ONNX Runtime latency "
        f"median of one batch of the export stage's latency inputs. Loyalty to the unpruned model (Xu et al. 2021), in %: "
        f"label (share of dev predictions equal to the unpruned model's) / probability (1 - Jensen-Shannon distance, "
        f"base 2, of the softmax outputs, averaged over dev examples).",
        "",
    ]
    if plot_name and all(m.get("latency_ms") is not None for m in rec["models"]):
        lines += [f"![{metric} vs latency]({plot_name})", ""]
    lines.append(
        f"| model | heads | neurons | FLOPs kept (%) | parameters | attention MFLOP/token | total MFLOP/token | ONNX ms | "
        f"{metric} before (%) | after recovery (%) | loyalty before | loyalty after | recovery min |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in rec["models"]:
        lat = f"{m['latency_ms']:.2f}" if m.get("latency_ms") is not None else "-"
        mins = f"{m['recovery_minutes']:.1f}" if m.get("recovery_minutes") is not None else "-"
        name = m["label"] + (" **(exported)**" if m.get("exported") else "")
        lines.append(
            f"| {name} | {m['heads_kept']} | {m.get('neurons_kept', '-')} | "
            + (f"{100 * m['flops_fraction']:.1f}" if m.get("flops_fraction") is not None else "-")
            + f" | {m['parameters']:,} | {_mflops(m['attention_flops_per_token'])} | "
            f"{_mflops(m['total_flops_per_token'])} | {lat} | {_pct(m['metric_before'])} | {_pct(m.get('metric_after'))} | "
            f"{_loyalty(m.get('loyalty_before'))} | {_loyalty(m.get('loyalty_after'))} | {mins} |"
        )
    return lines


_KIND_NAMES = {"float32": "float32", "int8": "dynamic int8", "int8_static": "static int8"}


def deployment_markdown(deployment: dict) -> list[str]:
    """``report.md`` lines of the deployment section: which graph ships and why (budget, batch independence,
    speed), each int8 scheme, the shipped graph's loyalty, the timing table (with each graph's dev predictions
    that differ between batch 1 and 16).

    ``deployment``: the report's ``export.deployment`` (:func:`prune_attattr.deploy.deployment.deploy_run`);
    empty list when None.
    """
    if not deployment:
        return []
    bench, pruned = deployment["bench"], deployment["pruned"]
    lines = ["", "## Deployment", ""]
    q = pruned.get("quantization") or {}
    if "method" in q:  # a report from before static int8: one dynamic scheme
        q = {"int8": q}
    kind = pruned["precision"]
    shipped = f"`onnx/{pruned['deployed']}` is {_KIND_NAMES.get(kind, kind)}"
    others = [f"{_KIND_NAMES.get(k, k)} `onnx/{f}`" for k, f in pruned["files"].items() if f and f != pruned["deployed"]]
    if others:
        shipped += "; also built: " + ", ".join(others)
    lines.append(f"- shipped: {shipped}")
    if pruned.get("choice"):
        lines.append(f"- why: {pruned['choice']['reason']}")
    for k, scheme in q.items():
        lines.append(f"- {_KIND_NAMES.get(k, k)}: {scheme['method']}, weights {scheme['weights']}, activations {scheme['activations']}")
    fused = pruned["fusion"].get(kind, {})
    lines.append(
        "- fused ONNX Runtime kernels: " + (", ".join(f"{k} x{v}" for k, v in fused.get("ops", {}).items()) or "none")
        + (f" ({fused['note']})" if fused.get("note") else "")
    )
    diffs = pruned.get("max_abs_diff_vs_float32") or (
        {"int8": pruned["max_abs_diff_int8_vs_float32"]} if pruned.get("max_abs_diff_int8_vs_float32") is not None else {}
    )
    for k, d in diffs.items():
        lines.append(f"- {_KIND_NAMES.get(k, k)} max |logit diff| vs float32 on the check batches: {d:.3g}")
    loyal = (deployment.get("loyalty") or {}).get(kind)
    if loyal:
        lines.append(
            f"- loyalty of the shipped graph to the unpruned float32 graph (dev split, one sentence at a time): label "
            f"{_pct(loyal['label'])}%, probability {_pct(loyal['probability'])}% (Xu et al. 2021)"
        )
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
