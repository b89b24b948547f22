"""Stage "recovery" (issue 10): recover export candidates, search the budget after recovery, cost each one.

:func:`recovery_train_set` tokenises the recovery examples (disjoint from the importance examples);
:class:`RecoveryState` holds them and the teacher's logits for the whole run (the iterative curve of
:mod:`prune_attattr.stages.curves` shares it); :func:`recovery_stage` recovers the candidates
(:func:`prune_attattr.recover.distill.recover`), picks the one ``export`` asks for, judged after recovery
(:func:`prune_attattr.prune.budget.search_budget`), and costs every tried model (:func:`model_cost`).

Both long parts are stage-cached (:meth:`prune_attattr.stages.context.RunContext.cached_tensors`): the
teacher's logits, and each recovered candidate's weights with its metrics before/after recovery and its
recovery info, so a run killed after recovery resumes without recovering again (issue 17).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..prune.budget import search_budget
from ..cache import digest, encoded_digest, tensors_digest
from ..config import Recipe
from ..prune.cost import flops_per_token, unit_flops
from ..errors import RunError
from ..evaluation import evaluate_outputs
from ..prune.curve import flops_fraction
from ..models import kept_neurons, num_heads_total, removed_sublayers
from ..prune.neurons import pruned_neurons_of
from ..prune.units import prune_units
from ..prune.heads import count_parameters, pruned_heads_of
from ..recover.distill import recover, recovery_dataloader, teacher_logits
from ..recover.rescale import least_squares
from ..tasks import Encoded, encode, load_task_data, make_dataloader
from .context import STAGE_CACHE_VERSION, Prepared, cached_evaluation, mean_length, pruned_key, reference_logits
from .export import ExportChoice, example_batches, export_target, latency_feeds, measure_latency, within_budget
from .prepare import split_train

__all__ = ["recovery_train_set", "RecoveryState", "model_cost", "Recovered", "recovery_stage"]


def recovery_train_set(recipe: Recipe, tokenizer) -> Encoded:
    """Tokenised recovery examples: the first ``recovery.train_examples`` of the shuffled training pool,
    disjoint from the importance examples (the split of :func:`prune_attattr.stages.prepare.split_train`).

    Raises:
        RunError: no training split.
    """
    train, dev, _, _ = load_task_data(recipe)
    if train is None:
        raise RunError("recovery.enabled needs a training split")
    as_finetune = recipe.finetune.model_copy(update={"enabled": True, "train_examples": recipe.recovery.train_examples})
    _, examples = split_train(recipe.model_copy(update={"finetune": as_finetune}), train, dev)
    return encode(tokenizer, examples, recipe.model.max_length)


@dataclass
class RecoveryState:
    """What the recovery stages share within one run: the recovery data and the teacher's logits (computed
    once), and for ``pruning.schedule: iterative`` the briefly recovered model of each curve step."""

    train: Encoded | None = None
    loader: object = None
    table: torch.Tensor | None = None
    teacher_seconds: float | None = None
    snapshots: dict[int, torch.nn.Module] = field(default_factory=dict)

    def ensure(self, prep: Prepared) -> None:
        """Build the recovery dataloader and (distillation on) the teacher logits the first time; the
        logits come from the stage cache when the same model saw the same batches before."""
        if self.loader is not None:
            return
        r, ctx = prep.ctx.recipe, prep.ctx
        self.train = recovery_train_set(r, ctx.tokenizer)
        self.loader = recovery_dataloader(self.train, batch_size=r.recovery.batch_size, pad_id=ctx.pad_id, seed=r.seed)
        distil = r.recovery.alpha > 0 and r.recovery.mode == "distill"
        # the batches (and so the padding) follow the examples, the batch size and the seed
        key = digest("teacher logits", STAGE_CACHE_VERSION, prep.model_key, encoded_digest(self.train), r.recovery.batch_size, r.seed)
        hit = ctx.cached_tensors(key) if distil else None
        if hit is not None:
            info, tensors = hit
            self.table, self.teacher_seconds = tensors["logits"].to(ctx.accelerator.device), info["seconds"]
            ctx.reused.append("recovery: teacher logits")
            return
        start = time.perf_counter()
        self.table = teacher_logits(prep.model, self.loader, ctx.accelerator) if distil else None
        self.teacher_seconds = round(time.perf_counter() - start, 1)
        if distil:
            ctx.store(key, {"seconds": self.teacher_seconds}, {"logits": self.table})


def _candidate_key(prep: Prepared, state: RecoveryState, student: torch.nn.Module, from_snapshot: bool) -> str:
    """Stage-cache key of recovering ``student`` (pruned, not yet recovered): the model, its pruned heads
    (and, when it starts from an iterative curve's recovered snapshot, its weights), the recovery
    settings, data, seed and schedule, the process count (it sets the effective batch), and the dev
    evaluation of the metrics stored with it."""
    ctx, r = prep.ctx, prep.ctx.recipe
    start = tensors_digest(student.state_dict()) if from_snapshot else "unpruned model"
    evaluation = {"dev": encoded_digest(prep.dev_enc), "batch_size": r.pruning.eval_batch_size, "metrics": ctx.metrics}
    return digest(
        "recovery", STAGE_CACHE_VERSION, prep.model_key, pruned_key(student), start, r.recovery.model_dump(mode="json"),
        encoded_digest(state.train), r.seed, r.pruning.schedule, ctx.accelerator.num_processes, evaluation,
    )


def model_cost(prep: Prepared, model, feeds: dict, example: dict) -> dict:
    """Heads and neurons kept, parameters, analytic FLOPs per token at the latency inputs' length
    (:func:`prune_attattr.prune.cost.flops_per_token`), the FLOPs fraction kept at the dev split's mean length
    (the curves' axis), and (``export.onnx``, main process) the ONNX Runtime median latency in ms of one
    call on ``feeds``."""
    e = prep.ctx.recipe.export
    seq = int(feeds["input_ids"].shape[1])
    flops = flops_per_token(model, seq)
    out = {
        "heads_kept": num_heads_total(model) - sum(len(v) for v in pruned_heads_of(model).values()),
        "neurons_kept": sum(len(n) for n in kept_neurons(model)),
        "flops_fraction": flops_fraction(model, unit_flops(prep.model, mean_length(prep.dev_enc))),
        "parameters": count_parameters(model),
        "seq_len": seq,
        "attention_flops_per_token": flops["attention"],
        "total_flops_per_token": flops["total"],
        "latency_ms": None,
    }
    if e.onnx and prep.ctx.accelerator.is_main_process:
        out["latency_ms"] = measure_latency(prep, model, feeds, example)["median_ms"]
    return out


@dataclass
class Recovered:
    """The export candidate chosen after recovery, and the report's ``recovery`` entry."""

    choice: ExportChoice
    report: dict


def _least_squares(prep: Prepared, state: RecoveryState, student: torch.nn.Module) -> dict:
    """``recovery.mode: least_squares``: Kwon et al. 2022's layer-wise rescaling of ``student``'s kept
    heads and neurons (:func:`prune_attattr.recover.rescale.least_squares`, teacher the unpruned model), fitted
    on the first ``recovery.least_squares_examples`` recovery examples, each process its share."""
    ctx, r = prep.ctx, prep.ctx.recipe
    n = min(r.recovery.least_squares_examples, len(state.train))
    acc = ctx.accelerator
    batches = [
        {k: v.to(acc.device) for k, v in b.items() if k != "labels"}
        for i, b in enumerate(make_dataloader(state.train.subset(range(n)), batch_size=r.recovery.batch_size, pad_id=ctx.pad_id))
        if i % acc.num_processes == acc.process_index
    ]
    result = least_squares(student, batches, teacher=prep.model, accelerator=acc)
    student.eval()
    return {"mode": "least_squares", "seconds": result.seconds, "examples": n, "tokens": result.tokens, "skipped": list(result.skipped)}


def recovery_stage(prep: Prepared, scores: dict, curves: dict, baseline: dict, state: RecoveryState, neuron_scores: dict | None = None) -> Recovered:
    """Stage "recovery": recover export candidates and pick the one ``export`` asks for, judged after recovery.

    ``export.heads`` / ``export.flops``: recovers that model. ``export.max_drop``:
    :func:`prune_attattr.prune.budget.search_budget` over ``curves[export.method]`` (steps ordered by falling
    cost: heads kept, or FLOPs kept), starting above the most pruned step within budget before recovery;
    each candidate tried is a copy of the pruned model (of its briefly recovered model with
    ``pruning.schedule: iterative``) recovered by ``recovery.mode``: distillation
    (:func:`prune_attattr.recover.distill.recover`) or least squares (:func:`_least_squares`). Runs on every
    process. The unpruned model and every tried one get their cost (:func:`model_cost`), metric and
    loyalty to the unpruned model (:func:`prune_attattr.evaluation.loyalty`) before/after recovery in the
    report (``metric_before``/``metric_after``, ``loyalty_before``/``loyalty_after``).

    Raises:
        RunError: ``export.heads`` above the model's head count, an ``export.flops`` the units cannot reach.
    """
    from accelerate.utils import set_seed

    ctx, r = prep.ctx, prep.ctx.recipe
    e, rec = r.export, r.recovery
    metric = ctx.metrics[0]
    model = prep.model
    curve = curves[e.method]
    by_flops = r.pruning.units != "heads"
    models: dict[int, torch.nn.Module] = {}
    infos: dict[int, dict] = {}
    with ctx.stage(f"recovery ({rec.mode})"):
        state.ensure(prep)

        counts = {"tried": 0, "reused": 0}

        def start_model(i: int, pruned: dict, neurons: dict, sublayers: dict, on_curve: bool) -> tuple[torch.nn.Module, bool]:
            """The pruned model candidate ``i`` recovers from, and whether it is an iterative snapshot's."""
            snaps = state.snapshots if on_curve else {}  # a step off the curve starts from the unpruned model
            if i in snaps:
                return copy.deepcopy(snaps[i]), True
            base = snaps[i - 1] if i - 1 in snaps else model
            return prune_units(copy.deepcopy(base), heads=pruned, neurons=neurons, sublayers=sublayers), base is not model

        def describe(m: torch.nn.Module) -> str:
            heads = num_heads_total(model) - sum(len(v) for v in pruned_heads_of(m).values())
            if not by_flops:
                return f"{heads} heads"
            gone = sum(len(v) for v in removed_sublayers(m).values())
            return f"{heads} heads, {sum(len(n) for n in kept_neurons(m))} neurons" + (f", {gone} sublayers removed" if gone else "")

        def recovered_metric(i: int, off_curve: tuple[dict, dict, dict] | None = None) -> float:
            on_curve = off_curve is None
            pruned, neurons, sublayers = (curve[i].pruned_heads, curve[i].pruned_neurons, curve[i].removed_sublayers) if on_curve else off_curve
            student, from_snapshot = start_model(i, pruned, neurons, sublayers, on_curve)
            key = _candidate_key(prep, state, student, from_snapshot)
            hit = ctx.cached_tensors(key)
            counts["tried"] += 1
            reference = reference_logits(prep)

            def evaluate(m):
                return evaluate_outputs(m, prep.dev_loader, ctx.accelerator, ctx.metrics, reference=reference)

            def unrecovered() -> tuple[dict, dict | None]:
                if on_curve:
                    return curve[i].metrics, curve[i].loyalty
                got = evaluate(student)
                return got.metrics, got.loyalty

            if hit is not None:  # the recovered weights, metrics and info of an earlier run
                found, weights = hit
                loyal_before = unrecovered()[1] if "loyalty" not in found else None  # an entry from before loyalty
                student.load_state_dict(weights)
                student.eval()
                counts["reused"] += 1
                if "loyalty" not in found:
                    found["loyalty"] = {"before": loyal_before, "after": evaluate(student).loyalty}
                    ctx.store(key, found, student.state_dict())
            else:
                before, loyal_before = unrecovered()
                set_seed(r.seed)  # each candidate's dropout draws: the same whatever ran, or came from the cache, before
                if rec.mode == "least_squares":
                    info = _least_squares(prep, state, student)
                else:
                    teacher = prep.model if rec.hidden_weight > 0 else None  # layer-wise distillation runs it per batch
                    info = recover(student, teacher, state.loader, ctx.accelerator, rec, cached_teacher=state.table)
                after = evaluate(student)
                found = {"before": before, "after": after.metrics, "recovery": info, "loyalty": {"before": loyal_before, "after": after.loyalty}}
                ctx.store(key, found, student.state_dict())
            models[i], infos[i] = student, found
            before, after, info = found["before"], found["after"], found["recovery"]
            ctx.print(
                f"   recovered {e.method} with {describe(student)}: {metric} "
                f"{100 * before[metric]:.2f}% -> {100 * after[metric]:.2f}% ({info['seconds'] / 60:.1f} min"
                + (", reused)" if hit is not None else ")")
            )
            return after[metric]

        sizes = [s.flops_fraction if by_flops else s.heads_kept for s in curve]
        if e.heads is not None or e.flops is not None:
            index, pruned, neurons, sublayers, rule = export_target(prep, scores[e.method], (neuron_scores or {}).get(e.method), curve)
            if index is not None:
                recovered_metric(index)
            else:
                index = len(curve)  # a model off the curve
                recovered_metric(index, (pruned, neurons, sublayers))
            tried = [index]
            rule += ", after recovery"
        else:
            floor = baseline[metric] - e.max_drop
            within = within_budget(curve, metric, floor)
            choice = search_budget(sizes, floor, recovered_metric, known_within=max(within) if within else 0)
            index, tried = choice.index, choice.tried
            axis = "FLOPs kept (%)" if by_flops else "heads kept"
            shown = [round(100 * sizes[i], 1) if by_flops else sizes[i] for i in tried]
            rule = (
                f"most pruned step with {metric} >= unpruned - {100 * e.max_drop:g} points after recovery "
                f"(binary search over the curve; {axis} of the steps tried: {shown})"
            )
            if infos[index]["after"][metric] < floor - 1e-12:
                rule += "; no recovered step met the budget, the least pruned one tried is exported"
        feeds = latency_feeds(prep)
        example = example_batches(prep.dev_enc, ctx.pad_id, 8, 1)[0]
        unpruned_loyalty = cached_evaluation(prep, model)[1]
        rows = [{
            "label": "unpruned", "metric_before": baseline[metric], "metric_after": None, "loyalty_before": unpruned_loyalty,
            "loyalty_after": None, **model_cost(prep, model, feeds, example),
        }]
        for i in tried:
            cost = model_cost(prep, models[i], feeds, example)
            rows.append({
                "label": describe(models[i]) + (f" ({100 * cost['flops_fraction']:.0f}% FLOPs)" if by_flops else ""),
                "exported": i == index,
                "metric_before": infos[i]["before"][metric],
                "metric_after": infos[i]["after"][metric],
                "loyalty_before": infos[i]["loyalty"]["before"],
                "loyalty_after": infos[i]["loyalty"]["after"],
                "recovery_minutes": round(infos[i]["recovery"]["seconds"] / 60, 2),
                **cost,
            })
    if counts["reused"]:
        ctx.reused.append(f"recovery ({counts['reused']}/{counts['tried']} candidates)")
    chosen = models[index]
    exported = rows[1 + tried.index(index)]
    report = {
        "settings": rec.model_dump(mode="json"),
        "schedule": r.pruning.schedule,
        "train_examples": len(state.train),
        "teacher_seconds": state.teacher_seconds,
        "latency_batch": int(feeds["input_ids"].shape[0]),
        "tried_heads": [row["heads_kept"] for row in rows[1:]],
        "exported_heads": exported["heads_kept"],
        "models": rows,
    }
    choice = ExportChoice(
        e.method, rule, chosen, pruned_heads_of(chosen), infos[index]["after"], pruned_neurons_of(chosen), exported["flops_fraction"],
        infos[index]["loyalty"]["after"], removed_sublayers(chosen),
    )
    return Recovered(choice, report)
