"""Dev metrics of a deployed ONNX folder, measured as a user of the folder would: ONNX Runtime on the
graph, the tokenizer saved beside it, the project's metric code (:func:`prune_attattr.evaluation.compute_metrics`).

This is the figure ``export.max_drop`` judges for the shipped model (issue 16): not the PyTorch
model's, but the file's. Dynamic int8 quantization computes each activation's scale from the whole
batch it sees (padding included), so an int8 graph's predictions depend slightly on the batch it runs
in; the default ``batch_size=1`` measures each example alone, as served one request at a time, and
makes the figure independent of batching. :func:`batch_differences` counts the examples whose predicted
class changes between batch 1 and batch 16 (issue 21 item 4: 14 of 872 SST-2 dev sentences for the
dynamic int8 graph of the main job; 0 for float32 and static int8).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .quantize import logits, session
from ..tasks import Examples

__all__ = ["load_folder_tokenizer", "tokenize", "predict_onnx", "evaluate_onnx", "differing_predictions", "batch_differences"]


def load_folder_tokenizer(folder: str | Path):
    """The tokenizer saved in ``folder`` (``AutoTokenizer.from_pretrained``, local files only).

    Raises:
        ModelError: the folder has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    from ..families import ModelError

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"{folder}: no tokenizer beside the ONNX graph ({type(exc).__name__}); re-export the run") from None


def _max_length(tokenizer, max_length: int | None) -> int | None:
    if max_length is not None:
        return max_length
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and n < 1_000_000 else None


def tokenize(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, names: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
    """One batch as a user would build it: ``tokenizer(texts[, pairs], padding=True, truncation=True)``.

    Args:
        names: the graph's input names; ``token_type_ids`` is zeros when the tokenizer gives none.
        max_length: truncation length; None = the tokenizer's ``model_max_length``.

    Returns:
        ``{name: int64 [B, T]}`` for every name in ``names``.
    """
    n = _max_length(tokenizer, max_length)
    args = (list(texts), list(pairs)) if pairs is not None else (list(texts),)
    enc = tokenizer(*args, padding=True, truncation=n is not None, max_length=n, return_tensors="np")
    out = {}
    for name in names:
        if name in enc:
            out[name] = np.asarray(enc[name], dtype=np.int64)
        elif name == "token_type_ids":
            out[name] = np.zeros_like(np.asarray(enc["input_ids"], dtype=np.int64))
        else:
            raise ValueError(f"the tokenizer gives no '{name}', which the graph takes")
    return out


def predict_onnx(
    path: str | Path,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    tokenizer=None,
    max_length: int | None = None,
    batch_size: int = 1,
    threads: int | None = None,
) -> np.ndarray:
    """``logits [N, labels]`` float32 of the graph at ``path`` on ``texts`` (and ``pairs``), in order.

    ``tokenizer``: default the one saved in the graph's folder (:func:`load_folder_tokenizer`).
    """
    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else load_folder_tokenizer(path.parent)
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    out = []
    for i in range(0, len(texts), batch_size):
        chunk_pairs = pairs[i : i + batch_size] if pairs is not None else None
        out.append(logits(sess, tokenize(tokenizer, texts[i : i + batch_size], chunk_pairs, names, max_length)))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def evaluate_onnx(
    path: str | Path,
    examples: Examples,
    metrics: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 1,
    threads: int | None = None,
) -> dict[str, float]:
    """Metrics (fractions in [0, 1], e.g. ``{"accuracy": 0.91}``) of the graph at ``path`` on ``examples``.

    The graph's logit ``k`` is taken as the task's class ``k`` (an exported model's classifier is
    in task order: the run aligns it before pruning). Tokenised by the folder's own tokenizer
    (:func:`tokenize`); ``batch_size`` examples per call (1: each alone; see the module docstring).

    Raises:
        ModelError: no tokenizer in the folder.
        ValueError: an unknown metric name.
    """
    import torch

    from ..evaluation import compute_metrics

    out = predict_onnx(path, examples.texts, examples.pairs, max_length=max_length, batch_size=batch_size, threads=threads)
    preds = torch.from_numpy(out.argmax(-1))
    return compute_metrics(metrics, preds, torch.tensor(examples.labels))


def differing_predictions(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows of ``a [N, C]`` and ``b [N, C]`` (logits of the same examples) predict another class (argmax).

    Raises:
        ValueError: shapes that differ.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"logits of different shapes: {a.shape} and {b.shape}")
    return int((a.argmax(-1) != b.argmax(-1)).sum())


def batch_differences(
    path: str | Path,
    examples: Examples,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    threads: int | None = None,
    alone: np.ndarray | None = None,
) -> int:
    """How many of ``examples`` the graph at ``path`` labels differently alone (batch 1) and among
    consecutive batchmates (``batch_size``, padded to the longest): zero for a graph whose answer for
    a sentence does not depend on its batch.

    Args:
        alone: the graph's batch-1 logits ``[N, C]`` on ``examples`` when already computed (:func:`predict_onnx`).
    """
    if alone is None:
        alone = predict_onnx(path, examples.texts, examples.pairs, max_length=max_length, batch_size=1, threads=threads)
    batched = predict_onnx(path, examples.texts, examples.pairs, max_length=max_length, batch_size=batch_size, threads=threads)
    return differing_predictions(alone, batched)
