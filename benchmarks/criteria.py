"""Issue 20's comparison of pruning criteria: AttAttr's variants, Taylor and Fisher against leave-one-out.

On the recipe's fine-tuned model (from the stage cache; run the recipe's fine-tune first), for each
criterion (AttAttr ``aggregate/objective`` variants, ``importance.attattr``; Taylor and Fisher as the
pipeline computes them: Taylor heads normalised per layer, Fisher raw):

a. **Leave-one-out agreement.** The ground truth is the exact loss change when one unit alone is masked
   (:func:`prune_attattr.importance.leave_one_out.leave_one_out`) on the recipe's importance examples
   (the ones the criteria are computed on): every head, and ``--neurons-per-layer`` neurons per layer
   drawn with the recipe's seed. Spearman rank correlation of each criterion's scores with it, global
   (all heads; all sampled neurons) and the mean within layers. ``taylor_raw`` (Taylor heads not
   normalised) is listed for the global figure.
b. **Before recovery.** Dev metric after structural pruning to each ``--budgets`` FLOPs fraction (heads
   and neurons together, :func:`prune_attattr.prune.curve.choose_units` with the criterion's balance
   under ``pruning.balance: auto``, :func:`~prune_attattr.prune.curve.balance_for`) and to each
   ``--heads`` count (heads only: the top heads by score), each with its binomial standard error
   ``sqrt(p (1 - p) / n)`` over the ``n`` dev examples.
c. ``--distill M ...``: those criteria's models at ``--distill-budgets`` after distillation (the recipe's
   recovery settings, ``--train-examples`` examples; ``set_seed(recipe.seed)`` before each).
d. ``--iterative M ...``: ``pruning.schedule: iterative`` for those criteria
   (:func:`prune_attattr.stages.curves.iterative_curve`, heads and neurons): prune to each
   ``--iterative-steps`` budget from the previous step's model after a brief recovery
   (``recovery.iterative_examples``) and re-scoring; each step's metric before its own recovery, and the
   models at ``--distill-budgets`` distilled as in (c), beside the one-shot figures of (b) and (c).

AttAttr's aggregates come from one attribution pass per objective (:func:`prune_attattr.importance.attattr_variants`);
scores and leave-one-out are kept in the stage cache. Every part's wall time is recorded.

Run (2-core CPU shared; fine-tune cached; SST-2 about 10-15 min without --distill):
    PYTHONPATH=$PWD python benchmarks/criteria.py --recipe recipes/sst2.yaml --json criteria_sst2.json
Options: [--variants max/prob sum/prob sum/log_prob abs_sum/log_prob sq_sum/log_prob] [--baselines taylor fisher]
    [--neurons-per-layer 32] [--budgets 0.70 0.50 0.35 0.30 0.20] [--heads 50 29 8]
    [--distill CRITERION ...] [--distill-budgets 0.35 0.20] [--train-examples 6000] [--set key=value ...]
    [--iterative CRITERION ...] [--iterative-steps 1.0 0.7 0.5 0.35 0.2]
Tables for docs/criteria.md from the JSON files:
    python benchmarks/criteria.py --render criteria_sst2.json criteria_mrpc.json criteria_mnli.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch
from accelerate.utils import set_seed
from scipy.stats import spearmanr

from prune_attattr import importance as imp
from prune_attattr.cache import digest, encoded_digest
from prune_attattr.config import RecipeError, load_recipe
from prune_attattr.errors import RunError
from prune_attattr.evaluation import evaluate_model
from prune_attattr.importance.leave_one_out import leave_one_out, sample_neurons
from prune_attattr.prune.cost import unit_flops
from prune_attattr.prune.curve import balance_for, choose_units, flops_fraction
from prune_attattr.prune.search import SearchError
from prune_attattr.stages.context import STAGE_CACHE_VERSION, cached_evaluate, mean_length
from prune_attattr.stages.export import prune_copy
from prune_attattr.stages.importance import cached_importance
from prune_attattr.stages.prepare import evaluate_unpruned, prepare

VARIANTS = ["max/prob", "sum/prob", "sum/log_prob", "abs_sum/log_prob", "sq_sum/log_prob"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/sst2.yaml")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help="AttAttr aggregate/objective pairs")
    ap.add_argument("--baselines", nargs="+", default=["taylor", "fisher"], choices=["taylor", "fisher"])
    ap.add_argument("--neurons-per-layer", type=int, default=32)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.70, 0.50, 0.35, 0.30, 0.20])
    ap.add_argument("--heads", type=int, nargs="+", default=[50, 29, 8])
    ap.add_argument("--skip-loo", action="store_true")
    ap.add_argument("--distill", nargs="*", default=[], help="criteria (e.g. attattr:sum/log_prob fisher) to distil")
    ap.add_argument("--distill-budgets", type=float, nargs="+", default=[0.35, 0.20])
    ap.add_argument("--train-examples", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--iterative", nargs="*", default=[], help="criteria (e.g. attattr:sq_sum/log_prob taylor) to prune iteratively (d)")
    ap.add_argument("--iterative-steps", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.35, 0.2],
                    help="FLOPs budgets of the iterative schedule; a brief recovery and re-scoring after each")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def cached_value(ctx, key, compute):
    hit = ctx.cached(key)
    if hit is not None:
        return hit, True
    value = compute()
    ctx.store(key, value)
    return value, False


def spearman(x, y) -> float:
    r = spearmanr(x, y).statistic
    return float("nan") if r is None or math.isnan(r) else float(r)


def correlations(heads, neurons, loo, sampled) -> dict:
    """Spearman of scores with leave-one-out loss change: heads global / mean within layers; same for the sampled neurons."""
    out = {}
    hl = torch.tensor(loo["head_loss"])
    out["heads_global"] = spearman(heads.flatten().tolist(), hl.flatten().tolist())
    out["heads_within"] = sum(spearman(heads[i].tolist(), hl[i].tolist()) for i in range(hl.shape[0])) / hl.shape[0]
    out["heads_metric_global"] = spearman(heads.flatten().tolist(), torch.tensor(loo["head_metric"]).flatten().tolist())
    out["heads_abs_global"] = spearman(heads.flatten().tolist(), hl.abs().flatten().tolist())
    if neurons is not None and sampled:
        xs, ys, within = [], [], []
        for layer, ids in sampled.items():
            s = neurons[int(layer), ids].tolist()
            t = loo["neuron_loss"][str(layer)]
            xs += s
            ys += t
            within.append(spearman(s, t))
        out["neurons_global"] = spearman(xs, ys)
        out["neurons_abs_global"] = spearman(xs, [abs(y) for y in ys])
        out["neurons_within"] = sum(within) / len(within)
    return out


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _cell(row) -> str:
    return "-" if row is None or "metric" not in row else f"{100 * row['metric']:.1f} ± {100 * row['se']:.1f}"


def qualifies(result: dict, criterion: str, baselines=("taylor", "fisher")) -> tuple[bool, list[str]]:
    """Issue 20's rule on one task: at every budget (FLOPs and head counts) ``criterion``'s metric is at least
    the best baseline's minus that cell's standard error. Returns ``(passes, budgets where it fails)``."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        if "metric" in r:
            col = ("both", r["budget"]) if r["units"] == "both" else ("heads", r["heads_kept"])
            cells.setdefault(col, {})[r["criterion"]] = r
    fails = []
    for col, by in cells.items():
        base = [by[b] for b in baselines if b in by]
        if criterion not in by or not base:
            continue
        best = max(base, key=lambda r: r["metric"])
        if by[criterion]["metric"] < best["metric"] - best["se"] - 1e-12:
            fails.append(f"{col[1]:.0%}" if col[0] == "both" else f"{col[1]} heads")
    return not fails, fails


def render(paths: list[str]) -> str:
    """Markdown: per task, the Spearman table (a) and the before-recovery table (b), then the rule's verdict."""
    out = []
    results = [json.load(open(p)) for p in paths]
    for res in results:
        n = res["dev_examples"]
        out.append(f"### {res['task']} (dev {n} examples, unpruned {100 * res['unpruned']:.2f} ± {100 * res['unpruned_se']:.2f}%, "
                   f"importance and leave-one-out on {res['importance_examples']} held-out training examples)\n")
        if "spearman" in res:
            out.append("Spearman rank correlation with the leave-one-out loss change (a):\n")
            out.append("| criterion | heads, global (72) | heads, within layers | heads vs metric drop, global | heads vs abs. loss change | "
                       "neurons, global | neurons, within layers | neurons vs abs. loss change |")
            out.append("|---|--:|--:|--:|--:|--:|--:|--:|")
            for name, c in res["spearman"].items():
                f = lambda k: "-" if k not in c else f"{c[k]:+.3f}"  # noqa: E731
                out.append(f"| {name} | {f('heads_global')} | {f('heads_within')} | {f('heads_metric_global')} | {f('heads_abs_global')} | "
                           f"{f('neurons_global')} | {f('neurons_within')} | {f('neurons_abs_global')} |")
            out.append("")
        budgets = sorted({r["budget"] for r in res["rows"] if r["units"] == "both"}, reverse=True)
        heads = sorted({r["heads_kept"] for r in res["rows"] if r["units"] == "heads"}, reverse=True)
        criteria = list(dict.fromkeys(r["criterion"] for r in res["rows"]))
        out.append(f"Dev {res['metric']} (%) before recovery ± binomial SE (b); heads and neurons at a FLOPs budget, or heads only:\n")
        out.append("| criterion | " + " | ".join(f"{b:.0%} FLOPs" for b in budgets) + " | " + " | ".join(f"{k} heads" for k in heads) + " |")
        out.append("|---|" + "--:|" * (len(budgets) + len(heads)))
        for c in criteria:
            get = {(r["units"], r.get("budget") if r["units"] == "both" else r["heads_kept"]): r for r in res["rows"] if r["criterion"] == c}
            cells = [_cell(get.get(("both", b))) for b in budgets] + [_cell(get.get(("heads", k))) for k in heads]
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")
        if res.get("distilled"):
            d = res["distill_settings"]
            out.append(f"After distillation ({d['train_examples']} examples, {d['epochs']} epoch(s)) (c):\n")
            out.append("| criterion | FLOPs budget | metric % ± SE | seconds |\n|---|--:|--:|--:|")
            for r in res["distilled"]:
                out.append(f"| {r['criterion']} | {r['budget']:.0%} | {100 * r['metric']:.1f} ± {100 * r['se']:.1f} | {r['seconds']:.0f} |")
            out.append("")
        if res.get("iterative"):
            one_shot = {(r["criterion"], r["budget"]): r for r in res["rows"] if r["units"] == "both" and "metric" in r}
            distilled = {(r["criterion"], r["budget"]): r for r in res.get("distilled", [])}
            out.append("Iterative schedule (d) against one-shot: before the step's own recovery (the iterative model has had a brief "
                       "recovery after each earlier step), and after the distillation of (c):\n")
            out.append("| criterion | FLOPs budget | one-shot, before | iterative, before | one-shot, distilled | iterative, distilled |")
            out.append("|---|--:|--:|--:|--:|--:|")
            for r in res["iterative"]:
                if r["budget"] >= 1.0:
                    continue
                o, d = one_shot.get((r["criterion"], r["budget"])), distilled.get((r["criterion"], r["budget"]))
                it_d = f"{100 * r['distilled']:.1f} ± {100 * r['distilled_se']:.1f}" if "distilled" in r else "-"
                od = _cell(d) if d else "-"
                out.append(f"| {r['criterion']} | {r['budget']:.0%} | {_cell(o)} | {_cell(r)} | {od} | {it_d} |")
            out.append("")
        out.append("Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["times_s"].items()) + "\n")
    variants = list(dict.fromkeys(r["criterion"] for res in results for r in res["rows"] if r["criterion"].startswith("attattr")))
    out.append("### The rule: at least the best of Taylor and Fisher minus one SE at every budget, on at least two tasks\n")
    out.append("| variant | " + " | ".join(res["task"] for res in results) + " | tasks passed |")
    out.append("|---|" + "---|" * len(results) + "--:|")
    for v in variants:
        measured = [any(r["criterion"] == v and "metric" in r for r in res["rows"]) for res in results]
        verdicts = [qualifies(res, v) if m else None for res, m in zip(results, measured)]
        cells = ["not measured" if x is None else "passes" if x[0] else "fails at " + ", ".join(x[1]) for x in verdicts]
        out.append(f"| {v} | " + " | ".join(cells) + f" | {sum(bool(x and x[0]) for x in verdicts)} |")
    return "\n".join(out) + "\n"


def iterative(args, prep, scores: dict, times: dict, save) -> list[dict]:
    """Part (d): each ``--iterative`` criterion's iterative curve over ``--iterative-steps`` (the pipeline's
    :func:`~prune_attattr.stages.curves.iterative_curve`, the criterion's AttAttr settings in the recipe),
    then its models at ``--distill-budgets`` distilled as in (c). Rows: ``{criterion, budget,
    flops_fraction, heads_kept, neurons_kept, metric, se}`` before the step's own recovery and
    ``distilled``/``distilled_se`` where distilled."""
    from prune_attattr.prune.units import prune_units
    from prune_attattr.recover.distill import recover
    from prune_attattr.stages.curves import iterative_curve
    from prune_attattr.stages.recovery import RecoveryState

    ctx, recipe = prep.ctx, prep.ctx.recipe
    metric, n_dev = ctx.metrics[0], len(prep.dev_enc)
    rows: list[dict] = []
    for name in args.iterative:
        method = name.split(":")[0]
        t0 = time.time()
        update = {"pruning": recipe.pruning.model_copy(update={"flops_steps": args.iterative_steps, "schedule": "iterative"})}
        if method == "attattr":
            aggregate, objective = name.split(":")[1].split("/")
            update["importance"] = recipe.importance.model_copy(
                update={"attattr": recipe.importance.attattr.model_copy(update={"aggregate": aggregate, "objective": objective})})
        ctx.recipe = recipe.model_copy(update=update)
        try:
            state = RecoveryState()
            h, n = scores[name]
            curve = iterative_curve(prep, h, method, state, neuron_scores=n, units="both", seq_len=mean_length(prep.dev_enc))
        finally:
            ctx.recipe = recipe
        times[f"iterative {name}"] = time.time() - t0
        for i, step in enumerate(curve):
            p = step.metrics[metric]
            row = {"criterion": name, "budget": step.budget, "flops_fraction": step.flops_fraction, "heads_kept": step.heads_kept,
                   "neurons_kept": step.neurons_kept, "metric": p, "se": se(p, n_dev)}
            if any(abs(step.budget - b) < 1e-9 for b in args.distill_budgets):
                t1 = time.time()
                base = state.snapshots.get(i - 1, prep.model)
                student = prune_units(copy.deepcopy(base), heads={int(k): v for k, v in step.pruned_heads.items()},
                                      neurons={int(k): v for k, v in step.pruned_neurons.items()})
                set_seed(recipe.seed)
                recover(student, None, state.loader, ctx.accelerator, recipe.recovery, cached_teacher=state.table)
                d = evaluate_model(student, prep.dev_loader, ctx.accelerator, ctx.metrics)[metric]
                row.update(distilled=d, distilled_se=se(d, n_dev), distill_seconds=time.time() - t1)
                ctx.print(f"   iterative {name} {step.budget:.2f}: {100 * p:.2f} before, {100 * d:.2f} distilled ({time.time() - t1:.0f} s)")
            rows.append(row)
        save()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--render":
        print(render(sys.argv[2:]))
        return
    args = parse_args()
    extra = ["recovery.enabled=true", "recovery.mode=distill", f"recovery.train_examples={args.train_examples}",
             f"recovery.epochs={args.epochs}"]
    t_start = time.time()
    try:
        recipe = load_recipe(args.recipe, args.overrides + extra)
        prep = prepare(recipe)
    except (RecipeError, RunError) as exc:
        sys.exit(f"error: {exc}")
    ctx, model = prep.ctx, prep.model
    metric = ctx.metrics[0]
    n_dev = len(prep.dev_enc)
    baseline = evaluate_unpruned(prep)[metric]
    costs = unit_flops(model, mean_length(prep.dev_enc))
    a = recipe.importance.attattr
    bound = recipe.importance.max_tokens_per_forward
    base_key = (STAGE_CACHE_VERSION, prep.model_key, encoded_digest(prep.imp_enc), bound)
    times: dict[str, float] = {"prepare": time.time() - t_start}

    def save():  # after every part, so that an interrupted run keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    result = {"recipe": args.recipe, "task": recipe.data.task, "metric": metric, "dev_examples": n_dev,
              "importance_examples": len(prep.imp_enc), "unpruned": baseline, "unpruned_se": se(baseline, n_dev),
              "times_s": times, "settings": vars(args)}

    # scores: AttAttr variants (one pass per objective), Taylor and Fisher as the pipeline computes them
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    objectives = sorted({v.split("/")[1] for v in args.variants})
    for objective in objectives:
        t0 = time.time()
        key = digest("criteria attattr variants", *base_key, a.steps, a.mode, a.quadrature, a.target, objective)

        def compute(objective=objective):
            v = imp.attattr_variants(model, prep.imp_loader, ctx.accelerator, objective=objective, steps=a.steps, target=a.target,
                                     mode=a.mode, quadrature=a.quadrature, max_tokens_per_forward=bound)
            return {agg: [h.tolist(), n.tolist()] for agg, (h, n) in v.items()}

        value, reused = cached_value(ctx, key, compute)
        times[f"attattr {objective}" + (" (cached)" if reused else "")] = time.time() - t0
        for agg, (h, n) in value.items():
            scores[f"attattr:{agg}/{objective}"] = (torch.tensor(h), torch.tensor(n))
    scores = {k: v for k, v in scores.items() if k.split(":")[1] in args.variants}
    for method in args.baselines:
        t0 = time.time()
        h, r1 = cached_importance(prep, method)
        n, r2 = cached_importance(prep, method, unit="neurons")
        times[f"{method}" + (" (cached)" if r1 and r2 else "")] = time.time() - t0
        scores[method] = (h, n)
    if "taylor" in args.baselines:
        t0 = time.time()
        key = digest("criteria taylor raw heads", *base_key)
        raw, _ = cached_value(ctx, key, lambda: imp.unit_importance(
            "taylor", model, prep.imp_loader, ctx.accelerator, units="heads", normalize=False, max_tokens_per_forward=bound)[0].tolist())
        taylor_raw = torch.tensor(raw)
        times["taylor raw heads"] = time.time() - t0

    result["scores"] = {name: {"heads": h.tolist(), "neurons": n.tolist()} for name, (h, n) in scores.items()}

    # a. leave-one-out and rank correlations
    if not args.skip_loo:
        t0 = time.time()
        sampled = sample_neurons(model, args.neurons_per_layer, seed=recipe.seed)
        key = digest("criteria leave-one-out", *base_key, ctx.metrics, sampled)

        def compute_loo():
            r = leave_one_out(model, prep.imp_loader, ctx.accelerator, neurons=sampled, metrics=ctx.metrics, max_tokens_per_forward=bound)
            return {"base_loss": r.base_loss, "base_metric": r.base_metric, "head_loss": r.head_loss.tolist(),
                    "head_metric": r.head_metric.tolist(), "neurons": {str(k): v for k, v in r.neurons.items()},
                    "neuron_loss": {str(k): v.tolist() for k, v in r.neuron_loss.items()},
                    "neuron_metric": {str(k): v.tolist() for k, v in r.neuron_metric.items()}}

        loo, reused = cached_value(ctx, key, compute_loo)
        times["leave-one-out" + (" (cached)" if reused else "")] = time.time() - t0
        result["leave_one_out"] = loo
        corr = {name: correlations(h, n, loo, sampled) for name, (h, n) in scores.items()}
        if "taylor" in args.baselines:
            corr["taylor_raw"] = correlations(taylor_raw, None, loo, {})
        result["spearman"] = corr
        save()
        for name, c in corr.items():
            ctx.print(f"   {name}: " + ", ".join(f"{k} {v:+.3f}" for k, v in c.items()))

    # b. before recovery
    t0 = time.time()
    rows = []
    result["rows"] = rows
    pruned_models = {}
    for name, (h, n) in scores.items():
        method = name.split(":")[0]
        aggregate = name.split(":")[1].split("/")[0] if method == "attattr" else "max"
        balance = balance_for(method, recipe.pruning.balance, aggregate)
        for budget in args.budgets:
            row = {"criterion": name, "units": "both", "budget": budget, "balance": balance}
            try:
                choice = choose_units(model, h, n, costs, budget, "both", balance)
            except SearchError as exc:
                row["skipped"] = str(exc)
                rows.append(row)
                continue
            pruned = prune_copy(prep, choice.pruned_heads, choice.pruned_neurons)
            pruned_models[(name, budget)] = (choice.pruned_heads, choice.pruned_neurons)
            p = cached_evaluate(prep, pruned)[0][metric]
            row.update(flops_fraction=flops_fraction(pruned, costs), heads_kept=choice.heads_kept, neurons_kept=choice.neurons_kept,
                       metric=p, se=se(p, n_dev))
            rows.append(row)
            ctx.print(f"   {name} both {budget:.2f}: {100 * row['flops_fraction']:.1f}% FLOPs, {row['heads_kept']} heads, "
                      f"{row['neurons_kept']} neurons: {100 * p:.2f} ± {100 * row['se']:.2f}")
        order = torch.argsort(h.flatten(), descending=True, stable=True).tolist()
        n_heads = h.shape[1]
        for k in args.heads:
            drop = order[k:]
            pruned_heads: dict[int, list[int]] = {}
            for i in drop:
                pruned_heads.setdefault(i // n_heads, []).append(i % n_heads)
            pruned = prune_copy(prep, pruned_heads)
            p = cached_evaluate(prep, pruned)[0][metric]
            rows.append({"criterion": name, "units": "heads", "heads_kept": k, "flops_fraction": flops_fraction(pruned, costs),
                         "metric": p, "se": se(p, n_dev)})
            ctx.print(f"   {name} heads {k}: {100 * p:.2f} ± {100 * se(p, n_dev):.2f}")
        times["before recovery (so far)"] = time.time() - t0
        save()
    times.pop("before recovery (so far)", None)
    times["before recovery"] = time.time() - t0

    # c. distillation
    if args.distill:
        from prune_attattr.recover.distill import recover
        from prune_attattr.stages.recovery import RecoveryState

        t0 = time.time()
        state = RecoveryState()
        state.ensure(prep)
        times["teacher logits"] = time.time() - t0
        distilled = []
        for name in args.distill:
            for budget in args.distill_budgets:
                if (name, budget) not in pruned_models:
                    continue
                t1 = time.time()
                student = prune_copy(prep, *pruned_models[(name, budget)])
                set_seed(recipe.seed)
                recover(student, None, state.loader, ctx.accelerator, recipe.recovery, cached_teacher=state.table)
                p = evaluate_model(student, prep.dev_loader, ctx.accelerator, ctx.metrics)[metric]
                distilled.append({"criterion": name, "budget": budget, "metric": p, "se": se(p, n_dev), "seconds": time.time() - t1})
                ctx.print(f"   distilled {name} {budget:.2f}: {100 * p:.2f} ({time.time() - t1:.0f} s)")
        result["distilled"] = distilled
        result["distill_settings"] = {"train_examples": len(state.train), "epochs": recipe.recovery.epochs}
        save()

    # d. iterative schedule
    if args.iterative:
        result["iterative"] = iterative(args, prep, scores, times, save)
    times["total"] = time.time() - t_start
    print(f"\nunpruned {metric} {100 * baseline:.2f}% (dev {n_dev}); times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    save()


if __name__ == "__main__":
    main()
