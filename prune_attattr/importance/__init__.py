"""Head importance: AttAttr (Hao et al. 2021) and the baselines of Michel et al. 2019.

Every method maps ``(model, prepared dataloader, accelerator)`` to a float32 tensor
``[num_layers, num_attention_heads]`` indexed by *original* head numbers (higher = more important;
heads already pruned score 0 and are never chosen again). Per-example scores are gathered across
processes with ``gather_for_metrics`` and summed, so N processes give the scores of one.

Every method cuts its batches the same way (:mod:`prune_attattr.importance.batching`): rows grouped
by length and run without padding columns, at most ``max_tokens_per_forward`` tokens per forward
(copies of a row included), so neither speed nor peak memory depends on the caller's batch order
or size. ``mixed_precision`` (default: the accelerator's, i.e. ``runtime.mixed_precision``) runs
the forwards under autocast on the accelerator's device type; scores are summed in float32.

Feed-forward neurons (issue 15) get ``[num_layers, intermediate_size]`` scores by the same conventions
(original neuron indices, pruned neurons 0): ``attattr_neuron_importance`` (knowledge attribution,
:mod:`prune_attattr.importance.neurons`), ``taylor_neuron_importance``, ``fisher_neuron_importance``
(:mod:`prune_attattr.importance.masks`) and ``random_neuron_importance``; ``fisher_importance`` scores
heads. :func:`unit_importance` returns both kinds from one call, from one backward where the method
allows it (taylor, fisher). ``accuracy_difference`` and ``attention`` score heads only.

AttAttr's pruning settings (issue 20; paper defaults ``aggregate="max"``, ``objective="prob"``):

* ``aggregate`` (:data:`AGGREGATES`), from one example's attribution of a head (its ``T x T`` matrix
  over real tokens) or of a neuron (its ``T`` tokens): ``max`` (Hao et al. 2021, section 4.1), summed
  over examples; ``sum``, the signed total, summed over examples: the integrated gradient of a gate on
  the unit's output along the path where the whole layer is scaled together, additive and complete,
  so heads and neurons share one unit; ``abs_sum``: ``|total|`` per example, summed; ``sq_sum``:
  ``total^2`` per example, summed (as Fisher squares the mask gradient). One attribution pass gives
  every aggregate (:func:`attattr_variants`).
* ``objective`` (:data:`~prune_attattr.importance.attattr.OBJECTIVES`): the attributed output,
  the target probability (``prob``, the paper) or its log (``log_prob``; with the gold label, minus
  the loss Taylor and Fisher differentiate). Each objective is its own pass.

:func:`~prune_attattr.importance.leave_one_out.leave_one_out` gives the ground truth these estimate: the
exact change of the loss and of the metric when one unit is masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attention import AttentionControl
from ..evaluation import compute_metrics
from ..models import (
    classify,
    embed,
    encoder_layers,
    evaluating,
    forward_logits,
    intermediate_size,
    kept_heads,
    kept_neurons,
    logits_from_layer,
    repeat_batch,
    run_layers,
)
from ..precision import autocast, resolve_precision
from ..registry import METHODS
from .attattr import (
    OBJECTIVES,
    attention_attribution,
    attribution_head_scores,
    attribution_head_sums,
    iter_group_attributions,
    iter_layer_attributions,
    quadrature_nodes,
)
from .batching import (
    DEFAULT_MAX_TOKENS,
    over_batches,
    split_evenly,
    sub_batches,
    token_budget,
)
from .masks import mask_gradients
from .leave_one_out import LeaveOneOut, leave_one_out
from .neurons import iter_neuron_attributions, neuron_attribution, neuron_scores, neuron_sums

__all__ = [
    "METHODS",
    "DEFAULT_MAX_TOKENS",
    "attention_attribution",
    "iter_layer_attributions",
    "quadrature_nodes",
    "attattr_importance",
    "attattr_variants",
    "aggregate_examples",
    "AGGREGATES",
    "ADDITIVE_AGGREGATES",
    "OBJECTIVES",
    "leave_one_out",
    "LeaveOneOut",
    "taylor_importance",
    "accuracy_difference_importance",
    "attention_importance",
    "random_importance",
    "fisher_importance",
    "neuron_attribution",
    "attattr_neuron_importance",
    "taylor_neuron_importance",
    "fisher_neuron_importance",
    "random_neuron_importance",
    "mask_gradients",
    "unit_importance",
    "NEURON_METHODS",
    "HEAD_ONLY_METHODS",
    "UNITS",
    "UNIT_METHODS",
]

#: AttAttr's aggregations of one example's attribution of a unit (see the module docstring); ``max`` is the paper's.
AGGREGATES: tuple[str, ...] = ("max", "sum", "abs_sum", "sq_sum")
#: Aggregations additive over units: heads and neurons share one unit (no balancing in a joint search).
ADDITIVE_AGGREGATES: tuple[str, ...] = ("sum", "abs_sum", "sq_sum")


def aggregate_examples(maxes: torch.Tensor, sums: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Sum per-example unit scores over examples by ``aggregate`` (:data:`AGGREGATES`).

    Args:
        maxes: ``[N, ...]`` per-example max of each unit's attribution; sums: ``[N, ...]`` its total.
        aggregate: ``max`` (Σ maxes), ``sum`` (Σ sums), ``abs_sum`` (Σ |sums|), ``sq_sum`` (Σ sums^2).

    Returns:
        ``[...]`` float32.

    Raises:
        ValueError: an unknown aggregate.
    """
    if aggregate == "max":
        return maxes.float().sum(0)
    if aggregate == "sum":
        return sums.float().sum(0)
    if aggregate == "abs_sum":
        return sums.float().abs().sum(0)
    if aggregate == "sq_sum":
        return sums.float().pow(2).sum(0)
    raise ValueError(f"unknown aggregate '{aggregate}'; use one of {list(AGGREGATES)}")


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate '{aggregate}'; use one of {list(AGGREGATES)}")


#: Methods that score feed-forward neurons as well as heads.
NEURON_METHODS: tuple[str, ...] = ("attattr", "taylor", "fisher", "random")
#: Methods that score heads only (their neuron scores are None in :func:`unit_importance`).
HEAD_ONLY_METHODS: tuple[str, ...] = ("accuracy_difference", "attention")


def _head_table(model: nn.Module, bsz: int, device) -> torch.Tensor:
    """Zeros ``[B, layers, heads]`` float32: per-example scores at original head indices."""
    return torch.zeros(bsz, len(encoder_layers(model)), model.config.num_attention_heads, device=device)


def _put(table: torch.Tensor, index: list[int], layer: int, heads: list[int], scores: torch.Tensor) -> None:
    """Write group scores ``[len(index), len(heads)]`` into ``table [B, layers, heads]`` at the caller's rows."""
    rows = torch.tensor(index, device=table.device)
    cols = torch.tensor(heads, device=table.device)
    table[rows[:, None], layer, cols[None, :]] = scores.float().to(table.device)


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _sub_batches(model: nn.Module, batch: dict, max_tokens: int):
    """``(caller rows, compacted sub-batch)`` per length group of ``batch`` (at most ``max_tokens`` tokens each)."""
    return sub_batches(batch, max_tokens, _pad_id(model))


def attattr_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    steps: int = 20,
    target: str = "gold",
    mode: str = "fast",
    quadrature: str = "left",
    chunk_size: int | None = None,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    aggregate: str = "max",
    objective: str = "prob",
    description: str | None = "AttAttr importance",
) -> torch.Tensor:
    """Head importance by self-attention attribution (Hao et al. 2021, section 4.1).

    Paper defaults: for each example and head, the max of the head's attribution matrix (Eq. 3) over
    valid token pairs; summed over examples. ``aggregate`` (:data:`AGGREGATES`) and ``objective``
    (``prob``, ``log_prob``) as in the module docstring. Unit: the objective's (``sq_sum``: squared).
    Returns ``[layers, heads]``. ``chunk_size`` (deprecated) additionally caps rows per forward; see
    the module docstring for ``max_tokens_per_forward`` and ``mixed_precision``.

    Raises:
        ValueError: an unknown ``aggregate`` or ``objective`` (and see :func:`attention_attribution`).

    Sample YAML::

        importance:
          methods: [attattr]
          max_tokens_per_forward: 16384
          attattr: {steps: 20, target: gold, mode: fast, quadrature: left, aggregate: max, objective: prob}
    """
    _check_aggregate(aggregate)
    maxes, sums = _attattr_head_tables(
        model, dataloader, accelerator, steps=steps, target=target, mode=mode, quadrature=quadrature, chunk_size=chunk_size,
        max_tokens_per_forward=max_tokens_per_forward, mixed_precision=mixed_precision, objective=objective, description=description,
    )
    return aggregate_examples(maxes, sums, aggregate)


def _attattr_head_tables(
    model, dataloader, accelerator, *, steps, target, mode, quadrature, chunk_size, max_tokens_per_forward, mixed_precision,
    objective, description,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example head max and total of the attribution, ``([N, layers, heads], [N, layers, heads])``, one pass."""
    precision = resolve_precision(mixed_precision, accelerator)
    heads = kept_heads(model)

    def work(batch):
        bsz, device = batch["input_ids"].shape[0], batch["input_ids"].device
        maxes, sums = _head_table(model, bsz, device), _head_table(model, bsz, device)
        for layer, groups in iter_group_attributions(
            model, batch, steps=steps, target=target, mode=mode, quadrature=quadrature,
            max_tokens_per_forward=max_tokens_per_forward, chunk_size=chunk_size, mixed_precision=precision,
            objective=objective,
        ):
            for g in groups:
                _put(maxes, g.index, layer, heads[layer], attribution_head_scores(g.attr, g.attention_mask))
                _put(sums, g.index, layer, heads[layer], attribution_head_sums(g.attr, g.attention_mask))
        return maxes, sums

    maxes, sums = over_batches(dataloader, accelerator, description, work)
    return maxes, sums


def _attattr_neuron_tables(
    model, dataloader, accelerator, *, steps, target, mode, quadrature, max_tokens_per_forward, mixed_precision, objective,
    description,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example neuron max and total of the attribution, ``([N, layers, neurons], [N, layers, neurons])``, one pass."""
    precision = resolve_precision(mixed_precision, accelerator)
    kept = kept_neurons(model)
    n_layers, size = len(kept), intermediate_size(model)

    def work(batch):
        bsz, device = batch["input_ids"].shape[0], batch["input_ids"].device
        maxes = torch.zeros(bsz, n_layers, size, device=device)
        sums = torch.zeros(bsz, n_layers, size, device=device)
        for layer, g in iter_neuron_attributions(
            model, batch, steps=steps, target=target, mode=mode, quadrature=quadrature,
            max_tokens_per_forward=max_tokens_per_forward, mixed_precision=precision, objective=objective,
        ):
            _put(maxes, g.index, layer, kept[layer], neuron_scores(g.attr, g.attention_mask))
            _put(sums, g.index, layer, kept[layer], neuron_sums(g.attr, g.attention_mask))
        return maxes, sums

    maxes, sums = over_batches(dataloader, accelerator, description, work)
    return maxes, sums


def attattr_variants(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    units: str = "both",
    aggregates: Sequence[str] = AGGREGATES,
    objective: str = "prob",
    steps: int = 20,
    target: str = "gold",
    mode: str = "fast",
    quadrature: str = "left",
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """AttAttr scores of every aggregate in ``aggregates`` for one ``objective``, from one attribution pass
    per unit kind: ``{aggregate: (heads [layers, heads] or None, neurons [layers, intermediate_size] or None)}``.

    Each entry equals :func:`attattr_importance` / :func:`attattr_neuron_importance` with that aggregate
    (``units``: ``heads``, ``neurons`` or ``both``). Arguments as theirs.

    Raises:
        ValueError: an unknown aggregate, objective or units.
    """
    if units not in UNITS:
        raise ValueError(f"unknown units '{units}'; use heads, neurons or both")
    for a in aggregates:
        _check_aggregate(a)
    ig = dict(steps=steps, target=target, mode=mode, quadrature=quadrature, max_tokens_per_forward=max_tokens_per_forward,
              mixed_precision=mixed_precision, objective=objective)
    head_tables = neuron_tables = None
    if units in ("heads", "both"):
        head_tables = _attattr_head_tables(model, dataloader, accelerator, chunk_size=None, **ig,
                                           description=f"AttAttr heads ({objective})" if progress else None)
    if units in ("neurons", "both"):
        neuron_tables = _attattr_neuron_tables(model, dataloader, accelerator, **ig,
                                               description=f"AttAttr neurons ({objective})" if progress else None)
    return {
        a: (None if head_tables is None else aggregate_examples(*head_tables, a),
            None if neuron_tables is None else aggregate_examples(*neuron_tables, a))
        for a in aggregates
    }


def taylor_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    normalize: bool = True,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "Taylor importance",
) -> torch.Tensor:
    """Head importance by first-order Taylor expansion (Michel et al. 2019, Eq. 4).

    ``I_h = |Σ_tokens A_h ⊙ ∂L/∂A_h|`` per example with the cross-entropy loss ``L`` (computed as the
    gradient of a per-example head mask xi_h = 1, :func:`mask_gradients`), summed over examples, then
    with ``normalize`` divided per layer by the layer's L2 norm (Michel et al., section 4.2).
    Returns ``[layers, heads]``; unit: loss (nats), or none when normalised.
    """
    grads, _ = mask_gradients(
        model, dataloader, accelerator, heads=True, neurons=False, max_tokens_per_forward=max_tokens_per_forward,
        mixed_precision=mixed_precision, description=description,
    )
    total = grads.abs().sum(0)
    if normalize:
        total = total / (total.norm(p=2, dim=-1, keepdim=True) + 1e-20)
    return total


def fisher_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "Fisher importance",
) -> torch.Tensor:
    """Head importance by the empirical Fisher information of the head mask (Kwon et al. 2022, section 4.1).

    ``I_h = Σ_examples (∂L/∂m_h)^2`` with ``m`` a per-example head mask of ones and ``L`` the
    cross-entropy loss against the gold label (:func:`mask_gradients`). Returns ``[layers, heads]``
    float32; unit: nats^2.
    """
    grads, _ = mask_gradients(
        model, dataloader, accelerator, heads=True, neurons=False, max_tokens_per_forward=max_tokens_per_forward,
        mixed_precision=mixed_precision, description=description,
    )
    return grads.pow(2).sum(0)


@torch.no_grad()
def accuracy_difference_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    metrics: Sequence[str] = ("accuracy",),
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "accuracy difference",
) -> torch.Tensor:
    """Head importance as the metric drop when that head alone is masked (Michel et al. 2019, section 3.1).

    ``I_h = metric(all heads) - metric(head h masked)`` on the importance examples, in metric units
    (fractions). Equal drops are ordered by the mean cross-entropy increase, added with weight 1e-6
    (below one example's share of the metric for up to 10^5 examples). Returns ``[layers, heads]``.

    Masking a head of layer l changes nothing below l, so each length group runs the lower layers
    once and the heads of a layer together (one copy of the group per head, as many copies per
    forward as ``max_tokens_per_forward`` allows), the last layer for [CLS] only.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    primary = metrics[0]
    heads = kept_heads(model)
    n_layers, n_heads = len(heads), model.config.num_attention_heads

    def work(batch):
        bsz = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        base = torch.zeros(bsz, model.config.num_labels, device=device)
        out = torch.zeros(bsz, n_layers, n_heads, model.config.num_labels, device=device)
        for index, sub in _sub_batches(model, batch, max_tokens):
            r, width = sub["input_ids"].shape
            rows = torch.tensor(index, device=device)
            per = max(1, max_tokens // (r * width))  # head copies per forward
            with autocast(device, precision):
                hidden, mask = embed(model, sub)
                for layer, hs in enumerate(heads):
                    k = len(hs)
                    for start, stop in split_evenly(k, per) if k else ():
                        c = stop - start
                        hm = torch.ones(c, r, k, device=device)
                        hm[torch.arange(c), :, torch.arange(start, stop)] = 0  # copy i masks head start + i
                        control = AttentionControl(head_mask={layer: hm.view(c * r, k)})
                        logits = logits_from_layer(model, repeat_batch(hidden, c), repeat_batch(mask, c), layer, control)
                        cols = torch.tensor(hs[start:stop], device=device)
                        out[rows[:, None], layer, cols[None, :]] = logits.float().view(c, r, -1).transpose(0, 1)
                    hidden = run_layers(model, hidden, mask, layer, layer + 1)
                base[rows] = classify(model, hidden).float()
        return base, out, batch["labels"]

    with evaluating(model, freeze=False):
        base, masked, labels = over_batches(dataloader, accelerator, description, work)
    base_metric = compute_metrics([primary], base.argmax(-1), labels)[primary]
    base_loss = float(nn.functional.cross_entropy(base, labels))
    scores = torch.zeros(n_layers, n_heads)
    for layer, hs in enumerate(heads):
        for h in hs:
            lg = masked[:, layer, h]
            drop = base_metric - compute_metrics([primary], lg.argmax(-1), labels)[primary]
            loss_up = float(nn.functional.cross_entropy(lg, labels)) - base_loss
            scores[layer, h] = drop + 1e-6 * loss_up
    return scores


@torch.no_grad()
def attention_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "attention-score importance",
) -> torch.Tensor:
    """Reference curve: a head's max attention probability over valid token pairs, summed over examples.

    The paper's contrast between attention scores and attribution scores (Hao et al. 2021, section 4.1).
    Returns ``[layers, heads]``.
    """
    max_tokens, _ = token_budget(max_tokens_per_forward)
    precision = resolve_precision(mixed_precision, accelerator)
    heads = kept_heads(model)

    def work(batch):
        device = batch["input_ids"].device
        table = _head_table(model, batch["input_ids"].shape[0], device)
        for index, sub in _sub_batches(model, batch, max_tokens):
            control = AttentionControl(record=True)
            with autocast(device, precision):
                forward_logits(model, sub, control)
            for layer, probs in control.recorded.items():
                _put(table, index, layer, heads[layer], attribution_head_scores(probs, sub["attention_mask"]))
        return table

    with evaluating(model, freeze=False):
        (per_example,) = over_batches(dataloader, accelerator, description, work)
    return per_example.sum(0)


def random_importance(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Reference curve: uniform random scores ``[layers, heads]`` from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(encoder_layers(model)), model.config.num_attention_heads, generator=gen)
    heads = kept_heads(model)
    for layer, hs in enumerate(heads):
        gone = [h for h in range(model.config.num_attention_heads) if h not in hs]
        scores[layer, gone] = 0
    return scores


def attattr_neuron_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    steps: int = 20,
    target: str = "gold",
    mode: str = "fast",
    quadrature: str = "left",
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    aggregate: str = "max",
    objective: str = "prob",
    description: str | None = "AttAttr neuron importance",
) -> torch.Tensor:
    """Feed-forward neuron importance by knowledge attribution (Dai, Dong, Hao et al. 2022, Eq. 3-4).

    Defaults: for each example and neuron, the max over the example's valid tokens of the neuron's
    integrated-gradients attribution (:func:`prune_attattr.importance.neurons.neuron_attribution`, zero
    baseline, the head method's quadrature, steps and target); summed over examples. ``aggregate`` and
    ``objective`` as for heads (module docstring). Unit: the objective's (target-class probability by
    default). Returns float32 ``[layers, intermediate_size]`` at original neuron indices (pruned neurons
    0). Sharded across processes like the head methods.

    Raises:
        ValueError: an unknown ``aggregate`` or ``objective`` (and see :func:`neuron_attribution`).
    """
    _check_aggregate(aggregate)
    maxes, sums = _attattr_neuron_tables(
        model, dataloader, accelerator, steps=steps, target=target, mode=mode, quadrature=quadrature,
        max_tokens_per_forward=max_tokens_per_forward, mixed_precision=mixed_precision, objective=objective, description=description,
    )
    return aggregate_examples(maxes, sums, aggregate)


def taylor_neuron_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "Taylor neuron importance",
) -> torch.Tensor:
    """Neuron importance by first-order Taylor expansion: ``|Σ_tokens a ⊙ ∂L/∂a|`` per example (the
    gradient of a per-example neuron mask, cross-entropy loss; TextPruner, Michel et al. 2019 Eq. 4 for
    neurons), summed over examples. Not normalised per layer (so that heads and neurons, both in nats,
    can be ranked together). Returns float32 ``[layers, intermediate_size]``; unit: nats.
    """
    _, grads = mask_gradients(
        model, dataloader, accelerator, heads=False, neurons=True, max_tokens_per_forward=max_tokens_per_forward,
        mixed_precision=mixed_precision, description=description,
    )
    return grads.abs().sum(0)


def fisher_neuron_importance(
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    description: str | None = "Fisher neuron importance",
) -> torch.Tensor:
    """Neuron importance by the empirical Fisher information of the neuron mask (Kwon et al. 2022,
    section 4.1): ``Σ_examples (∂L/∂m_i)^2``. Returns float32 ``[layers, intermediate_size]``; unit: nats^2."""
    _, grads = mask_gradients(
        model, dataloader, accelerator, heads=False, neurons=True, max_tokens_per_forward=max_tokens_per_forward,
        mixed_precision=mixed_precision, description=description,
    )
    return grads.pow(2).sum(0)


NEURON_SEED_OFFSET = 0x9E3779B9
"""Added to the seed of :func:`random_neuron_importance`, so that its draws are not the head scores'."""


def random_neuron_importance(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Reference curve: uniform random neuron scores ``[layers, intermediate_size]`` from a generator
    seeded with ``seed + NEURON_SEED_OFFSET``; pruned neurons 0."""
    gen = torch.Generator().manual_seed(int(seed) + NEURON_SEED_OFFSET)
    kept = kept_neurons(model)
    scores = torch.rand(len(kept), intermediate_size(model), generator=gen)
    present = torch.zeros_like(scores, dtype=torch.bool)
    for layer, ids in enumerate(kept):
        present[layer, ids] = True
    return scores * present


UNITS = ("heads", "neurons", "both")
#: Every method :func:`unit_importance` knows (the recipe's :data:`~prune_attattr.registry.METHODS` and fisher).
UNIT_METHODS: tuple[str, ...] = tuple(dict.fromkeys((*METHODS, "fisher")))


def unit_importance(
    method: str,
    model: nn.Module,
    dataloader,
    accelerator,
    *,
    units: str = "both",
    steps: int = 20,
    target: str = "gold",
    mode: str = "fast",
    quadrature: str = "left",
    chunk_size: int | None = None,
    metrics: Sequence[str] = ("accuracy",),
    normalize: bool | None = None,
    seed: int = 0,
    max_tokens_per_forward: int | None = None,
    mixed_precision: str | None = None,
    progress: bool = True,
    aggregate: str = "max",
    objective: str = "prob",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Head and neuron importance of one method: ``(heads [layers, heads] or None, neurons [layers, intermediate_size] or None)``.

    float32, original unit indices, pruned units 0, higher = more important. ``units`` picks the
    kinds (``heads``, ``neurons``, ``both``; the other is None). Per method:

    * ``attattr``: :func:`attattr_importance` and :func:`attattr_neuron_importance` (two passes;
      one unit for both: the objective's);
    * ``taylor``, ``fisher``: one forward and backward per group for both kinds
      (:func:`mask_gradients`); unit nats (taylor) or nats^2 (fisher) for both. Taylor heads are
      normalised per layer (Michel et al.) only when ``normalize`` says so; default: only for
      ``units="heads"`` (the head-only curves as before), never for neurons, so that a joint search
      ranks heads and neurons on one scale;
    * ``random``: :func:`random_importance` and :func:`random_neuron_importance` (``seed``);
    * ``accuracy_difference``, ``attention``: heads only; neurons None.

    ``steps``, ``target``, ``mode``, ``quadrature``, ``chunk_size``, ``aggregate``, ``objective`` are AttAttr's; ``metrics``
    accuracy_difference's; ``max_tokens_per_forward`` and ``mixed_precision`` every method's;
    ``progress``: progress bars on the main process.

    Raises:
        ValueError: unknown ``method`` or ``units``, or ``units="neurons"`` with a head-only method.
    """
    if units not in UNITS:
        raise ValueError(f"unknown units '{units}'; use heads, neurons or both")
    if method not in UNIT_METHODS:
        raise ValueError(f"unknown importance method '{method}'; use one of {list(UNIT_METHODS)}")
    want_heads, want_neurons = units in ("heads", "both"), units in ("neurons", "both")
    if method in HEAD_ONLY_METHODS:
        if units == "neurons":
            raise ValueError(f"importance method '{method}' scores heads only; use one of {list(NEURON_METHODS)} for neurons")
        want_neurons = False
    bound = {"max_tokens_per_forward": max_tokens_per_forward, "mixed_precision": mixed_precision}

    def label(text):
        return {"description": text if progress else None}

    heads = neurons = None
    if method == "attattr":
        ig = dict(steps=steps, target=target, mode=mode, quadrature=quadrature, aggregate=aggregate, objective=objective, **bound)
        if want_heads:
            heads = attattr_importance(model, dataloader, accelerator, chunk_size=chunk_size, **ig, **label("AttAttr importance"))
        if want_neurons:
            neurons = attattr_neuron_importance(model, dataloader, accelerator, **ig, **label("AttAttr neuron importance"))
    elif method in ("taylor", "fisher"):
        gh, gn = mask_gradients(
            model, dataloader, accelerator, heads=want_heads, neurons=want_neurons, **bound, **label(f"{method} importance ({units})")
        )
        reduce = (lambda g: g.abs().sum(0)) if method == "taylor" else (lambda g: g.pow(2).sum(0))
        heads = None if gh is None else reduce(gh)
        neurons = None if gn is None else reduce(gn)
        if heads is not None and method == "taylor" and (normalize if normalize is not None else units == "heads"):
            heads = heads / (heads.norm(p=2, dim=-1, keepdim=True) + 1e-20)
    elif method == "random":
        heads = random_importance(model, seed=seed) if want_heads else None
        neurons = random_neuron_importance(model, seed=seed) if want_neurons else None
    elif method == "accuracy_difference":
        heads = accuracy_difference_importance(model, dataloader, accelerator, metrics=metrics, **bound, **label("accuracy difference"))
    else:  # attention
        heads = attention_importance(model, dataloader, accelerator, **bound, **label("attention-score importance"))
    return heads, neurons
