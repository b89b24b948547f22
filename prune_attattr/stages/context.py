"""What every stage shares: the run context, the prepared model, and the cached dev evaluation.

:class:`RunContext` holds the accelerator, tokenizer, labels, timings and the stage cache
(:class:`prune_attattr.cache.StageCache`); :class:`Prepared` is the fine-tuned model with its data.
Every stage-cache key starts from ``Prepared.model_key`` and :data:`STAGE_CACHE_VERSION`; an evaluated
pruning step is keyed on the dev examples' tokens, the evaluation settings and the pruned heads
(:func:`cached_evaluation`), and stored with its loyalty to the unpruned model, whose dev logits are
computed once per model and cached (:func:`reference_logits`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import StageCache, digest, encoded_digest
from ..config import Recipe
from ..evaluation import Evaluation, evaluate_outputs, loyalty
from ..progress import console
from ..models import removed_sublayers
from ..prune.neurons import pruned_neurons_of
from ..prune.heads import pruned_heads_of
from ..tasks import Encoded, Examples, make_dataloader

__all__ = [
    "STAGE_CACHE_VERSION", "RunContext", "Prepared", "pruned_key", "mean_length", "reference_logits", "cached_evaluation", "cached_evaluate",
]

STAGE_CACHE_VERSION = 1  # bump when a change in the code changes importance scores, metrics or recovered weights


@dataclass
class RunContext:
    """What the stages share: the accelerator, tokenizer, labels, timings, the stage cache and what it reused."""

    recipe: Recipe
    accelerator: object
    tokenizer: object
    pad_id: int
    metrics: list[str]
    labels: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    quiet: bool = False
    cache: StageCache | None = None
    reused: list[str] = field(default_factory=list)

    def print(self, *args, **kwargs):
        if self.accelerator.is_main_process and not self.quiet:
            console().print(*args, **kwargs)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.print(f"[bold cyan]== {name}[/]")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.print(f"   {name}: {self.timings[name]:.1f} s")

    def loader(self, data: Encoded, batch_size: int):
        return self.accelerator.prepare(make_dataloader(data, batch_size=batch_size, pad_id=self.pad_id))

    def agree(self, value):
        """The main process's ``value``, on every process (so all take the same branch)."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def cached(self, key: str):
        """The stage cache's value for ``key`` as the main process reads it (None: compute)."""
        value = self.cache.get(key) if self.cache is not None and self.accelerator.is_main_process else None
        return self.agree(value)

    def cached_tensors(self, key: str) -> tuple[object, dict] | None:
        """``(value, tensors)`` of a stage-cache entry stored with tensors, or None (compute), the same on
        every process: the main process decides (on its own ``key``); the others then read the tensors of
        that key from the same cache folder (shared by the processes of a run, as the fine-tuned models'
        folder is).

        Raises:
            RuntimeError: another process cannot read tensors the main process read (a cache folder that
                is not shared).
        """
        value = tensors = None
        if self.cache is not None and self.accelerator.is_main_process:
            value = self.cache.get(key)
            tensors = self.cache.get_tensors(key) if value is not None else None
            value = value if tensors is not None else None
        key, value = self.agree((key, value))
        if value is None:
            return None
        if tensors is None:
            tensors = self.cache.get_tensors(key) if self.cache is not None else None
            if tensors is None:
                raise RuntimeError(
                    f"process {self.accelerator.process_index} cannot read the stage-cache tensors {key}, which the main "
                    "process read; give every process the same finetune.cache_dir"
                )
        return value, tensors

    def store(self, key: str, value, tensors: dict | None = None) -> None:
        """Store ``value`` (and ``tensors``, name -> tensor) under ``key`` (main process)."""
        if self.cache is not None and self.accelerator.is_main_process:
            self.cache.put(key, value, tensors)


@dataclass
class Prepared:
    """A fine-tuned model with its data, ready for importance, pruning or analyses.

    ``model_key``: digest of the model's bytes and labels (and seed when the classifier head was
    initialised at random), the root of every stage-cache key."""

    ctx: RunContext
    model: torch.nn.Module
    model_path: Path
    dev_enc: Encoded
    imp_enc: Encoded
    dev_loader: object
    imp_loader: object
    finetune_info: dict | None
    model_key: str = ""
    unpruned_latency: dict | None = None  # ONNX Runtime latency of ``model`` on the latency feeds, measured once
    dev_examples: Examples | None = None  # the dev split's texts and labels (the deployed ONNX model is evaluated on them)
    reference: Evaluation | None = None  # the unpruned model's dev evaluation with its logits [N, C] (reference_logits)
    sublayer_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> [layers, 2] (pruning.sublayers; importance stage)


def pruned_key(model) -> list:
    """The pruned units of ``model`` as a stage-cache key part: ``[[layer, [heads, ...]], ...]``, sorted,
    followed by ``["neurons", [[layer, [neurons, ...]], ...]]`` when feed-forward neurons are pruned and
    ``["sublayers", [[layer, [names]], ...]]`` when whole sublayers are removed (a model without them keeps
    the key it had before they could be)."""
    key = sorted((int(k), sorted(v)) for k, v in pruned_heads_of(model).items() if v)
    neurons = sorted((int(k), sorted(v)) for k, v in pruned_neurons_of(model).items() if v)
    key = key + [["neurons", neurons]] if neurons else key
    sublayers = sorted((int(k), list(v)) for k, v in removed_sublayers(model).items())
    return key + [["sublayers", sublayers]] if sublayers else key


def mean_length(data: Encoded) -> float:
    """Mean tokens per example of ``data`` (special tokens included): the sequence length of the cost model."""
    return float(sum(data.lengths) / max(1, len(data.lengths)))


def _eval_key(prep: Prepared, model) -> str:
    r = prep.ctx.recipe
    settings = {"batch_size": r.pruning.eval_batch_size, "metrics": prep.ctx.metrics}
    # "loyalty": the entry holds {"metrics", "loyalty"}; entries of metrics alone (before loyalty) are not read
    return digest("evaluate", STAGE_CACHE_VERSION, prep.model_key, encoded_digest(prep.dev_enc), settings, pruned_key(model), "loyalty")


def _reference(prep: Prepared) -> tuple[Evaluation, bool]:
    """``(evaluation of the unpruned model with its logits, reused)``: computed once per run (kept in
    ``prep.reference``), stage-cached (logits as tensors) like the baseline metrics."""
    if prep.reference is not None:
        return prep.reference, True
    ctx = prep.ctx
    key = _eval_key(prep, prep.model)
    hit = ctx.cached_tensors(digest("reference logits", key))
    if hit is not None:
        logits = hit[1]["logits"].float().cpu()
        prep.reference = Evaluation(hit[0]["metrics"], logits, loyalty(logits, logits))
        return prep.reference, True
    result = evaluate_outputs(prep.model, prep.dev_loader, ctx.accelerator, ctx.metrics, description="dev")
    result.loyalty = loyalty(result.logits, result.logits)
    prep.reference = result
    ctx.store(digest("reference logits", key), {"metrics": result.metrics}, {"logits": result.logits})
    ctx.store(key, {"metrics": result.metrics, "loyalty": result.loyalty})
    return result, False


def reference_logits(prep: Prepared) -> torch.Tensor:
    """The unpruned model's dev logits ``[N, C]`` (float32, CPU, dev loader order, the same on every
    process): the reference of every loyalty figure. Computed once per run and stage-cached with the
    unpruned model's metrics, like the baseline evaluation (the same pass gives both)."""
    return _reference(prep)[0].logits


def cached_evaluation(prep: Prepared, model, *, description: str | None = None) -> tuple[dict, dict | None, bool]:
    """``(metrics, loyalty, reused)`` of ``model`` on the dev loader, from the stage cache when possible.

    ``loyalty``: :func:`prune_attattr.evaluation.loyalty` against the unpruned model's dev logits
    (:func:`reference_logits`), computed in the same pass as the metrics; None for a regression head.
    The unpruned model's own evaluation is the pass that computes the reference (loyalty 1 and 1)."""
    if model is prep.model:
        ref, reused = _reference(prep)
        return ref.metrics, ref.loyalty, reused
    ctx = prep.ctx
    key = _eval_key(prep, model)
    hit = ctx.cached(key)
    if hit is not None:
        return hit["metrics"], hit["loyalty"], True
    result = evaluate_outputs(model, prep.dev_loader, ctx.accelerator, ctx.metrics, reference=reference_logits(prep), description=description)
    ctx.store(key, {"metrics": result.metrics, "loyalty": result.loyalty})
    return result.metrics, result.loyalty, False


def cached_evaluate(prep: Prepared, model, *, description: str | None = None) -> tuple[dict, bool]:
    """``(metrics, reused)`` of ``model`` on the dev loader (:func:`cached_evaluation` without the loyalty)."""
    metrics, _, reused = cached_evaluation(prep, model, description=description)
    return metrics, reused
