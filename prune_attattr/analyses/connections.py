"""A connection-level variant of the effectiveness analysis (NOT the paper's experiment, which masks
whole heads: see :mod:`.effectiveness`). Recipe key ``analyses.connections``.

For each example, all attention connections (layer, head, query i, key j; valid tokens only) are
ordered by attribution score, or by attention probability, largest first. The first ``p`` fraction
of them is zeroed in the attention interface (``AttentionControl.connection_mask``, every layer at
once) and the accuracy is measured. It tests the paper's section 4.1 claim (removing what attribution ranks
first hurts far more than removing what attention ranks first) at the finer grain of connections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention import AttentionControl
from ..importance.attattr import iter_layer_attributions
from ..models import forward_logits
from ..progress import progress

__all__ = ["connection_masks", "connection_curves"]


def connection_masks(scores: dict[int, torch.Tensor], attention_mask: torch.Tensor, fraction: float) -> dict[int, torch.Tensor]:
    """Masks that zero the top ``fraction`` of each example's valid connections by ``scores``.

    Args:
        scores: layer -> ``[B, heads, T, T]`` ranking scores (larger = pruned first).
        attention_mask: ``[B, T]`` (1 = token).
        fraction: in [0, 1]; ``round(fraction * valid connections)`` are zeroed per example.

    Returns:
        layer -> ``[B, heads, T, T]`` float mask (0 = pruned connection, 1 = kept).
    """
    layers = sorted(scores)
    bsz = attention_mask.shape[0]
    valid = attention_mask.bool()
    pair = valid[:, :, None] & valid[:, None, :]
    flat = torch.cat([scores[l].float().masked_fill(~pair[:, None], float("-inf")).flatten(1) for l in layers], dim=1)
    sizes = [scores[l][0].numel() for l in layers]
    n_valid = torch.cat([pair[:, None].expand_as(scores[l]).flatten(1) for l in layers], dim=1).sum(1)
    keep = torch.ones_like(flat)
    for b in range(bsz):
        k = int(round(fraction * int(n_valid[b])))
        if k > 0:
            keep[b, flat[b].topk(k).indices] = 0.0
    out, start = {}, 0
    for l, n in zip(layers, sizes):
        out[l] = keep[:, start : start + n].view_as(scores[l])
        start += n
    return out


@torch.no_grad()
def _accuracy_with(model, batch, masks) -> torch.Tensor:
    logits = forward_logits(model, batch, AttentionControl(connection_mask=masks))
    return (logits.argmax(-1) == batch["labels"]).float()


def connection_curves(model, dataloader, accelerator, *, fractions: Sequence[float], steps: int = 20, quadrature: str = "left", mode: str = "fast", target: str = "gold") -> dict:
    """Accuracy versus fraction of connections pruned, by attribution order and by attention order.

    Returns:
        ``{"fractions": [...], "attribution": [acc...], "attention": [acc...], "examples": N}``
        (accuracies as fractions in [0, 1]).
    """
    hits = {"attribution": [[] for _ in fractions], "attention": [[] for _ in fractions]}
    for batch in progress(dataloader, "connection pruning", accelerator):
        attr, probs = {}, {}
        for layer, a, p in iter_layer_attributions(model, batch, steps=steps, target=target, mode=mode, quadrature=quadrature):
            attr[layer], probs[layer] = a, p.float()
        for name, scores in (("attribution", attr), ("attention", probs)):
            for i, f in enumerate(fractions):
                ok = _accuracy_with(model, batch, connection_masks(scores, batch["attention_mask"], f))
                hits[name][i].append(accelerator.gather_for_metrics(ok).cpu())
    curves = {name: [float(torch.cat(h).mean()) for h in per] for name, per in hits.items()}
    n = int(torch.cat(hits["attention"][0]).numel())
    return {"fractions": list(fractions), **curves, "examples": n}
