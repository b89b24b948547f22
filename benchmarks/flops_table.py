"""Issue 15's comparison table: accuracy at 70%, 50% and 35% of the unpruned FLOPs per token, by method and
unit kind, before recovery, after least squares and after distillation.

For each method (AttAttr, Fisher, Taylor, random), unit kind (``both``: heads and feed-forward neurons under
one budget; ``heads``: heads only) and FLOPs budget, the units to keep are chosen from the method's head and
neuron scores (:func:`prune_attattr.prune.curve.choose_units`, the method's balance as the pipeline uses it),
a copy of the fine-tuned model is pruned structurally and evaluated on the dev split (before recovery);
then one copy is recovered by least squares (Kwon et al. 2022's layer-wise rescaling,
``recovery.least_squares_examples``) and another by distillation (the recipe's ``recovery`` settings,
``set_seed(recipe.seed)`` before each), and both are evaluated. A budget the unit kind cannot reach (heads
alone stop near 66% on MiniLM, the feed-forward share) is skipped and printed as such.

Fine-tuned model, data, importance examples and scores are the recipe's, from the stage cache when the
pipeline computed them before (methods not in ``importance.methods`` are scored here and cached).

Measures, per row: FLOPs per token kept (achieved, at the dev split's mean length), heads and neurons kept,
dev accuracy before recovery, after least squares and after distillation, and the seconds of each recovery;
plus the unpruned accuracy. Default: 24 rows, 16 measured (heads alone at 0.50 and 0.35 print "unreachable").

Run (2-core CPU, fine-tune cached; about 20-25 min, ~1 min of distillation per row at 6000 examples;
--skip-distill: about 4 min; --methods random --budgets 0.5 --train-examples 200: 22 s):
    PYTHONPATH=$PWD python benchmarks/flops_table.py --json flops_table.json
Options: [--recipe recipes/sst2.yaml] [--methods attattr fisher taylor random] [--units both heads]
    [--budgets 0.70 0.50 0.35] [--train-examples N] [--skip-distill] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

from accelerate.utils import set_seed

from prune_attattr.config import RecipeError, load_recipe
from prune_attattr.prune.cost import unit_flops
from prune_attattr.errors import RunError
from prune_attattr.evaluation import evaluate_model
from prune_attattr.prune.curve import balance_for, choose_units, flops_fraction
from prune_attattr.recover.distill import recover
from prune_attattr.registry import NEURON_METHODS
from prune_attattr.prune.search import SearchError
from prune_attattr.stages.context import cached_evaluate, mean_length
from prune_attattr.stages.export import prune_copy
from prune_attattr.stages.importance import cached_importance
from prune_attattr.stages.prepare import evaluate_unpruned, prepare
from prune_attattr.stages.recovery import RecoveryState, _least_squares


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/sst2.yaml")
    ap.add_argument("--methods", nargs="+", default=list(NEURON_METHODS), choices=NEURON_METHODS)
    ap.add_argument("--units", nargs="+", default=["both", "heads"], choices=["both", "heads", "neurons"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.70, 0.50, 0.35])
    ap.add_argument("--train-examples", type=int, default=None, help="override recovery.train_examples (distillation time)")
    ap.add_argument("--skip-distill", action="store_true", help="least squares only (no teacher logits, no training)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="recipe override, as the CLI's")
    ap.add_argument("--json", default=None, help="write the rows and settings to this JSON file")
    return ap.parse_args()


def recovered(prep, pruned, fn) -> tuple[float, float]:
    """``(metric, seconds)`` of a copy of ``pruned`` recovered in place by ``fn(student) -> info``."""
    ctx = prep.ctx
    student = copy.deepcopy(pruned)
    info = fn(student)
    after = evaluate_model(student, prep.dev_loader, ctx.accelerator, ctx.metrics)
    return after[ctx.metrics[0]], float(info["seconds"])


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def secs(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(rows: list[dict]) -> str:
    """The Markdown table: one row per method x units x budget."""
    lines = [
        "| method | units | budget | FLOPs kept % | heads kept | neurons kept | before % | least squares % | distillation % "
        "| least squares s | distillation s |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        cells = [r["method"], r["units"], f"{r['budget']:.2f}"]
        if r.get("skipped"):
            cells += ["unreachable"] + [""] * 7
        else:
            cells += [f"{100 * r['flops_fraction']:.1f}", str(r["heads_kept"]), str(r["neurons_kept"]), pct(r["before"]),
                      pct(r["least_squares"]), pct(r["distill"]), secs(r["least_squares_s"]), secs(r["distill_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    extra = ["recovery.enabled=true", f"recovery.mode={'least_squares' if args.skip_distill else 'distill'}"]
    if args.train_examples is not None:
        extra.append(f"recovery.train_examples={args.train_examples}")
    try:
        recipe = load_recipe(args.recipe, args.overrides + extra)
        prep = prepare(recipe)
    except (RecipeError, RunError) as exc:
        sys.exit(f"error: {exc}")
    ctx, model = prep.ctx, prep.model
    metric = ctx.metrics[0]
    baseline = evaluate_unpruned(prep)[metric]
    costs = unit_flops(model, mean_length(prep.dev_enc))
    state = RecoveryState()
    with ctx.stage("recovery data" + ("" if args.skip_distill else " and teacher logits")):
        state.ensure(prep)  # distillation: the teacher's logits once, from the stage cache when computed before
    rows: list[dict] = []
    for method in args.methods:
        with ctx.stage(f"scores: {method}"):
            heads = cached_importance(prep, method)[0]
            needs_neurons = any(u != "heads" for u in args.units)
            neurons = cached_importance(prep, method, unit="neurons")[0] if needs_neurons else None
        for units in args.units:
            for budget in args.budgets:
                row = {"method": method, "units": units, "budget": budget}
                rows.append(row)
                try:
                    choice = choose_units(model, heads, neurons if units != "heads" else None, costs, budget, units, balance_for(method, recipe.pruning.balance))
                except SearchError as exc:
                    row["skipped"] = str(exc)
                    ctx.print(f"   {method} {units} {budget:.2f}: skipped ({exc})")
                    continue
                pruned = prune_copy(prep, choice.pruned_heads, choice.pruned_neurons)
                row.update(flops_fraction=flops_fraction(pruned, costs), heads_kept=choice.heads_kept, neurons_kept=choice.neurons_kept)
                row["before"] = cached_evaluate(prep, pruned)[0][metric]
                row["least_squares"], row["least_squares_s"] = recovered(prep, pruned, lambda s: _least_squares(prep, state, s))
                row["distill"] = row["distill_s"] = None
                if not args.skip_distill:
                    set_seed(recipe.seed)  # the same dropout draws whatever ran before
                    teacher = prep.model if recipe.recovery.hidden_weight > 0 else None  # layer-wise distillation runs it per batch
                    row["distill"], row["distill_s"] = recovered(
                        prep, pruned, lambda s: recover(s, teacher, state.loader, ctx.accelerator, recipe.recovery, cached_teacher=state.table)
                    )
                ctx.print(
                    f"   {method} {units} {budget:.2f}: {100 * row['flops_fraction']:.1f}% FLOPs, {row['heads_kept']} heads, "
                    f"{row['neurons_kept']} neurons: {pct(row['before'])} -> LS {pct(row['least_squares'])} "
                    f"({row['least_squares_s']:.1f} s), distill {pct(row['distill'])}"
                    + ("" if row["distill_s"] is None else f" ({row['distill_s']:.0f} s)")
                )
    print(f"\nUnpruned {metric}: {100 * baseline:.2f}% (dev, {len(prep.dev_enc)} examples); mean dev length "
          f"{costs.seq_len:.1f} tokens; recovery: {len(state.train)} training examples, least squares on "
          f"{min(recipe.recovery.least_squares_examples, len(state.train))}\n")
    print(table(rows))
    if args.json:
        out = {"recipe": args.recipe, "overrides": args.overrides + extra, "metric": metric, "unpruned": baseline,
               "seq_len": costs.seq_len, "recovery": recipe.recovery.model_dump(mode="json"),
               "train_examples": len(state.train), "teacher_seconds": state.teacher_seconds, "rows": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
