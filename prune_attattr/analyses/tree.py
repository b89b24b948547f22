"""Attribution trees: the information flow inside the model for one input (Hao et al. 2021, section 5).

Construction, for one example and its layer-wise attribution summed over heads
``S[l] = Σ_h Attr_h(A^l)`` (``[layers, seq, seq]``, query i attends to key j):

1. each layer is divided by its largest absolute score, the [CLS] query row excluded (that row and
   self-interactions i == j carry no flow between tokens, so they never become edges);
2. an edge ``key j -> query i`` at layer l exists when the normalised score exceeds ``threshold``
   (paper: tau = 0.4);
3. the root is the token (not [CLS]) with the largest total attribution as a query, summed over the
   layers of the normalised scores; the tree grows top-down from the last layer: at layer l every
   token already in the tree takes as children the tokens it has an edge to and that are not in the
   tree yet (a token joins once, at the highest layer where information flows from it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import torch

__all__ = ["TreeEdge", "AttributionTree", "build_tree", "layer_attribution_maps", "tree_for_text"]


@dataclass
class TreeEdge:
    """Information flows from ``key`` (child) into ``query`` (parent) at ``layer`` with ``score`` (normalised)."""

    query: int
    key: int
    layer: int
    score: float


@dataclass
class AttributionTree:
    """Nodes are token positions; ``joined[t]`` is the layer at which token t entered (root: num_layers)."""

    tokens: list[str]
    root: int
    edges: list[TreeEdge]
    joined: dict[int, int]
    threshold: float
    num_layers: int
    text: str = ""
    prediction: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "prediction": self.prediction,
            "threshold": self.threshold,
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "root": self.root,
            "nodes": [{"position": t, "token": self.tokens[t], "layer": l} for t, l in sorted(self.joined.items(), key=lambda x: (-x[1], x[0]))],
            "edges": [asdict(e) for e in self.edges],
            **self.extra,
        }


def build_tree(scores: torch.Tensor, tokens: list[str], threshold: float = 0.4, cls_index: int | None = 0) -> AttributionTree:
    """Build the attribution tree from layer-wise scores.

    Args:
        scores: ``[layers, seq, seq]`` attribution summed over heads (query, key), unnormalised.
        tokens: the ``seq`` token strings.
        threshold: keep edges whose normalised score is above this (paper: 0.4).
        cls_index: position of [CLS] (excluded from normalisation, edges and root), or None.

    Returns:
        The tree; edges sorted by layer (top first), then query, then key.

    Raises:
        ValueError: shapes disagree, or fewer than 2 non-[CLS] tokens.
    """
    n_layers, seq, seq2 = scores.shape
    if seq != seq2 or seq != len(tokens):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(tokens)} tokens")
    s = scores.detach().float().clone()
    eye = torch.eye(seq, dtype=torch.bool)
    s[:, eye] = 0.0
    if cls_index is not None:
        s[:, cls_index, :] = 0.0
    denom = s.abs().flatten(1).max(-1).values.clamp_min(1e-30)
    norm = s / denom.view(-1, 1, 1)
    total = norm.sum(dim=(0, 2))
    if cls_index is not None:
        total[cls_index] = float("-inf")
    if seq - (cls_index is not None) < 2:
        raise ValueError("an attribution tree needs at least 2 tokens besides [CLS]")
    root = int(total.argmax())
    joined = {root: n_layers}
    edges: list[TreeEdge] = []
    for layer in range(n_layers - 1, -1, -1):
        present = sorted(joined)
        new = {}
        for q in present:
            for k in range(seq):
                if k == q or k in joined:
                    continue
                score = float(norm[layer, q, k])
                if score > threshold:
                    if k not in new or score > new[k].score:
                        new[k] = TreeEdge(q, k, layer, score)
        for k, e in sorted(new.items()):
            joined[k] = layer
            edges.append(e)
    edges.sort(key=lambda e: (-e.layer, e.query, e.key))
    return AttributionTree(tokens, root, edges, joined, threshold, n_layers)


def layer_attribution_maps(model, batch, *, steps: int = 20, target: str = "predicted", **kwargs) -> torch.Tensor:
    """``[layers, seq, seq]`` attribution summed over heads for a batch of one example (Eq. 3)."""
    from ..importance.attattr import attention_attribution

    attr = attention_attribution(model, batch, steps=steps, target=target, **kwargs)
    return attr[0].sum(1)


def tree_for_text(
    model, tokenizer, text: str, pair: str | None = None, *, threshold: float = 0.4, steps: int = 20, quadrature: str = "left", max_length: int = 128, labels: list[str] | None = None
) -> AttributionTree:
    """Tokenise one sentence (or pair), attribute the predicted class, and build its tree."""
    enc = tokenizer(text, pair, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        from ..models import forward_logits

        pred = int(forward_logits(model, batch).argmax(-1))
    maps = layer_attribution_maps(model, batch, steps=steps, target="predicted", quadrature=quadrature).cpu()
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    tree = build_tree(maps, tokens, threshold)
    tree.text = text if pair is None else f"{text} ||| {pair}"
    tree.prediction = labels[pred] if labels else str(pred)
    return tree
