"""Effectiveness of attribution (Hao et al. 2021, section 4.1, Figure 2): mask heads per example.

For every example, the heads of every layer are ranked by that example's head score, and the top-k
heads of *every* layer are masked at once (k = 0 .. heads per layer); accuracy is recorded for each k.
Two rankings are compared:

* attribution: the max-pooled AttAttr score of each head, ``max_{i,j} Attr_h(A)[i, j]`` over valid
  token pairs, with the **gold** label as target (Eq. 3; left Riemann m = 20 in the paper). Max
  pooling and the per-example order are the authors' (github.com/YRdddream/attattr, issue #2);
* attention: the same max pooling over the head's attention probabilities ``max_{i,j} A_h[i, j]``.

Each ranking is applied largest first (the paper's curves) and smallest first (a sanity check:
masking the least attributed heads should hurt least). Scores are computed once on the unmasked
model; masking uses the per-example head mask of :class:`~prune_attattr.attention.AttentionControl`
(``head_mask[layer]`` of shape ``[batch, heads]``, Michel et al.'s xi_h).
"""

from __future__ import annotations

import torch

from ..attention import AttentionControl
from ..importance.attattr import attribution_head_scores, iter_layer_attributions
from ..models import forward_logits, kept_heads
from ..progress import progress

__all__ = ["example_head_scores", "topk_head_masks", "effectiveness_curves"]

RANKINGS = ("attribution", "attention")
ORDERS = ("largest", "smallest")


def example_head_scores(model, batch: dict, *, steps: int = 20, quadrature: str = "left", mode: str = "fast") -> dict[str, torch.Tensor]:
    """Per-example, per-layer head scores ``{"attribution": [B, L, H], "attention": [B, L, H]}``.

    Attribution uses the gold label (``batch["labels"]``) as target.

    Raises:
        ValueError: the model has pruned heads (the analysis masks heads of the full model).
    """
    heads = kept_heads(model)
    n_heads = model.config.num_attention_heads
    if any(len(h) != n_heads for h in heads):
        raise ValueError("the effectiveness analysis needs an unpruned model (every layer with all its heads)")
    bsz = batch["input_ids"].shape[0]
    out = {name: torch.zeros(bsz, len(heads), n_heads) for name in RANKINGS}
    mask = batch["attention_mask"]
    for layer, attr, probs in iter_layer_attributions(model, batch, steps=steps, target="gold", mode=mode, quadrature=quadrature):
        out["attribution"][:, layer] = attribution_head_scores(attr, mask).cpu()
        out["attention"][:, layer] = attribution_head_scores(probs.float(), mask).cpu()
    return out


def topk_head_masks(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Masks ``[B, L, H]`` (0 = masked) that mask each example's top-k heads of every layer.

    Args:
        scores: ``[B, L, H]`` head scores.
        k: heads masked per layer, 0..H.
        largest: mask the k highest-scoring heads (else the k lowest).

    Raises:
        ValueError: ``k`` outside 0..H.
    """
    h = scores.shape[-1]
    if not 0 <= k <= h:
        raise ValueError(f"k must be in 0..{h}, got {k}")
    mask = torch.ones_like(scores, dtype=torch.float32)
    if k:
        idx = scores.topk(k, dim=-1, largest=largest).indices
        mask.scatter_(-1, idx, 0.0)
    return mask


@torch.no_grad()
def _correct_with_mask(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    device = batch["input_ids"].device
    control = AttentionControl(head_mask={layer: mask[:, layer].to(device) for layer in range(mask.shape[1])})
    return (forward_logits(model, batch, control).argmax(-1) == batch["labels"]).cpu()


def effectiveness_curves(model, dataloader, accelerator, *, steps: int = 20, quadrature: str = "left", mode: str = "fast") -> dict:
    """Accuracy versus heads masked per layer (k = 0..H), per ranking and order.

    Args:
        dataloader: prepared dev batches with ``labels``.

    Returns:
        ``{"k": [0..H], "accuracy": {ranking: {order: [acc per k]}}, "examples": N, "heads_per_layer": H,
        "layers": L, "steps", "quadrature", "mode", "target": "gold"}``; accuracies are fractions.
    """
    n_heads = model.config.num_attention_heads
    ks = list(range(n_heads + 1))
    hits = {r: {o: [[] for _ in ks] for o in ORDERS} for r in RANKINGS}
    was_training = model.training
    model.eval()
    n_layers = len(kept_heads(model))
    try:
        for batch in progress(dataloader, "effectiveness (heads masked per example)", accelerator):
            scores = example_head_scores(model, batch, steps=steps, quadrature=quadrature, mode=mode)
            for r in RANKINGS:
                for o in ORDERS:
                    for k in ks:
                        ok = _correct_with_mask(model, batch, topk_head_masks(scores[r], k, largest=o == "largest"))
                        hits[r][o][k].append(accelerator.gather_for_metrics(ok.to(batch["input_ids"].device)).cpu())
    finally:
        model.train(was_training)
    acc = {r: {o: [float(torch.cat(h).float().mean()) for h in hits[r][o]] for o in ORDERS} for r in RANKINGS}
    n = int(torch.cat(hits["attention"]["largest"][0]).numel())
    return {
        "k": ks,
        "accuracy": acc,
        "examples": n,
        "heads_per_layer": n_heads,
        "layers": n_layers,
        "steps": steps,
        "quadrature": quadrature,
        "mode": mode,
        "target": "gold",
    }
