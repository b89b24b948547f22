"""Adversarial triggers from attribution patterns (Hao et al. 2021, section 6).

Extraction: for each example, the (layer, head) holding the largest attribution score, and in that
head the connection (query i, key j; i != j, neither a special token) with the largest score. Its
pattern is the word-piece pair (key token, query token) with their relative positions in the input
(position / length). Patterns are counted across examples per gold class and ranked by frequency
(ties: by summed attribution).

Attack: a pattern found in examples of class c is inserted into every dev example of class c: its
two tokens at the same relative positions (key first, as in the source order), and the per-class
accuracy is measured before and after. The accuracy drop is in points (percentage points).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from ..importance.attattr import iter_layer_attributions
from ..models import forward_logits
from ..progress import progress
from ..tasks import Encoded, make_dataloader

__all__ = ["Pattern", "top_connection", "extract_patterns", "insert_pattern", "attack"]


@dataclass
class Pattern:
    """A token pair whose interaction carried the most attribution, aggregated over examples."""

    label: int
    key_token: str
    query_token: str
    key_pos: float  # mean relative position in [0, 1]
    query_pos: float
    count: int
    score: float  # summed attribution of the connection
    layers: dict[str, int]  # "layer-head" -> count


def top_connection(attr: torch.Tensor, special: torch.Tensor) -> tuple[int, int, int, int, float]:
    """``(layer, head, query, key, score)`` of the top connection of the head with the largest score.

    Args:
        attr: ``[layers, heads, T, T]`` attributions of one example (no padding).
        special: ``[T]`` bool, True for special tokens (never part of a pattern).
    """
    layers, heads, t, _ = attr.shape
    head_max = attr.flatten(2).max(-1).values
    flat = int(head_max.flatten().argmax())
    layer, head = divmod(flat, heads)
    m = attr[layer, head].clone()
    bad = special[:, None] | special[None, :] | torch.eye(t, dtype=torch.bool)
    m[bad] = float("-inf")
    idx = int(m.flatten().argmax())
    q, k = divmod(idx, t)
    return layer, head, q, k, float(m[q, k])


def extract_patterns(model, tokenizer, data: Encoded, *, steps: int, quadrature: str, mode: str, batch_size: int = 16, accelerator=None) -> list[Pattern]:
    """Count the attribution patterns of ``data`` (gold targets), ranked per class by frequency."""
    special_ids = set(tokenizer.all_special_ids)
    loader = make_dataloader(data, batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0)
    if accelerator is not None:
        loader = accelerator.prepare(loader)  # sharded across processes, batches on the model's device
    agg: dict[tuple, dict] = {}
    for batch in progress(loader, "trigger extraction", accelerator):
        per_layer = {}
        for layer, a, _ in iter_layer_attributions(model, batch, steps=steps, target="gold", mode=mode, quadrature=quadrature):
            per_layer[layer] = a
        attr = torch.stack([per_layer[l] for l in sorted(per_layer)], dim=1)  # [B, L, H, T, T] (unpruned model)
        found = []  # one entry per example (None: no pattern), so gathering drops sharding's duplicates
        for b in range(attr.shape[0]):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b, :n].cpu()
            special = torch.tensor([int(x) in special_ids for x in ids])
            if (~special).sum() < 2:
                found.append(None)
                continue
            layer, head, q, k, score = top_connection(attr[b, :, :, :n, :n].float().cpu(), special)
            if score == float("-inf"):
                found.append(None)
                continue
            toks = tokenizer.convert_ids_to_tokens([int(ids[k]), int(ids[q])])
            found.append((int(batch["labels"][b]), toks[0], toks[1], layer, head, q, k, n, score))
        if accelerator is not None and accelerator.num_processes > 1:
            found = accelerator.gather_for_metrics(found, use_gather_object=True)  # in single-process order
        for item in found:
            if item is None:
                continue
            lab, kt, qt, layer, head, q, k, n, score = item
            entry = agg.setdefault((lab, kt, qt), {"count": 0, "score": 0.0, "kpos": 0.0, "qpos": 0.0, "heads": defaultdict(int)})
            entry["count"] += 1
            entry["score"] += score
            entry["kpos"] += k / n
            entry["qpos"] += q / n
            entry["heads"][f"{layer}-{head}"] += 1
    patterns = [
        Pattern(lab, kt, qt, e["kpos"] / e["count"], e["qpos"] / e["count"], e["count"], e["score"], dict(e["heads"]))
        for (lab, kt, qt), e in agg.items()
    ]
    patterns.sort(key=lambda p: (-p.count, -p.score))
    return patterns


def insert_pattern(
    input_ids: list[int], token_ids: list[int], rel_positions: list[float], token_type_ids: list[int] | None = None, n_special_end: int = 1
) -> tuple[list[int], list[int] | None]:
    """Insert ``token_ids`` at relative positions (of the final length) into one example.

    [CLS] stays first and the last ``n_special_end`` tokens ([SEP]) stay last; tokens go in order
    of their relative position. An inserted token takes the segment id of its left neighbour.

    Returns:
        ``(new input ids, new token type ids or None)``.
    """
    ids = list(input_ids)
    types = list(token_type_ids) if token_type_ids is not None else None
    for rel, tok in sorted(zip(rel_positions, token_ids), key=lambda x: x[0]):
        pos = int(round(rel * len(ids)))
        pos = min(max(pos, 1), len(ids) - n_special_end)
        ids.insert(pos, tok)
        if types is not None:
            types.insert(pos, types[pos - 1])
    return ids, types


@torch.no_grad()
def _correct(model, data: Encoded, pad_id: int, batch_size: int = 64, accelerator=None) -> torch.Tensor:
    """``[N]`` bool: prediction == label, in ``data`` order (sharded across processes with ``accelerator``)."""
    loader = make_dataloader(data, batch_size=batch_size, pad_id=pad_id)
    order = [i for batch_idx in loader.batch_sampler for i in batch_idx]
    if accelerator is not None:
        loader = accelerator.prepare(loader)
        hits = torch.cat([accelerator.gather_for_metrics(forward_logits(model, b).argmax(-1) == b["labels"]).cpu() for b in loader])
    else:
        hits = torch.cat([forward_logits(model, b).argmax(-1).cpu() == b["labels"] for b in loader])
    out = torch.zeros(len(data), dtype=torch.bool)
    out[torch.tensor(order)] = hits
    return out


def _per_class(correct: torch.Tensor, labels: list[int], n_classes: int) -> list[float]:
    y = torch.tensor(labels)
    return [float(correct[y == c].float().mean()) if (y == c).any() else float("nan") for c in range(n_classes)]


def attack(model, tokenizer, dev: Encoded, patterns: list[Pattern], *, top: int = 10, max_length: int = 128, n_classes: int | None = None, accelerator=None) -> list[dict]:
    """Insert each of the ``top`` patterns into every dev example; per-class accuracy before and after.

    A pattern extracted from examples of class c pushes the model towards c, so the attacked classes
    are the others: ``attack_drop_points`` is the mean accuracy drop over the classes other than c.

    Returns:
        One dict per pattern: the pattern, ``accuracy_before`` / ``accuracy_after`` (per class,
        fractions), ``drop_points`` (per class, percentage points) and ``attack_drop_points``.
        With ``accelerator`` the dev examples are sharded across processes (same result as one).
    """
    pad = tokenizer.pad_token_id or 0
    n_classes = n_classes or (max(dev.labels) + 1)
    before = _per_class(_correct(model, dev, pad, accelerator=accelerator), dev.labels, n_classes)
    results = []
    for p in progress(patterns[:top], "trigger attack", accelerator):
        tok_ids = tokenizer.convert_tokens_to_ids([p.key_token, p.query_token])
        new_ids, new_types = [], []
        for i, ids in enumerate(dev.input_ids):
            types = dev.token_type_ids[i] if dev.token_type_ids is not None else None
            ins, ins_types = insert_pattern(ids, tok_ids, [p.key_pos, p.query_pos], types)
            new_ids.append(ins[:max_length])
            new_types.append(ins_types[:max_length] if ins_types is not None else None)
        attacked = Encoded(new_ids, new_types if dev.token_type_ids is not None else None, dev.labels)
        after = _per_class(_correct(model, attacked, pad, accelerator=accelerator), dev.labels, n_classes)
        drops = [100 * (b - a) for b, a in zip(before, after)]
        others = [d for c, d in enumerate(drops) if c != p.label]
        results.append({**asdict(p), "accuracy_before": before, "accuracy_after": after, "drop_points": drops, "attack_drop_points": sum(others) / len(others) if others else float("nan")})
    return results


def plot_triggers(result: dict, path) -> None:
    """PNG: per pattern, the accuracy of every class before and after insertion (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacked, labels = result["attacked"], result["labels"]
    if not attacked:
        return
    x = np.arange(len(attacked))
    width = 0.8 / (2 * len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(attacked) + 2), 4.2), dpi=120)
    for c, name in enumerate(labels):
        before = [100 * a["accuracy_before"][c] for a in attacked]
        after = [100 * a["accuracy_after"][c] for a in attacked]
        ax.bar(x + (2 * c) * width, before, width, color=plt.cm.tab10(c), alpha=0.35, label=f"{name}: before")
        ax.bar(x + (2 * c + 1) * width, after, width, color=plt.cm.tab10(c), label=f"{name}: after")
    ax.set_xticks(x + width * (len(labels) - 0.5))
    ax.set_xticklabels([f"{a['key_token']}->{a['query_token']}\n(from {a['label_name']})" for a in attacked], fontsize=7, rotation=30)
    ax.set_ylabel("accuracy per class (%)")
    mean = result.get("top3_mean_drop_points")
    ax.set_title("adversarial triggers: accuracy before/after inserting each pattern" + (f" (top-3 mean drop {mean:.1f} points)" if mean is not None else ""), fontsize=9)
    ax.legend(fontsize=7, ncol=len(labels))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
