"""The paper's supporting analyses, all on the :func:`~prune_attattr.attention_attribution` engine.

- :mod:`.tree` - attribution trees (section 5)
- :mod:`.triggers` - adversarial triggers from attribution patterns (section 6)
- :mod:`.effectiveness` - pruning connections by attribution vs attention (section 4.1)
- :mod:`.universality` - correlation of head importance across datasets (section 4.2)

:func:`run_analyses` runs the ones a recipe enables and writes JSON and PNG files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["run_analyses", "markdown_section", "check_universality_sets"]


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def check_universality_sets(recipe, labels: list[str]) -> None:
    """Refuse universality sets that cannot run, before any long stage: a split the task does not
    ship, or gold labels (after ``label_map``) that are not the model's ``labels``.

    Raises:
        RunError: naming the set and what to do.
    """
    from ..errors import RunError
    from ..tasks import GLUE_TASKS

    for i, s in enumerate(recipe.analyses.universality.sets):
        spec = GLUE_TASKS[s.task]
        if (spec.train_file if s.split == "train" else spec.dev_file) is None:
            raise RunError(f"analyses.universality.sets[{i}] '{s.name}': task {s.task} has no {s.split} split here")
        if s.target == "gold":
            mapping = s.label_map or {}
            bad = sorted({mapping.get(n, n) for n in spec.labels} - set(labels))
            if bad:
                raise RunError(
                    f"analyses.universality.sets[{i}] '{s.name}': labels {bad} are not the model's {labels}; "
                    "give label_map or target: predicted"
                )


def _universality_sets(recipe, ctx, n: int) -> dict:
    from ..errors import RunError
    from ..tasks import GLUE_TASKS, encode, glue_path, read_examples

    out = {}
    for i, s in enumerate(recipe.analyses.universality.sets):
        spec = GLUE_TASKS[s.task]
        f = spec.train_file if s.split == "train" else spec.dev_file
        if f is None:
            raise RunError(f"analyses.universality.sets[{i}] '{s.name}': task {s.task} has no {s.split} split here")
        ex = read_examples(glue_path(f), text_column=spec.text_column, text_pair_column=spec.text_pair_column, label_column=spec.label_column, labels=spec.labels)
        order = list(range(len(ex)))
        random.Random(recipe.seed + 7).shuffle(order)
        if s.part is not None:
            order = order[s.part :: s.parts]
        ex = ex.subset(sorted(order[:n]))
        if s.target == "gold":
            names = [spec.labels[y] for y in ex.labels]
            mapping = s.label_map or {}
            mapped = [mapping.get(name, name) for name in names]
            bad = sorted({m for m in mapped if m not in ctx.labels})
            if bad:
                raise RunError(
                    f"analyses.universality.sets[{i}] '{s.name}': labels {bad} are not the model's {ctx.labels}; "
                    "give label_map or target: predicted"
                )
            ex.labels = [ctx.labels.index(m) for m in mapped]
        else:
            ex.labels = [0] * len(ex)
        out[s.name] = (encode(ctx.tokenizer, ex, recipe.model.max_length), s.target)
    return out


def run_analyses(prep, out_dir: Path | None) -> dict:
    """Run the analyses enabled in ``prep.ctx.recipe.analyses``; write files under ``out_dir`` (main process).

    Returns:
        A summary dict (also used for the report's "Analyses" section).
    """
    from ..tasks import encode, load_task_data

    ctx, model, r = prep.ctx, prep.model, prep.ctx.recipe
    a = r.analyses
    main = ctx.accelerator.is_main_process
    if main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}

    if a.tree.enabled:
        from .tree import rich_tree, save_tree, tree_for_text

        with ctx.stage("analysis: attribution trees"):
            trees = []
            for i, ex in enumerate(a.tree.examples):
                tree = tree_for_text(model, ctx.tokenizer, ex.text, ex.pair, threshold=a.tree.threshold, steps=a.tree.steps, quadrature=a.tree.quadrature, max_length=r.model.max_length, labels=ctx.labels)
                if main:
                    data = save_tree(tree, out_dir, f"tree_{i}") if out_dir is not None else tree.to_dict()
                    ctx.print(rich_tree(tree))
                    trees.append({"file": f"tree_{i}", "text": tree.text, "prediction": tree.prediction, "root": tree.tokens[tree.root], "edges": data["edges"], "tokens": tree.tokens})
            summary["trees"] = trees

    if a.effectiveness.enabled:
        from .effectiveness import effectiveness_curves, plot_effectiveness

        with ctx.stage("analysis: effectiveness"):
            dev_part = prep.dev_enc.subset(range(min(a.effectiveness.examples, len(prep.dev_enc))))
            loader = ctx.loader(dev_part, r.importance.batch_size)
            result = effectiveness_curves(model, loader, ctx.accelerator, fractions=a.effectiveness.fractions, steps=a.effectiveness.steps, quadrature=a.effectiveness.quadrature)
            if main and out_dir is not None:
                _write(out_dir / "effectiveness.json", result)
                plot_effectiveness(result, out_dir / "effectiveness.png")
            summary["effectiveness"] = result

    if a.universality.enabled:
        from .universality import importance_maps, plot_universality

        with ctx.stage("analysis: universality"):
            sets = _universality_sets(r, ctx, a.universality.examples)
            result = importance_maps(model, sets, ctx.accelerator, pad_id=ctx.pad_id, steps=a.universality.steps, quadrature=a.universality.quadrature, mode="fast", batch_size=r.importance.batch_size)
            if main and out_dir is not None:
                _write(out_dir / "universality.json", result)
                plot_universality(result, out_dir / "universality.png")
            summary["universality"] = {"examples": result["examples"], "pearson": result["pearson"]}

    if a.triggers.enabled:
        from .triggers import attack, extract_patterns, plot_triggers

        with ctx.stage("analysis: adversarial triggers"):
            train, _, _, _ = load_task_data(r)
            order = list(range(len(train)))
            random.Random(r.seed + 11).shuffle(order)
            src = encode(ctx.tokenizer, train.subset(sorted(order[: a.triggers.examples])), r.model.max_length)
            patterns = extract_patterns(model, ctx.tokenizer, src, steps=a.triggers.steps, quadrature=a.triggers.quadrature, mode=a.triggers.mode, batch_size=r.importance.batch_size, accelerator=ctx.accelerator)
            results = attack(model, ctx.tokenizer, prep.dev_enc, patterns, top=a.triggers.top, max_length=r.model.max_length, n_classes=len(ctx.labels), accelerator=ctx.accelerator)
            for res in results:
                res["label_name"] = ctx.labels[res["label"]]
            top3 = [x["attack_drop_points"] for x in results[:3]]
            result = {"source_examples": len(src), "patterns_found": len(patterns), "labels": ctx.labels, "attacked": results, "top3_mean_drop_points": sum(top3) / len(top3) if top3 else None}
            if main and out_dir is not None:
                _write(out_dir / "triggers.json", result)
                plot_triggers(result, out_dir / "triggers.png")
            summary["triggers"] = result
    return summary


def markdown_section(summary: dict) -> list[str]:
    """Markdown lines of the report's "Analyses" section."""
    if not summary:
        return []
    lines = ["", "## Analyses", ""]
    for t in summary.get("trees", []):
        lines += [f"### Attribution tree: “{t['text']}” (prediction {t['prediction']})", "", f"Root `{t['root']}`; edges key -> query (layer, score):", ""]
        for e in t["edges"]:
            lines.append(f"- `{t['tokens'][e['key']]}` -> `{t['tokens'][e['query']]}` (layer {e['layer'] + 1}, {e['score']:.2f})")
        lines += ["", f"![tree](analyses/{t['file']}.png)", ""]
    eff = summary.get("effectiveness")
    if eff:
        lines += ["### Effectiveness: pruning connections by attribution vs attention", "", "![effectiveness](analyses/effectiveness.png)", ""]
        lines.append("| connections pruned | by attribution | by attention |")
        lines.append("| ---: | ---: | ---: |")
        for f, x, y in zip(eff["fractions"], eff["attribution"], eff["attention"]):
            lines.append(f"| {100 * f:g}% | {100 * x:.1f} | {100 * y:.1f} |")
        lines.append("")
    uni = summary.get("universality")
    if uni:
        lines += ["### Universality of important heads", "", "![universality](analyses/universality.png)", "", "| set A | set B | Pearson r |", "| --- | --- | ---: |"]
        lines += [f"| {p['a']} | {p['b']} | {p['r']:.3f} |" for p in uni["pearson"]]
        lines.append("")
    trig = summary.get("triggers")
    if trig:
        lines += [f"### Adversarial triggers ({trig['source_examples']} source examples, {trig['patterns_found']} patterns)", "", "![triggers](analyses/triggers.png)", ""]
        labels = trig["labels"]
        lines.append("Each pattern comes from examples of one class and is inserted into every dev example; the attacked classes are the others.")
        lines.append("")
        lines.append("| # | from class | pattern (key -> query) | rel. positions | count | " + " | ".join(f"acc. {c}: before -> after" for c in labels) + " | drop on other classes (points) |")
        lines.append("| ---: | --- | --- | --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |")
        for i, x in enumerate(trig["attacked"], 1):
            cells = " | ".join(f"{100 * b:.1f} -> {100 * a:.1f}" for b, a in zip(x["accuracy_before"], x["accuracy_after"]))
            lines.append(
                f"| {i} | {x['label_name']} | `{x['key_token']}` -> `{x['query_token']}` | {x['key_pos']:.2f}, {x['query_pos']:.2f} | {x['count']} | {cells} | {x['attack_drop_points']:.1f} |"
            )
        if trig["top3_mean_drop_points"] is not None:
            lines += ["", f"Mean accuracy drop of the top 3 patterns on the classes they attack: {trig['top3_mean_drop_points']:.1f} points."]
        lines.append("")
    return lines
