"""Vocabulary pruning: keep the word-embedding rows of the tokens a task uses, and rewrite the tokenizer.

A classifier's word embeddings are most of a small pruned model (MiniLM: 30,522 x 384 = 11.7M of the
15.3M parameters left at 30% FLOPs), yet one task's training split uses a fraction of the vocabulary
(SST-2: about 12,000 ids). TextPruner (Yang et al., ACL 2022 demo) prunes the vocabulary this way.

How: the ids kept are those of the tokens in the *training* texts (never the dev split), the tokenizer's
special tokens and, so that unseen text still tokenizes to something close, every single-character
piece of the vocabulary (WordPiece ``x`` and ``##x``; every byte-level BPE alphabet symbol; Unigram
single characters). The kept ids keep their order; the embedding becomes ``old[kept]`` and the
**tokenizer is rewritten** (its ``tokenizer.json`` model, added tokens, post-processor and padding) so
that stock ``AutoTokenizer`` produces the new ids directly. Rewriting the tokenizer, rather than
remapping ids inside the model, keeps the checkpoint and the ONNX graph plain (an ``Embedding`` of
the new size, no gather table) and makes every runtime that reads ``tokenizer.json`` (transformers,
ONNX Runtime users, optimum) agree without code of ours.

A text whose tokens were all kept gets exactly the same logits (tests/test_vocabulary.py); a text with
a dropped token is split into smaller kept pieces (WordPiece, BPE) or scored by the remaining pieces
(Unigram): :func:`fallback_count` says how many dev texts are affected.

Supported tokenizer models: WordPiece (BERT, ELECTRA, DistilBERT), byte-level BPE (RoBERTa, ModernBERT)
and Unigram (XLM-R, CamemBERT, DeBERTa-v3). Anything else is refused with :class:`VocabularyError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["VocabularyError", "VocabularyPlan", "plan_vocabulary", "prune_vocabulary", "fallback_count"]


class VocabularyError(ValueError):
    """A tokenizer or model whose vocabulary cannot be pruned (slow tokenizer, unknown tokenizer model)."""


@dataclass
class VocabularyPlan:
    """Which ids to keep.

    Attributes:
        kept: old ids kept, increasing (new id ``i`` is old id ``kept[i]``).
        from_texts, special, single_chars: how many of them came from each source (they overlap).
        total: size of the old vocabulary (the embedding's rows).
    """

    kept: list[int]
    from_texts: int
    special: int
    single_chars: int
    total: int


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise VocabularyError(
            f"vocabulary pruning needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} has none: "
            "set export.vocabulary: all"
        )
    data = json.loads(backend.to_str())
    kind = (data.get("model") or {}).get("type")
    if kind not in ("WordPiece", "BPE", "Unigram"):
        raise VocabularyError(f"vocabulary pruning supports WordPiece, BPE and Unigram tokenizers, not {kind!r}: set export.vocabulary: all")
    return data


def _pieces(model: dict) -> dict[str, int]:
    """token -> id of a tokenizer.json model."""
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    return dict(model["vocab"])


def _single_chars(model: dict, pieces: dict[str, int]) -> set[int]:
    if model["type"] == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        return {i for t, i in pieces.items() if len(t) == 1 or (t.startswith(prefix) and len(t) == len(prefix) + 1)}
    if model["type"] == "Unigram":
        return {i for t, i in pieces.items() if len(t.lstrip("\u2581")) <= 1}
    # BPE: every token that is not the result of a merge is an alphabet symbol (byte-level: the 256 bytes)
    merged = {"".join(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges") or []}
    return {i for t, i in pieces.items() if t not in merged}


def _bpe_closure(model: dict, keep: set[int], pieces: dict[str, int]) -> set[int]:
    """Add the parts of every kept merged token, recursively (BPE can only build a token from its parts)."""
    parts = {}
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        parts.setdefault(a + b, (a, b))
    names = {i: t for t, i in pieces.items()}
    stack = [names[i] for i in keep if i in names]
    while stack:
        t = stack.pop()
        for p in parts.get(t, ()):
            i = pieces.get(p)
            if i is not None and i not in keep:
                keep.add(i)
                stack.append(p)
    return keep


def plan_vocabulary(tokenizer, texts: Iterable[str | tuple[str, str]], *, vocab_size: int | None = None) -> VocabularyPlan:
    """The ids to keep for ``texts`` (the training split: never the dev split, or the dev metric is flattered).

    Args:
        tokenizer: a fast tokenizer (``tokenizer.json``).
        texts: training texts, or ``(text, pair)`` tuples for sentence-pair tasks.
        vocab_size: rows of the model's word embedding (default: the tokenizer's length); ids at or above
            it are ignored, rows the tokenizer never produces are dropped.

    Raises:
        VocabularyError: slow tokenizer or unsupported tokenizer model.
    """
    data = _backend_json(tokenizer)
    model = data["model"]
    pieces = _pieces(model)
    total = vocab_size or len(tokenizer)
    seen: set[int] = set()
    batch: list = []

    def flush():
        if batch:
            firsts = [b[0] if isinstance(b, tuple) else b for b in batch]
            seconds = [b[1] for b in batch] if isinstance(batch[0], tuple) else None
            enc = tokenizer(firsts, seconds, add_special_tokens=True, truncation=False)["input_ids"]
            for ids in enc:
                seen.update(ids)
            batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) == 1024:
            flush()
    flush()
    special = {int(i) for i in tokenizer.all_special_ids} | {a["id"] for a in data.get("added_tokens") or []}
    singles = _single_chars(model, pieces)
    keep = seen | special | singles
    if model["type"] == "BPE":
        keep = _bpe_closure(model, keep, pieces)
    kept = sorted(i for i in keep if 0 <= i < total)
    return VocabularyPlan(kept, len(seen), len(special), len(singles), total)


def _remap_tokenizer_json(data: dict, kept: Sequence[int]) -> dict:
    new_id = {old: new for new, old in enumerate(kept)}
    model = data["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][old] for old in kept if old < len(model["vocab"])]
        if model.get("unk_id") is not None:
            if model["unk_id"] not in new_id:
                raise VocabularyError("the tokenizer's unknown token would be dropped")
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        model["vocab"] = {t: new_id[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in new_id}
        if model["type"] == "BPE":
            names = set(model["vocab"])
            merges = []
            for m in model.get("merges") or []:
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                if a in names and b in names and a + b in names:
                    merges.append(m)
            model["merges"] = merges
    for a in data.get("added_tokens") or []:
        a["id"] = new_id[a["id"]]
    post = data.get("post_processor")
    for proc in (post.get("processors") or [post]) if post else []:
        for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
            if key in proc:
                proc[key] = [proc[key][0], new_id[proc[key][1]]]
        for spec in (proc.get("special_tokens") or {}).values():  # TemplateProcessing
            spec["ids"] = [new_id[i] for i in spec["ids"]]
    if data.get("padding") and data["padding"].get("pad_id") is not None:
        data["padding"]["pad_id"] = new_id[data["padding"]["pad_id"]]
    return data


def prune_vocabulary(model: nn.Module, tokenizer, kept: Sequence[int]):
    """Keep word-embedding rows ``kept`` of ``model`` (in place) and return the matching tokenizer.

    Args:
        model: a sequence classifier whose ``get_input_embeddings()`` is an ``nn.Embedding [V, E]``.
        tokenizer: its fast tokenizer (``tokenizer.json``), vocabulary ``V``.
        kept: old ids to keep, increasing (:attr:`VocabularyPlan.kept`); must contain every special token.

    Returns:
        A new tokenizer of the same class whose ids are the positions in ``kept``; the model's embedding is
        ``[len(kept), E]``, ``config.vocab_size`` and every ``config.*_token_id`` are remapped.

    Raises:
        VocabularyError: unsupported tokenizer, a special token missing from ``kept``, ids out of range.
    """
    from tokenizers import Tokenizer

    kept = list(kept)
    if kept != sorted(set(kept)):
        raise VocabularyError("kept ids must be increasing and unique")
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise VocabularyError(f"the model's input embedding is a {type(emb).__name__}, not nn.Embedding")
    if kept and (kept[0] < 0 or kept[-1] >= emb.num_embeddings):
        raise VocabularyError(f"kept ids outside the embedding's {emb.num_embeddings} rows")
    missing = [i for i in tokenizer.all_special_ids if i not in set(kept)]
    if missing:
        raise VocabularyError(f"special token ids {missing} are not kept")
    data = _remap_tokenizer_json(_backend_json(tokenizer), kept)
    new_id = {old: new for new, old in enumerate(kept)}

    config = model.config
    old_pad = getattr(config, "pad_token_id", None)
    index = torch.tensor(kept, dtype=torch.long, device=emb.weight.device)
    new_pad = new_id.get(old_pad) if old_pad is not None else None
    new_emb = nn.Embedding(len(kept), emb.embedding_dim, padding_idx=new_pad if emb.padding_idx is not None else None)
    new_emb.to(device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight.index_select(0, index))
    model.set_input_embeddings(new_emb)
    for key, value in list(vars(config).items()):
        if key.endswith("_token_id") and isinstance(value, int) and value in new_id:
            setattr(config, key, new_id[value])
    config.vocab_size = len(kept)
    if old_pad is not None and new_pad is not None:
        for module in model.modules():  # RoBERTa-style position ids count tokens that are not padding
            if module is not new_emb and getattr(module, "padding_idx", None) == old_pad and not isinstance(module, nn.Embedding):
                module.padding_idx = new_pad

    new_tok = type(tokenizer)(tokenizer_object=Tokenizer.from_str(json.dumps(data)), **_special_kwargs(tokenizer))
    new_tok.model_max_length = tokenizer.model_max_length
    new_tok.padding_side = tokenizer.padding_side
    return new_tok


def _special_kwargs(tokenizer) -> dict:
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            out[name] = str(value)
    if getattr(tokenizer, "init_kwargs", {}).get("do_lower_case") is not None:
        out["do_lower_case"] = tokenizer.init_kwargs["do_lower_case"]
    return out


def fallback_count(old_tokenizer, plan: VocabularyPlan, texts: Sequence[str | tuple[str, str]]) -> tuple[int, int]:
    """How many of ``texts`` (the dev split) contain a token outside ``plan.kept``, and how many tokens
    that is in all: ``(texts affected, tokens affected)``. Such a text tokenizes differently after pruning."""
    keep = set(plan.kept)
    firsts = [t[0] if isinstance(t, tuple) else t for t in texts]
    seconds = [t[1] for t in texts] if texts and isinstance(texts[0], tuple) else None
    enc = old_tokenizer(firsts, seconds, add_special_tokens=True, truncation=False)["input_ids"] if texts else []
    affected = [sum(i not in keep for i in ids) for ids in enc]
    return sum(a > 0 for a in affected), sum(affected)
