"""The paper's supporting analyses, all on the :func:`~prune_attattr.attention_attribution` engine.

- :mod:`.tree` - attribution trees (section 5)
- :mod:`.effectiveness` - masking each example's top-k heads per layer, by attribution vs attention (section 4.1)
- :mod:`.connections` - a connection-level variant of 4.1 (not the paper's experiment)
- :mod:`.universality` - correlation of head importance across datasets (section 4.2)
- :mod:`.triggers` - adversarial triggers from attribution patterns (section 6, as the official code)

:func:`run_analyses` runs the ones a recipe enables and returns their data; the files (JSON, PNG)
and the report's Markdown are rendered by :mod:`prune_attattr.report`.
"""

from __future__ import annotations

import random

__all__ = ["run_analyses", "display_labels", "check_universality_sets"]


def display_labels(recipe, labels: list[str]) -> list[str]:
    """Class names for pictures and tables: the task's readable names (SST-2: negative/positive), else ``labels``
    (:func:`prune_attattr.tasks.label_names`)."""
    from ..tasks import label_names

    return label_names(recipe.data.task, labels)


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


def run_analyses(prep) -> dict:
    """Run the analyses enabled in ``prep.ctx.recipe.analyses``; return their data (the analyses stage
    renders it with :func:`prune_attattr.report.write_analyses_files`).

    Returns:
        ``{"labels": [...], "trees": [...], "effectiveness": {...}, "connections": {...},
        "universality": {...}, "triggers": {...}}`` (only the analyses that ran).
    """
    from ..errors import RunError
    from ..tasks import encode, load_task_data

    ctx, model, r = prep.ctx, prep.model, prep.ctx.recipe
    a = r.analyses
    names = display_labels(r, ctx.labels)
    summary: dict = {"labels": names}

    if a.tree.enabled:
        from .tree import tree_for_text

        with ctx.stage("analysis: attribution trees"):
            trees = []
            for i, ex in enumerate(a.tree.examples):
                tree = tree_for_text(model, ctx.tokenizer, ex.text, ex.pair, threshold=a.tree.threshold, steps=a.tree.steps, quadrature=a.tree.quadrature, max_length=r.model.max_length, labels=names)
                trees.append({"file": f"tree_{i}", "steps": a.tree.steps, "quadrature": a.tree.quadrature, "target": "predicted", **tree.to_dict()})
            summary["trees"] = trees

    if a.effectiveness.enabled:
        from .effectiveness import effectiveness_curves

        e = a.effectiveness
        with ctx.stage("analysis: effectiveness (heads)"):
            part = prep.dev_enc.subset(range(min(e.examples or len(prep.dev_enc), len(prep.dev_enc))))
            loader = ctx.loader(part, r.importance.batch_size)
            summary["effectiveness"] = effectiveness_curves(model, loader, ctx.accelerator, steps=e.steps, quadrature=e.quadrature, mode=e.mode)

    if a.connections.enabled:
        from .connections import connection_curves

        c = a.connections
        with ctx.stage("analysis: connection pruning"):
            part = prep.dev_enc.subset(range(min(c.examples, len(prep.dev_enc))))
            loader = ctx.loader(part, r.importance.batch_size)
            result = connection_curves(model, loader, ctx.accelerator, fractions=c.fractions, steps=c.steps, quadrature=c.quadrature)
            summary["connections"] = {**result, "steps": c.steps, "quadrature": c.quadrature, "target": "gold"}

    if a.universality.enabled:
        from .universality import importance_maps

        u = a.universality
        with ctx.stage("analysis: universality"):
            sets = _universality_sets(r, ctx, u.examples)
            result = importance_maps(model, sets, ctx.accelerator, pad_id=ctx.pad_id, steps=u.steps, quadrature=u.quadrature, mode="fast", batch_size=r.importance.batch_size)
            summary["universality"] = {**result, "steps": u.steps, "quadrature": u.quadrature}

    if a.triggers.enabled:
        from .triggers import attack, extract_patterns, paper_table, rank_patterns

        t = a.triggers
        with ctx.stage("analysis: adversarial triggers"):
            train, dev, _, _ = load_task_data(r)
            if train is None:
                raise RunError("analyses.triggers extracts patterns from training examples; the task has no training split")
            src = encode(ctx.tokenizer, train.subset(range(min(t.examples, len(train)))), r.model.max_length)
            keep = [i for i, n in enumerate(src.lengths) if n >= t.min_tokens]  # official: SST-2 examples under 15 tokens skipped
            src = src.subset(keep)
            found = extract_patterns(model, ctx.tokenizer, src, steps=t.steps, quadrature=t.quadrature, mode=t.mode, batch_size=r.importance.batch_size, accelerator=ctx.accelerator)
            ranked = rank_patterns(found, t.threshold)
            attacked = ranked if t.top is None else ranked[: t.top]
            dev_part = dev.subset(range(min(t.dev_examples or len(dev), len(dev))))
            result = attack(model, ctx.tokenizer, dev_part, attacked, max_length=r.model.max_length, n_classes=len(ctx.labels), pair_ratio=t.pair_ratio, batch_size=r.pruning.eval_batch_size, accelerator=ctx.accelerator)
            for p in result["patterns"]:
                p["target_label_name"] = names[p["target_label"]]
                p["gold_label_name"] = names[p["gold_label"]]
                p.pop("tokens"), p.pop("input_ids")
            summary["triggers"] = {
                "source_examples": len(src),
                "patterns_found": len(found),
                "patterns_valid": len(ranked),
                "patterns_attacked": len(attacked),
                "dev_examples": len(dev_part),
                "dev_per_class": [dev_part.labels.count(c) for c in range(len(ctx.labels))],
                "settings": t.model_dump(),
                **result,
                "paper_table": paper_table(result, 3),
            }
    return summary
