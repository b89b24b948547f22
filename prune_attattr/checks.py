"""Checks of the model, its tokenizer and the recipe made as soon as they are loaded, and the
chance-level test of the unpruned model (issue 17).

Each failing check is one line naming the file or recipe key and what to do (:class:`ModelError` or
:class:`RunError`; the CLI exits 2), raised before the first long stage instead of an ``IndexError``
in the middle of fine-tuning:

- :func:`load_tokenizer`, :func:`check_tokenizer`: a model folder without tokenizer files (transformers
  then builds a tokenizer that knows only its special tokens, and every text "tokenizes to nothing");
- :func:`check_vocabulary`: a tokenizer whose ids exceed the model's embedding table;
- :func:`check_max_length`: ``model.max_length`` above the positions the model has (:func:`position_limit`).

:func:`chance_level` says whether the unpruned model's primary metric is clearly better than the best
constant prediction on the dev split; :func:`export_refusal` stops ``export.max_drop`` from
choosing a "pruned" model of a model that learned nothing. :func:`shipped_problems` applies the same
test to what an export ships (the checkpoint and the deployed ONNX graph), and, when ``export.flops``
or ``export.heads`` chose its size, measures its drop against ``export.max_drop`` (issue 22).

Layer: models and data (imports :mod:`prune_attattr.models`, nothing above).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .errors import RunError
from .models import ModelError, base_model

__all__ = [
    "TOKENIZER_FILES",
    "CHANCE_Z",
    "load_tokenizer",
    "check_tokenizer",
    "check_vocabulary",
    "position_limit",
    "check_max_length",
    "check_model_inputs",
    "chance_level",
    "chance_message",
    "export_refusal",
    "shipped_problems",
]

# files one of which a saved tokenizer has (fast: tokenizer.json; WordPiece: vocab.txt; BPE: vocab.json +
# merges.txt; SentencePiece: *.model); only used to word the error, the test is what the tokenizer knows
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
    "spm.model", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
)
CHANCE_Z = 2.0  # standard errors a metric must clear above the constant prediction's (see chance_level)
_NO_LIMIT = 10**6  # tokenizer.model_max_length of a tokenizer that records none is ~1e30


def _listing(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "") or "nothing"


def _fix(folder: Path) -> str:
    return (
        f"save the model's tokenizer there (tokenizer.save_pretrained('{folder}')) or copy its tokenizer files "
        "(tokenizer.json, or vocab.txt, or vocab.json and merges.txt, or the SentencePiece .model) from the model it was trained from"
    )


def load_tokenizer(model_path: str | Path):
    """The tokenizer saved in ``model_path`` (``AutoTokenizer``, local files only).

    Without tokenizer files transformers 5 either fails (ModernBERT) or builds a tokenizer from
    ``config.json`` that knows only the special tokens; the latter is refused by :func:`check_tokenizer`
    once the model is loaded (so an unsupported model type is reported first).

    Raises:
        ModelError: the tokenizer cannot be loaded (the message names the folder and, when it has no
            tokenizer files, says so and how to add them).
    """
    from transformers import AutoTokenizer

    folder = Path(model_path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, ImportError, ... for a broken tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        present = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
        if not present:
            raise ModelError(f"model folder {folder} has no tokenizer files (it holds {_listing(folder)}); {_fix(folder)}") from None
        raise ModelError(f"model folder {folder}: its tokenizer ({', '.join(present)}) cannot be loaded: {first}") from None


def check_tokenizer(tokenizer, model_path: str | Path) -> None:
    """Refuse a tokenizer that knows no token besides its special ones: what transformers builds for a
    folder without tokenizer files. Every text would tokenize to ``[CLS] [UNK] [SEP]`` or to nothing,
    which :func:`prune_attattr.tasks.encode` would blame on the data.

    Raises:
        ModelError: names the folder, what it holds and how to add the tokenizer files.
    """
    if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
        folder = Path(model_path)
        raise ModelError(
            f"model folder {folder} has no tokenizer files (it holds {_listing(folder)}): the tokenizer built without them "
            f"knows only its special tokens, so every text would tokenize to nothing; {_fix(folder)}"
        )


def check_vocabulary(tokenizer, model: nn.Module, model_path: str | Path) -> None:
    """Refuse a tokenizer that can produce ids the model's word embedding table has no row for.

    A tokenizer whose largest id is at or above the number of rows is not the model's (or tokens were
    added to it without ``resize_token_embeddings``); the first text containing such a token would end
    the run with ``IndexError: index out of range`` (a device-side assert on GPU).

    Raises:
        ModelError: the largest token id >= rows of ``model.get_input_embeddings()``.
    """
    rows = model.get_input_embeddings().num_embeddings
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= rows:
        raise ModelError(
            f"model folder {model_path}: the tokenizer has {len(tokenizer)} tokens (ids up to {top}) but the model's "
            f"embedding table has {rows} rows (config.json vocab_size {getattr(model.config, 'vocab_size', rows)}), so the "
            "tokenizer is not this model's; put the tokenizer the model was trained with in the folder, or resize the model's "
            "embeddings (model.resize_token_embeddings(len(tokenizer))) and fine-tune it"
        )


def position_limit(model: nn.Module) -> tuple[int, str] | None:
    """The longest sequence (tokens, special ones included) the model's absolute position table holds,
    with how it follows from the config; None when the model has no such table.

    Read from the model, not from its family's name: ``embeddings.position_embeddings`` (BERT, ELECTRA,
    ALBERT, DistilBERT, DeBERTa with ``position_biased_input``) holds ``max_position_embeddings`` rows,
    one per position; RoBERTa-like models (RoBERTa, XLM-R, CamemBERT: a ``padding_idx`` on that table)
    number positions from ``padding_idx + 1``, so ``padding_idx + 1`` rows are never a position
    (``514 - 2 = 512``). DeBERTa-v3 (relative positions, bucketed) and ModernBERT (rotary) have no table
    and index nothing by position, so any ``model.max_length`` runs.
    """
    embeddings = getattr(base_model(model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    n, pad = table.num_embeddings, table.padding_idx
    if pad is None:
        return n, f"max_position_embeddings {n}"
    return n - pad - 1, f"max_position_embeddings {n} minus {pad + 1} rows before the first position (padding_idx {pad})"


def check_max_length(max_length: int, model: nn.Module, tokenizer, model_path: str | Path) -> None:
    """Refuse ``model.max_length`` above :func:`position_limit`.

    Refused rather than clamped: a clamp would silently change the recipe's truncation (and the
    cache keys with it); the error says the value to use. The tokenizer's ``model_max_length`` is
    quoted when it records one; it is advice, not a limit (a table may hold more than the tokenizer
    was configured for).

    Raises:
        RunError: ``max_length`` above the model's limit (texts that long would index past the table:
            ``RuntimeError: index ... is out of bounds`` in the middle of fine-tuning).
    """
    found = position_limit(model)
    if found is None or max_length <= found[0]:
        return
    limit, why = found
    said = getattr(tokenizer, "model_max_length", None)
    hint = f"; its tokenizer's model_max_length is {said}" if isinstance(said, int) and said < _NO_LIMIT else ""
    raise RunError(
        f"model.max_length {max_length} exceeds the {limit} positions of the model in {model_path} ({why}{hint}); "
        f"set model.max_length to at most {limit}"
    )


def check_model_inputs(recipe, model: nn.Module, tokenizer, model_path: str | Path) -> None:
    """:func:`check_tokenizer`, :func:`check_vocabulary` and :func:`check_max_length` for
    ``recipe.model.max_length``: the checks made right after the model and tokenizer are loaded, before
    tokenisation and fine-tuning.

    Raises:
        ModelError, RunError: see those functions.
    """
    check_tokenizer(tokenizer, model_path)
    check_vocabulary(tokenizer, model, model_path)
    check_max_length(recipe.model.max_length, model, tokenizer, model_path)


def chance_level(metric: str, score: float, labels: Sequence[int], class_names: Sequence[str] | None = None, *, z: float = CHANCE_Z) -> dict | None:
    """Is ``score`` (the unpruned model's ``metric`` on the dev split) clearly better than the best
    constant prediction on the same ``labels``?

    The constant prediction's score (``trivial``) and its standard error over ``n`` dev examples:

    - ``accuracy``: always the majority class; ``trivial = p0`` (its share), standard error
      ``sqrt(p0 (1 - p0) / n)`` (binomial).
    - ``f1`` (positive class 1): always class 1 (predicting 0 scores 0); with ``q`` the share of
      class 1, ``trivial = 2q / (1 + q)``, standard error ``2 / (1 + q)^2 * sqrt(q (1 - q) / n)``
      (delta method on the binomial ``q``).

    The model is at chance when ``score <= trivial + z * standard error``. With ``z = 2`` a model no
    better than the constant prediction passes by luck about 2.3% of the time (one-sided, normal
    approximation to the binomial); a dev split too small to tell (e.g. 16 examples: 25 points) counts
    as at chance, which is what it is for an export decision. Examples: SST-2 dev (872, majority 50.9%):
    at chance up to 54.3%; MRPC dev accuracy (408, majority 68.4%): up to 73.0%.

    Args:
        metric: metric name (``accuracy`` or ``f1``).
        score: the model's metric, a fraction in [0, 1].
        labels: dev class index per example.
        class_names: names of the classes (for the message), index = class.
        z: margin in standard errors.

    Returns:
        ``{"metric", "score", "trivial", "trivial_prediction", "margin", "threshold", "examples", "z",
        "at_chance"}`` (fractions), or None for a metric with no rule here or no labels.
    """
    n = len(labels)
    if n == 0:
        return None
    counts = Counter(int(y) for y in labels)
    name = (lambda c: str(class_names[c]) if class_names is not None and c < len(class_names) else str(c))  # noqa: E731
    if metric == "accuracy":
        majority, count = max(sorted(counts.items()), key=lambda kv: kv[1])
        p = count / n
        trivial, se, prediction = p, math.sqrt(p * (1 - p) / n), f"always '{name(majority)}'"
    elif metric == "f1":
        q = counts.get(1, 0) / n
        trivial = 2 * q / (1 + q)
        se = 2 / (1 + q) ** 2 * math.sqrt(q * (1 - q) / n)
        prediction = f"always '{name(1)}'"
    else:
        return None
    margin = z * se
    return {
        "metric": metric,
        "score": float(score),
        "trivial": trivial,
        "trivial_prediction": prediction,
        "margin": margin,
        "threshold": trivial + margin,
        "examples": n,
        "z": z,
        "at_chance": bool(score <= trivial + margin),
    }


def _chance_figures(c: dict, subject: str = "the unpruned model") -> str:
    return (
        f"{subject} is at chance: {c['metric']} {100 * c['score']:.1f}% on {c['examples']} dev examples is not clearly "
        f"above the {100 * c['trivial']:.1f}% of predicting {c['trivial_prediction']} (it would need more than "
        f"{100 * c['threshold']:.1f}%: {c['z']:g} standard errors)"
    )


def chance_message(chance: dict) -> str:
    """One line saying the model is at chance, with the figures (for the console, report.md, report.json)."""
    return _chance_figures(chance) + "; its pruning curves and any export of it mean nothing"


def export_refusal(recipe, chance: dict | None) -> str | None:
    """Why the ``export.max_drop`` rule refuses to choose, or None: the unpruned model is at chance.

    "Within ``max_drop`` of a model at chance" holds for any pruned model, so the rule would export a
    head count as if it were a result. An explicit ``export.heads`` or ``export.flops`` still exports (the
    user asked for that size); a run without export only warns. The pipeline then writes a report without export
    (baseline and the warning, no curves) and ends with this line (exit 2).
    """
    e = recipe.export
    if chance is None or not chance["at_chance"] or not e.enabled or e.heads is not None or e.flops is not None:
        return None
    return (
        _chance_figures(chance)
        + "; export.max_drop has nothing to choose from, so nothing is exported. Fine-tune the model until it learns the task "
        "(finetune.enabled, more finetune.epochs or finetune.train_examples, another finetune.learning_rate), or set export.heads "
        "(or export.flops) to export a model of that size anyway"
    )


def shipped_problems(recipe_export: dict, shipped: dict[str, dict]) -> list[str]:
    """Why what an export ships is no good, one line per problem (empty: nothing to say).

    For each shipped folder (``"model"``: the PyTorch checkpoint, ``"onnx"``: the deployed graph):

    - at chance: its own :func:`chance_level` entry (``shipped[folder]["chance"]``, computed on the dev
      split like the unpruned model's) says so (also when the unpruned model is at chance: the line
      names the folder that ships, and the model card of that folder carries it);
    - too far below the unpruned model: ``export.flops`` or ``export.heads`` chose the size, so nothing
      held the drop to ``export.max_drop``; a drop above it (1e-12 tolerance) is reported. Under
      ``export.max_drop`` alone the choice already kept it (the int8 graph too: it ships only within it).

    Args:
        recipe_export: the resolved recipe's ``export`` section (``max_drop``, ``flops``, ``heads``).
        shipped: ``{folder: {"metric", "value", "baseline", "baseline_source", "chance"}}`` (fractions;
            the report's ``export.shipped``, written by the export stage).

    Returns:
        Lines without a "WARNING" prefix, for the console, report.md, report.json and the model cards.
    """
    e = recipe_export or {}
    key = "export.flops" if e.get("flops") is not None else "export.heads" if e.get("heads") is not None else None
    forced = f"{key} {e['flops']:g}" if key == "export.flops" else f"{key} {e['heads']}" if key else None
    max_drop = e.get("max_drop")
    lines = []
    for folder, s in shipped.items():
        c = s.get("chance")
        if c and c.get("at_chance"):
            lines.append(
                _chance_figures(c, f"the exported model ({folder}/)")
                + f"; it is no usable classifier: keep more of the model{f' (raise {key})' if key else ''} or recover it (recovery.enabled)"
            )
            continue
        if forced and max_drop is not None and s.get("baseline") is not None and s["baseline"] - s["value"] > max_drop + 1e-12:
            lines.append(
                f"the exported model ({folder}/) is {100 * (s['baseline'] - s['value']):.1f} points below the unpruned model: {s['metric']} "
                f"{100 * s['value']:.1f}% against {100 * s['baseline']:.1f}% ({s.get('baseline_source') or 'unpruned'}), more than "
                f"export.max_drop {100 * max_drop:g} points; {forced} chose its size, so nothing held the drop: raise {key}, "
                f"recover it (recovery.enabled), or let export.max_drop choose (unset {key})"
            )
    return lines
