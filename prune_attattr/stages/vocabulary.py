"""Part of stage "export": ``export.vocabulary: train`` shrinks the chosen model's word embeddings to the
tokens of the training split (:mod:`prune_attattr.prune.vocabulary`) and measures what that costs.

Runs on every process (the evaluation gathers across them), before :func:`prune_attattr.stages.export.save_export`
writes the folders with the rewritten tokenizer. The dev split is re-tokenised with the new tokenizer and
evaluated in the reference order (the batches are sorted by the *old* lengths), so the export's metric
and loyalty are those of what ships; a dev text with a dropped token is scored as the shipped tokenizer
splits it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import RunError
from ..evaluation import evaluate_outputs
from ..tasks import encode, load_task_data, make_dataloader
from .context import Prepared, reference_logits

__all__ = ["VocabularyExport", "vocabulary_export", "remap_batch"]


@dataclass
class VocabularyExport:
    """The chosen model with its vocabulary pruned.

    Attributes:
        model: a CPU copy of the chosen model, embedding ``[kept, E]``.
        tokenizer: the rewritten tokenizer (new ids).
        remap: ``[V_old]`` long tensor, old id -> new id (dropped ids -> the unknown token's new id): turns
            batches tokenised for the unpruned model into inputs of the pruned one.
        info: the report's ``export.vocabulary`` entry.
        metrics, loyalty: dev metrics and loyalty of ``model`` with ``tokenizer``.
    """

    model: torch.nn.Module
    tokenizer: object
    remap: torch.Tensor
    info: dict
    metrics: dict
    loyalty: dict | None


def remap_batch(batch: dict, remap: torch.Tensor) -> dict:
    """``batch`` with ``input_ids`` mapped through ``remap`` (other keys unchanged)."""
    out = dict(batch)
    out["input_ids"] = remap[batch["input_ids"].cpu()].to(batch["input_ids"].device)
    return out


def vocabulary_export(prep: Prepared, model: torch.nn.Module) -> VocabularyExport:
    """Prune ``model``'s vocabulary to the training split's tokens and evaluate it on the dev split.

    Raises:
        RunError: no training split; prune_attattr.prune.vocabulary.VocabularyError (a RunError for the
            CLI) for a tokenizer it cannot rewrite.
    """
    from ..prune.vocabulary import VocabularyError, fallback_count, plan_vocabulary, prune_vocabulary

    ctx, r = prep.ctx, prep.ctx.recipe
    train = load_task_data(r)[0]
    if train is None:
        raise RunError("export.vocabulary 'train' keeps the tokens of the training split; the task has none")
    texts = list(zip(train.texts, train.pairs)) if train.pairs is not None else train.texts
    emb = model.get_input_embeddings()
    try:
        plan = plan_vocabulary(ctx.tokenizer, texts, vocab_size=emb.num_embeddings)
        work = copy.deepcopy(model).cpu()
        tokenizer = prune_vocabulary(work, ctx.tokenizer, plan.kept)
    except VocabularyError as err:
        raise RunError(f"export.vocabulary: {err}") from None
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    remap = torch.full((emb.num_embeddings,), unk, dtype=torch.long)
    remap[torch.tensor(plan.kept)] = torch.arange(len(plan.kept))

    dev = prep.dev_examples
    enc = encode(tokenizer, dev, r.model.max_length)
    enc.lengths = list(prep.dev_enc.lengths)  # batches in the reference's order (the sort key only)
    loader = ctx.accelerator.prepare(make_dataloader(enc, batch_size=r.pruning.eval_batch_size, pad_id=tokenizer.pad_token_id))
    ev = evaluate_outputs(work.to(ctx.accelerator.device), loader, ctx.accelerator, ctx.metrics, reference=reference_logits(prep))
    work.cpu()
    dev_texts = list(zip(dev.texts, dev.pairs)) if dev.pairs is not None else dev.texts
    affected, dropped = fallback_count(ctx.tokenizer, plan, dev_texts)
    rows_mb = emb.embedding_dim * 4 / 2**20
    info = {
        "kept": len(plan.kept),
        "total": plan.total,
        "from_training_texts": plan.from_texts,
        "special": plan.special,
        "single_characters": plan.single_chars,
        "dev_texts_with_dropped_tokens": affected,
        "dev_texts": len(dev),
        "dev_tokens_dropped": dropped,
        "embedding_mb": {"before": round(plan.total * rows_mb, 2), "after": round(len(plan.kept) * rows_mb, 2)},
    }
    ctx.print(
        f"   vocabulary: {len(plan.kept):,} of {plan.total:,} tokens kept ({plan.from_texts:,} in the training split); "
        f"{affected} of {len(dev)} dev texts hold a dropped token; {ctx.metrics[0]} {100 * ev.metrics[ctx.metrics[0]]:.2f}%"
    )
    return VocabularyExport(work, tokenizer, remap, info, ev.metrics, ev.loyalty)
