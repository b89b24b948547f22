"""Stage "prepare": data, tokenizer and model loaded, checked, fine-tuned; the unpruned model evaluated.

:func:`prepare` loads everything, runs :func:`check_run` (every check that needs the model, before any
long stage), fine-tunes (or reuses the cached fine-tuned model) and returns :class:`Prepared`;
:func:`evaluate_unpruned` gives the baseline metrics every later stage compares against.
"""

from __future__ import annotations

import random

import torch

from ..cache import StageCache, cache_root, digest, model_fingerprint
from ..config import Recipe
from ..errors import RunError
from ..checks import check_model_inputs, load_tokenizer
from ..loading import load_classifier
from ..models import align_labels, check_labels, num_heads_total, resolve_model_path
from ..tasks import Examples, encode, label_names, load_task_data
from .context import Prepared, RunContext, cached_evaluate, mean_length

__all__ = ["split_train", "check_run", "prepare", "evaluate_unpruned"]


def split_train(recipe: Recipe, train: Examples | None, dev: Examples):
    """Importance examples and fine-tuning examples, disjoint when both come from the train split."""
    rng = random.Random(recipe.seed)
    n_imp = recipe.importance.examples
    if recipe.importance.source == "train_heldout":
        if train is None:
            raise RunError("importance.source 'train_heldout' needs a training split; use importance.source dev")
        order = list(range(len(train)))
        rng.shuffle(order)
        if n_imp >= len(order):
            raise RunError(f"importance.examples {n_imp} leaves no training data (train split has {len(order)})")
        heldout, pool = order[:n_imp], order[n_imp:]
        imp_examples = train.subset(heldout)
    else:
        pool = list(range(len(train))) if train is not None else []
        rng.shuffle(pool)
        idx = list(range(len(dev)))
        random.Random(recipe.seed + 1).shuffle(idx)
        imp_examples = dev.subset(sorted(idx[:n_imp]))
    ft = None
    if recipe.finetune.enabled:
        if train is None:
            raise RunError("finetune.enabled needs a training split")
        n = recipe.finetune.train_examples or len(pool)
        ft = train.subset(pool[:n])
    return imp_examples, ft


def _names_map(model: torch.nn.Module, task: str, labels: list[str]) -> dict[str, str] | None:
    """``{task label: readable name}`` when the model's ``id2label`` holds the task's readable names
    (:func:`prune_attattr.tasks.label_names`; e.g. a model this tool exported for SST-2 says negative/positive
    where the files say 0/1), else None."""
    names = label_names(task, labels)
    got = {str(v).lower() for v in (model.config.id2label or {}).values()}
    return dict(zip(labels, names)) if names != list(labels) and got == {n.lower() for n in names} else None


def check_run(recipe: Recipe, model: torch.nn.Module, *, has_train: bool, labels: list[str]) -> None:
    """Every check that needs the loaded model (or the data), made before any long stage.

    Raises:
        RunError: ``export.heads`` above the model's head count; ``pruning.step_fraction`` that removes
            zero heads per step; an analysis whose input is missing (triggers without a training
            split, universality sets without a split or with labels the model does not have); static
            int8 (``export.quantize`` int8_static or all) or ``export.vocabulary: train`` without a training split.
    """
    r = recipe
    total = num_heads_total(model)
    if r.export.enabled and r.export.heads is not None and r.export.heads > total:
        raise RunError(f"export.heads {r.export.heads} exceeds the model's {total} heads; use at most {total}")
    if r.pruning.enabled and int(round(r.pruning.step_fraction * total)) == 0:
        raise RunError(
            f"pruning.step_fraction {r.pruning.step_fraction:g} removes 0 of the model's {total} heads per step "
            f"(rounds to zero); use at least {1 / total:.4g} (one head per step)"
        )
    if r.export.enabled and r.export.quantize in ("int8_static", "all") and not has_train:
        raise RunError(f"export.quantize '{r.export.quantize}' calibrates static int8 on training sentences; give data.train_file or use quantize int8")
    if r.export.enabled and r.export.vocabulary == "train" and not has_train:
        raise RunError("export.vocabulary 'train' keeps the tokens of the training split; give data.train_file or use export.vocabulary all")
    a = r.analyses
    if a.triggers.enabled and not has_train:
        raise RunError("analyses.triggers extracts patterns from training examples; give data.train_file or disable it")
    if a.universality.enabled:
        from ..analyses import check_universality_sets

        check_universality_sets(r, labels)


def check_flops_budget(recipe: Recipe, model: torch.nn.Module, seq_len: float) -> None:
    """``export.flops`` must be reachable by ``pruning.units`` (checked before any long stage).

    Raises:
        RunError: a budget below the lowest FLOPs fraction the units can reach (e.g. heads alone cannot
            remove the feed-forward blocks' share), with that fraction.
    """
    from ..prune.cost import unit_flops
    from ..prune.search import lowest_fraction

    e, units = recipe.export, recipe.pruning.units
    if not (e.enabled and recipe.pruning.enabled and e.flops is not None):
        return
    c = unit_flops(model, seq_len)
    floor = lowest_fraction(c.head, c.neuron, c.fixed, c.heads_total, c.neurons_total, units)
    if e.flops < floor:
        raise RunError(
            f"export.flops {e.flops:g} cannot be reached pruning {units}: the lowest FLOPs fraction is {floor:.4g} "
            f"at the dev split's mean length ({seq_len:.1f} tokens); raise export.flops"
            + ("" if units == "both" else " or set pruning.units both")
        )


def prepare(recipe: Recipe, accelerator=None, *, quiet: bool = False, use_cache: bool = True) -> Prepared:
    """Load data, tokenizer and model, run :func:`check_run`, fine-tune (or reuse the cached fine-tuned
    model), build the dataloaders.

    Args:
        use_cache: False: ignore cached fine-tuned models and stage results (new results are still stored).

    Raises:
        RunError, DataError, prune_attattr.models.ModelError: bad input.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    r = recipe
    if r.runtime.threads:
        torch.set_num_threads(r.runtime.threads)
    if accelerator is None:
        accelerator = Accelerator(cpu=r.runtime.cpu, mixed_precision=r.runtime.mixed_precision)
    set_seed(r.seed)
    model_path = resolve_model_path(r.model.path, r.model.revision)
    train, dev, labels, metric_names = load_task_data(r)
    tokenizer = load_tokenizer(model_path)  # a folder without tokenizer files is named, not the data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    root = cache_root(r.finetune.cache_dir)
    ctx = RunContext(r, accelerator, tokenizer, pad_id, metric_names, labels, quiet=quiet, cache=StageCache(root, enabled=use_cache))
    imp_examples, ft_examples = split_train(r, train, dev)
    id2label = dict(enumerate(labels))
    # the model as the run will see it (fine-tuning keeps its architecture): checks before any long stage;
    # a model used as it is must have a trained head whose labels are the task's, in the task's order
    if ft_examples is not None:
        model = load_classifier(model_path, id2label=id2label)
    else:
        model = load_classifier(model_path, require_trained_head=True)
    check_run(r, model, has_train=train is not None, labels=labels)
    check_model_inputs(r, model, tokenizer, model_path)  # vocabulary vs embeddings, model.max_length vs positions
    with ctx.stage("tokenize"):
        dev_enc = encode(tokenizer, dev, r.model.max_length)
        imp_enc = encode(tokenizer, imp_examples, r.model.max_length)
        ft_enc = encode(tokenizer, ft_examples, r.model.max_length) if ft_examples is not None else None
    check_flops_budget(r, model, mean_length(dev_enc))
    label_order = None
    if ft_enc is None:  # a model used as it is: its labels must be the task's, in the task's order
        label_map = r.data.label_map or _names_map(model, r.data.task, labels)
        label_order = check_labels(model, labels, label_map)  # model class ids in the task's order
        if label_order != list(range(len(labels))):
            align_labels(model, label_order)
            ctx.print(f"   the model's classes {label_order} reordered to the task's labels {labels} (classifier rows permuted)")
    finetune_info = None
    model_dir = model_path
    if ft_enc is not None:
        from ..recover.finetune import finetune

        del model
        with ctx.stage("fine-tune"):
            model_dir, finetune_info = finetune(
                model_path, tokenizer, ft_enc, id2label=id2label, settings=r.finetune, seed=r.seed,
                accelerator=accelerator, use_cache=use_cache,
            )
        if finetune_info["cached"]:
            ctx.reused.append("fine-tune")
        ctx.print(
            f"   fine-tuned model {'reused from cache' if finetune_info['cached'] else 'trained'}: {model_dir}"
            + ("" if finetune_info["cached"] else f" ({len(ft_enc)} examples)")
        )
        model = load_classifier(model_dir)
    model = model.to(accelerator.device)
    fingerprint = ctx.agree(model_fingerprint(model_dir) if accelerator.is_main_process else None)
    # a classifier head initialised at random (no fine-tuning, base model without one) depends on the seed;
    # the device type and precision change the figures in their last digits (the process count does not)
    model_key = digest(
        "model", fingerprint, labels, label_order, None if ft_enc is not None else r.seed, accelerator.device.type,
        str(accelerator.mixed_precision),
    )
    dev_loader = ctx.loader(dev_enc, r.pruning.eval_batch_size)
    imp_loader = ctx.loader(imp_enc, r.importance.batch_size)
    return Prepared(ctx, model, model_path, dev_enc, imp_enc, dev_loader, imp_loader, finetune_info, model_key, dev_examples=dev)


def evaluate_unpruned(prep: Prepared) -> dict:
    """Metrics of the unpruned model on the dev split (cached)."""
    ctx = prep.ctx
    with ctx.stage("evaluate unpruned"):
        baseline, reused = cached_evaluate(prep, prep.model, description="dev")
        if reused:
            ctx.reused.append("evaluate unpruned")
    ctx.print("   unpruned: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in baseline.items() if k != "loss") + (" (reused)" if reused else ""))
    return baseline
