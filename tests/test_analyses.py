"""Analyses: tree construction on hand-made matrices, trigger insertion, connection pruning."""


import pytest
import torch

from prune_attattr import AttentionControl
from prune_attattr.analyses.effectiveness import connection_masks
from prune_attattr.analyses.tree import build_tree
from prune_attattr.analyses.triggers import insert_pattern, top_connection
from prune_attattr.analyses.universality import pearson
from prune_attattr.models import forward_logits

TOKENS = ["[CLS]", "a", "great", "film", "[SEP]"]


def _scores():
    s = torch.zeros(2, 5, 5)
    # layer 1 (top): "film"(3) takes from "great"(2) strongly, from "a"(1) weakly
    s[1, 3, 2] = 2.0
    s[1, 3, 1] = 0.6  # 0.3 after normalisation: below tau
    s[1, 0, 4] = 50.0  # [CLS] query row: excluded from normalisation and edges
    s[1, 2, 2] = 9.0  # self-interaction: never an edge
    # layer 0: "great" takes from "a"; "film" from [SEP]
    s[0, 2, 1] = -4.0  # negative: never an edge
    s[0, 2, 4] = 1.0  # 0.25: below tau
    s[0, 3, 1] = 4.0
    return s


def test_tree_root_threshold_and_edges():
    tree = build_tree(_scores(), TOKENS, threshold=0.4)
    assert tree.tokens[tree.root] == "film"  # largest total normalised attribution as a query, [CLS] excluded
    edges = [(TOKENS[e.key], TOKENS[e.query], e.layer, round(e.score, 3)) for e in tree.edges]
    assert edges == [("great", "film", 1, 1.0), ("a", "film", 0, 1.0)]
    assert tree.joined == {3: 2, 2: 1, 1: 0}


def test_tree_threshold_is_configurable_and_cls_excluded():
    tree = build_tree(_scores(), TOKENS, threshold=0.2)
    edges = {(TOKENS[e.key], TOKENS[e.query], e.layer) for e in tree.edges}
    assert ("a", "film", 1) in edges  # 0.3 > 0.2 now
    assert ("[SEP]", "great", 0) in edges  # 0.25 > 0.2, "great" joined at layer 1
    assert all(TOKENS[e.query] != "[CLS]" for e in tree.edges)
    assert all(e.key != e.query for e in tree.edges)
    d = tree.to_dict()
    assert d["root"] == 3 and len(d["nodes"]) == len(tree.joined)


def test_tree_token_joins_once_at_highest_layer():
    s = torch.zeros(3, 4, 4)
    s[2, 1, 2] = 1.0
    s[1, 1, 2] = 1.0  # "2" already in the tree: no second edge
    s[1, 2, 3] = 1.0
    tree = build_tree(s, ["[CLS]", "x", "y", "z"], threshold=0.4)
    assert [(e.key, e.query, e.layer) for e in tree.edges] == [(2, 1, 2), (3, 2, 1)]
    with pytest.raises(ValueError):
        build_tree(torch.zeros(1, 3, 3), ["a", "b"])


def test_insert_pattern_positions_and_segments():
    ids = [101, 10, 11, 12, 13, 102]
    new, types = insert_pattern(ids, [7, 8], [0.5, 0.0], [0, 0, 0, 1, 1, 1])
    assert new[0] == 101 and new[-1] == 102
    assert new.index(8) == 1  # relative position 0 -> right after [CLS]
    assert new.index(7) == 4  # 0.5 of the length after the first insertion (7 tokens -> round(3.5) = 4)
    assert len(new) == 8 and [x for x in new if x not in (7, 8)] == ids
    assert types[new.index(7)] == types[new.index(7) - 1]
    new2, none = insert_pattern(ids, [9], [1.0])
    assert new2[-2] == 9 and new2[-1] == 102 and none is None


def test_top_connection_skips_special_and_self():
    attr = torch.zeros(2, 3, 4, 4)
    attr[1, 2, 0, 3] = 5.0  # special token pair: head chosen, pair skipped
    attr[1, 2, 1, 1] = 4.0  # self pair: skipped
    attr[1, 2, 2, 1] = 3.0
    attr[0, 0, 1, 2] = 4.5
    special = torch.tensor([True, False, False, True])
    assert top_connection(attr, special) == (1, 2, 2, 1, 3.0)


def test_connection_masks_fraction_and_order(model, batch):
    scores = {l: torch.rand(4, 4, 11, 11, generator=torch.Generator().manual_seed(l)) for l in range(3)}
    masks = connection_masks(scores, batch["attention_mask"], 0.1)
    valid = batch["attention_mask"].sum(1)
    for b in range(4):
        n_valid = 3 * 4 * int(valid[b]) ** 2
        zeroed = sum(int((masks[l][b] == 0).sum()) for l in range(3))
        assert zeroed == round(0.1 * n_valid)
        n = int(valid[b])
        valid_scores = [scores[l][b, :, :n, :n] for l in range(3)]
        kept_max = max(float(v[masks[l][b, :, :n, :n] == 1].max()) for l, v in enumerate(valid_scores))
        pruned_min = min(float(v[masks[l][b, :, :n, :n] == 0].min()) for l, v in enumerate(valid_scores) if (masks[l][b, :, :n, :n] == 0).any())
        assert pruned_min >= kept_max  # largest scores go first
        assert all(bool((masks[l][b, :, n:, :] == 1).all() and (masks[l][b, :, :, n:] == 1).all()) for l in range(3))
    none = connection_masks(scores, batch["attention_mask"], 0.0)
    assert all(bool((m == 1).all()) for m in none.values())


def test_zeroing_connections_changes_logits_as_it_should(model, batch):
    with torch.no_grad():
        base = forward_logits(model, batch)
        ones = {l: torch.ones(4, 4, 11, 11) for l in range(3)}
        assert torch.allclose(forward_logits(model, batch, AttentionControl(connection_mask=ones)), base, atol=1e-6)
        # zeroing every connection of one head == masking that head
        cm = {1: torch.ones(4, 4, 11, 11)}
        cm[1][:, 2] = 0
        hm = {1: torch.tensor([1.0, 1.0, 0.0, 1.0])}
        a = forward_logits(model, batch, AttentionControl(connection_mask=cm))
        b = forward_logits(model, batch, AttentionControl(head_mask=hm))
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, base, atol=1e-4)
        # zeroing connections into padded keys changes nothing (they already have probability 0)
        pad = {l: batch["attention_mask"][:, None, None, :].float().expand(4, 4, 11, 11) for l in range(3)}
        assert torch.allclose(forward_logits(model, batch, AttentionControl(connection_mask=pad)), base, atol=1e-6)


def test_pearson():
    a = torch.arange(12.0).view(3, 4)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)


def test_attack_per_class_accuracy_matches_manual(model):
    from prune_attattr.analyses.triggers import Pattern, attack
    from prune_attattr.tasks import Encoded

    class Tok:
        pad_token_id = 0

        def convert_tokens_to_ids(self, toks):
            return [int(t) for t in toks]

    g = torch.Generator().manual_seed(3)
    ids = [[101] + torch.randint(5, 100, (n,), generator=g).tolist() + [102] for n in (3, 7, 5, 9, 4, 6)]
    labels = [0, 1, 2, 0, 1, 2]
    data = Encoded([[i % 120 for i in x] for x in ids], None, labels)
    p = Pattern(label=1, key_token="17", query_token="33", key_pos=0.3, query_pos=0.6, count=2, score=1.0, layers={})
    (res,) = attack(model, Tok(), data, [p], n_classes=3)

    def acc(rows):
        with torch.no_grad():
            pred = [int(forward_logits(model, {"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}).argmax()) for r in rows]
        return [sum(pr == y for pr, y, c in zip(pred, labels, labels) if c == k) / labels.count(k) for k in range(3)]

    attacked = [insert_pattern(r, [17, 33], [0.3, 0.6])[0] for r in data.input_ids]
    assert res["accuracy_before"] == pytest.approx(acc(data.input_ids))
    assert res["accuracy_after"] == pytest.approx(acc(attacked))
    drops = [100 * (b - a) for b, a in zip(res["accuracy_before"], res["accuracy_after"])]
    assert res["attack_drop_points"] == pytest.approx((drops[0] + drops[2]) / 2)
