"""Recovered accuracy of AttAttr-pruned models (issue 10's measured targets), with and without distillation.

Fine-tuned model, importance and data are those of a recipe (default recipes/sst2.yaml; the fine-tune
comes from the cache when the recipe's was computed before). For each head count it prunes by AttAttr
(one shot, the recipe's importance settings), evaluates on dev, recovers a copy with each alpha, and
prints dev accuracy before/after and the minutes each recovery took.

Run (2-core CPU, ~20 min with the fine-tune cached):
    PYTHONPATH=$PWD python benchmarks/recovery_targets.py [recipe.yaml] [--heads 36 22] [--alphas 0.5 0]
        [--examples 10000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from prune_attattr.config import load_recipe
from prune_attattr.evaluation import evaluate_model
from prune_attattr.models import num_heads_total
from prune_attattr.stages.importance import compute_importance
from prune_attattr.stages.prepare import prepare
from prune_attattr.stages.recovery import recovery_train_set
from prune_attattr.prune.heads import heads_to_prune, prune_heads
from prune_attattr.recover.distill import recover, recovery_dataloader, teacher_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/sst2.yaml")
    ap.add_argument("--heads", type=int, nargs="+", default=[36, 22])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.0])
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides + [f"recovery.train_examples={args.examples}", "recovery.enabled=true"])
    prep = prepare(recipe)
    ctx, model = prep.ctx, prep.model
    acc = ctx.accelerator
    metric = ctx.metrics[0]
    baseline = evaluate_model(model, prep.dev_loader, acc, ctx.metrics)
    t = time.perf_counter()
    scores = compute_importance("attattr", model, prep.imp_loader, ctx)
    ctx.print(f"AttAttr importance: {time.perf_counter() - t:.0f} s")
    train = recovery_train_set(recipe, ctx.tokenizer)
    loader = recovery_dataloader(train, batch_size=recipe.recovery.batch_size, pad_id=ctx.pad_id, seed=recipe.seed)
    t = time.perf_counter()
    table = teacher_logits(model, loader, acc)
    teacher_s = time.perf_counter() - t
    ctx.print(f"unpruned {metric} {100 * baseline[metric]:.2f}%; teacher logits on {len(train)} examples: {teacher_s:.0f} s")
    total = num_heads_total(model)
    rows = []
    for heads in args.heads:
        pruned = prune_heads(copy.deepcopy(model), heads_to_prune(scores, total - heads))
        before = evaluate_model(pruned, prep.dev_loader, acc, ctx.metrics)[metric]
        for alpha in args.alphas:
            student = copy.deepcopy(pruned)
            settings = recipe.recovery.model_copy(update={"alpha": alpha})
            info = recover(student, model, loader, acc, settings, cached_teacher=table)
            after = evaluate_model(student, prep.dev_loader, acc, ctx.metrics)[metric]
            row = {
                "heads": heads,
                "alpha": alpha,
                "before": round(100 * before, 2),
                "after": round(100 * after, 2),
                "drop_after": round(100 * (baseline[metric] - after), 2),
                "minutes": round(info["seconds"] / 60, 2),
                "examples": info["examples"],
                "epochs": info["epochs"],
                "lr": settings.learning_rate,
                "T": settings.temperature,
            }
            rows.append(row)
            ctx.print(json.dumps(row))
    ctx.print(f"\nunpruned {metric}: {100 * baseline[metric]:.2f}%  (teacher logits computed once: {teacher_s / 60:.2f} min)")
    ctx.print(f"{'heads':>5} {'alpha':>5} {'before':>7} {'after':>7} {'drop':>6} {'min':>5}")
    for r in rows:
        ctx.print(f"{r['heads']:>5} {r['alpha']:>5} {r['before']:>7.2f} {r['after']:>7.2f} {r['drop_after']:>6.2f} {r['minutes']:>5.1f}")


if __name__ == "__main__":
    main()
