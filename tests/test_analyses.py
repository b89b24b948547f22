"""Analyses: trees on hand-made matrices, triggers as the official code (extraction on hand-made
attributions, insertion against hand-computed token lists), effectiveness head masks, connection pruning."""


import pytest
import torch

from prune_attattr import AttentionControl
from prune_attattr.analyses.connections import connection_masks
from prune_attattr.analyses.effectiveness import example_head_scores, topk_head_masks
from prune_attattr.analyses.tree import build_tree
from prune_attattr.analyses.triggers import (
    Pattern,
    Template,
    attack,
    example_pattern,
    insert_trigger,
    paper_table,
    rank_patterns,
    trigger_tokens,
)
from prune_attattr.analyses.universality import pearson
from prune_attattr.importance.attattr import attention_attribution
from prune_attattr.models import forward_logits
from prune_attattr.tasks import Examples

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


# --- triggers (official run_adver_connection.py / run_adver_evaluate.py) ---------------------------


def test_example_pattern_head_choice_and_top_pairs():
    l0 = torch.zeros(2, 3, 3)
    l0[1, 2, 0] = 0.5
    l1 = torch.zeros(2, 3, 3)
    l1[0, 1, 2] = 0.7  # largest entry overall: layer 1, head 0
    l1[0, 0, 0] = 0.3  # its second largest (diagonal and [CLS] included, as the official code)
    l1[1, 1, 1] = 0.6  # another head of layer 1: not the chosen head's entries
    layer, head, top1, top2 = example_pattern([l0, l1])
    assert (layer, head) == (1, 0)
    assert top1[:2] == (1, 2) and top1[2] == pytest.approx(0.7)
    assert top2[:2] == (0, 0) and top2[2] == pytest.approx(0.3)
    # a tie between layers keeps the lower layer (the official update needs a strictly larger max)
    l1[0, 1, 2] = 0.5
    l1[1, 1, 1] = 0.0
    assert example_pattern([l0, l1])[:2] == (0, 1)


def _pattern(idx, a1, a2, ids=None, top1=(2, 7), top2=(0, 3)):
    ids = ids or [101, 10, 11, 12, 13, 102, 20, 21, 22, 102]
    return Pattern(idx, 0, 0, top1, top2, ("x", "y"), ("x", "y"), (a1, a2), 0, 0, [str(i) for i in ids], ids)


def test_rank_patterns_sorts_by_sum_and_drops_below_threshold():
    ps = [_pattern(0, 0.010, 0.005), _pattern(1, 0.05, 0.04), _pattern(2, 0.2, 0.01), _pattern(3, 0.012, 0.008)]
    assert [p.source_index for p in rank_patterns(ps, 0.02)] == [2, 1, 3]  # sums .21, .09, .02; .015 dropped


def test_trigger_tokens_segments_relative_positions_and_ratio():
    special = {101, 102}
    # top2/top1 = 0.1 < 0.2: only the top-1 pair (2, 7); [CLS] A=[10 11 12 13] [SEP] B=[20 21 22] [SEP]
    assert trigger_tokens(_pattern(0, 0.5, 0.05), special) == [(0, 2 / 4, 11), (1, 2 / 3, 21)]
    # ratio 0.4: the top-2 pair (0, 3) joins; position 0 is [CLS] and is dropped
    assert trigger_tokens(_pattern(0, 0.5, 0.2), special) == [(0, 2 / 4, 11), (0, 3 / 4, 12), (1, 2 / 3, 21)]
    # a pair on the same token is inserted once
    assert trigger_tokens(_pattern(0, 0.5, 0.0, top1=(3, 3)), special) == [(0, 3 / 4, 12)]


def test_insert_trigger_against_hand_computed_lists():
    a, b = insert_trigger([1, 2, 3, 4, 5, 6], [7, 8], [(0, 0.5, 11), (0, 0.75, 12), (1, 2 / 3, 21)])
    # A: n = 2, round(8 * 0.5) = 4, then round(8 * 0.75) = 6; B: n = 1, round(3 * 2/3) = 2
    assert a == [1, 2, 3, 4, 11, 5, 12, 6] and b == [7, 8, 21]
    # Python's round (ties to even): round(5 * 0.5) = 2; the same position again moves one right
    assert insert_trigger([1, 2, 3], None, [(0, 0.5, 11), (0, 0.5, 12)]) == ([1, 2, 11, 12, 3], None)
    assert insert_trigger([1, 2, 3, 4, 5, 6], None, [(0, 0.5, 11)])[0] == [1, 2, 3, 4, 11, 5, 6]  # round(3.5) = 4
    with pytest.raises(ValueError, match="second-segment"):
        insert_trigger([1, 2], None, [(1, 0.5, 9)])


def test_template_truncation_never_drops_sep():
    tpl = Template(([101], [102]), ([101], [102], [102]), ([0], 0, [0]), ([0], 0, [0], 1, [1]))
    ids, types = tpl.build([1, 2, 3, 4, 5, 6], [7, 8], max_length=8)  # 5 text tokens fit: A loses 3
    assert ids == [101, 1, 2, 3, 102, 7, 8, 102] and types == [0, 0, 0, 0, 0, 1, 1, 1]
    ids, types = tpl.build([1, 2, 3, 4, 5, 6], None, max_length=5)
    assert ids == [101, 1, 2, 3, 102] and types == [0] * 5


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"] + [f"w{i}" for i in range(40)]


def _tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def test_template_from_a_real_tokenizer_matches_its_encoding():
    tok = _tokenizer()
    tpl = Template.from_tokenizer(tok)
    enc = tok("w1 w2 w3", "w4 w5")
    a, b = tok("w1 w2 w3", add_special_tokens=False)["input_ids"], tok("w4 w5", add_special_tokens=False)["input_ids"]
    assert tpl.build(a, b, 64) == (enc["input_ids"], enc["token_type_ids"])


def test_attack_inserts_into_every_example_of_every_class(model):
    tok = _tokenizer()
    g = torch.Generator().manual_seed(5)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (n,), generator=g)) for n in (3, 7, 5, 9, 4, 6)]
    pairs = [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (n,), generator=g)) for n in (2, 4, 3, 5, 6, 2)]
    labels = [0, 1, 2, 0, 1, 2]
    dev = Examples(texts, pairs, labels)
    src = tok("w1 w2 w3 w4", "w5 w6 w7")["input_ids"]  # [CLS] w1 w2 w3 w4 [SEP] w5 w6 w7 [SEP]
    p = _pattern(0, 0.5, 0.05, ids=src)  # inserts w2 (A, 2/4) and w6 (B, 2/3)
    res = attack(model, tok, dev, [p], max_length=12, n_classes=3)

    def manual(insert: bool):
        pred = []
        for t, q in zip(texts, pairs):
            a, b = tok(t, add_special_tokens=False)["input_ids"], tok(q, add_special_tokens=False)["input_ids"]
            if insert:
                a.insert(round((len(a) + 1) * 0.5), WORDS.index("w2"))
                b.insert(round((len(b) + 1) * 2 / 3), WORDS.index("w6"))
            while len(a) + len(b) > 12 - 3:
                (a if len(a) > len(b) else b).pop()
            ids = [2] + a + [3] + b + [3]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
            batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), "token_type_ids": torch.tensor([types])}
            with torch.no_grad():
                pred.append(int(forward_logits(model, batch).argmax()))
        return [sum(pr == y for pr, y in zip(pred, labels) if y == c) / labels.count(c) for c in range(3)]

    assert res["accuracy_before"] == pytest.approx(manual(False))
    (out,) = res["patterns"]
    assert out["accuracy_after"] == pytest.approx(manual(True))
    assert [i["token"] for i in out["inserted"]] == ["w2", "w6"]
    drops = [100 * (b - a) for b, a in zip(res["accuracy_before"], out["accuracy_after"])]
    assert out["drop_points"] == pytest.approx(drops) and out["mean_drop_points"] == pytest.approx(sum(drops) / 3)


def test_paper_table_picks_largest_mean_drop():
    res = {
        "accuracy_before": [0.9, 0.8],
        "patterns": [
            {"rank": 1, "drop_points": [10.0, 0.0], "mean_drop_points": 5.0},
            {"rank": 2, "drop_points": [40.0, 20.0], "mean_drop_points": 30.0},
            {"rank": 3, "drop_points": [None, 8.0], "mean_drop_points": 8.0},
            {"rank": 4, "drop_points": [1.0, 1.0], "mean_drop_points": 1.0},
        ],
    }
    t = paper_table(res, 3)
    assert t["patterns"] == [2, 3, 1]
    assert t["avg_drop_per_class"] == pytest.approx([25.0, 28 / 3])
    assert t["mean_drop_points"] == pytest.approx(43 / 3)


# --- effectiveness (section 4.1): per-example head masks --------------------------------------------


def test_topk_head_masks_order_and_bounds():
    s = torch.tensor([[[0.1, 0.9, 0.5, 0.3]], [[0.4, 0.2, 0.8, 0.6]]])  # [B=2, L=1, H=4]
    assert topk_head_masks(s, 2).tolist() == [[[1, 0, 0, 1]], [[1, 1, 0, 0]]]
    assert topk_head_masks(s, 1, largest=False).tolist() == [[[0, 1, 1, 1]], [[1, 0, 1, 1]]]
    assert bool((topk_head_masks(s, 0) == 1).all()) and bool((topk_head_masks(s, 4) == 0).all())
    with pytest.raises(ValueError):
        topk_head_masks(s, 5)


def test_example_head_scores_and_per_example_masks(model, batch):
    scores = example_head_scores(model, batch, steps=4, quadrature="gauss")
    attr = attention_attribution(model, batch, steps=4, quadrature="gauss", target="gold")  # [B, L, H, T, T]
    for b in range(4):
        n = int(batch["attention_mask"][b].sum())
        expect = attr[b, :, :, :n, :n].flatten(2).max(-1).values
        assert torch.allclose(scores["attribution"][b], expect, atol=1e-6)
    mask = topk_head_masks(scores["attribution"], 2)
    with torch.no_grad():
        together = forward_logits(model, batch, AttentionControl(head_mask={l: mask[:, l] for l in range(3)}))
        for b in range(4):  # each example masked with its own heads == the batch with per-example masks
            n = int(batch["attention_mask"][b].sum())
            one = {k: v[b : b + 1, :n] for k, v in batch.items() if k != "labels"}
            alone = forward_logits(model, one, AttentionControl(head_mask={l: mask[b, l] for l in range(3)}))
            assert torch.allclose(together[b], alone[0], atol=1e-5)
        assert not torch.allclose(together, forward_logits(model, batch), atol=1e-4)


def test_effectiveness_curves_and_report_rendering(model, batch, tmp_path):
    from accelerate import Accelerator

    from prune_attattr.analyses.effectiveness import effectiveness_curves
    from prune_attattr.report import analyses_markdown, write_analyses_files

    res = effectiveness_curves(model, [batch], Accelerator(cpu=True), steps=2, quadrature="gauss")
    assert res["k"] == [0, 1, 2, 3, 4] and res["examples"] == 4
    with torch.no_grad():
        plain = float((forward_logits(model, batch).argmax(-1) == batch["labels"]).float().mean())
    acc = res["accuracy"]
    for r in ("attribution", "attention"):
        assert acc[r]["largest"][0] == pytest.approx(plain) == acc[r]["smallest"][0]  # k = 0: nothing masked
        assert acc[r]["largest"][-1] == pytest.approx(acc["attribution"]["smallest"][-1])  # k = H: all masked, any order
    summary = {"labels": ["neg", "pos", "mid"], "effectiveness": res}
    write_analyses_files(summary, tmp_path)
    assert (tmp_path / "effectiveness.png").stat().st_size > 1000 and (tmp_path / "effectiveness.json").is_file()
    md = "\n".join(analyses_markdown(summary))
    assert "| 4 |" in md and "effectiveness.png" in md


def test_report_states_each_methods_settings_and_renders_triggers(tmp_path):
    import json

    from prune_attattr.report import write_analyses_files, write_json, write_markdown

    trig = {
        "source_examples": 2, "patterns_found": 2, "patterns_valid": 1, "patterns_attacked": 1, "dev_examples": 4, "dev_per_class": [2, 2],
        "settings": {"examples": 2, "min_tokens": 0, "steps": 64, "quadrature": "left", "threshold": 0.02},
        "accuracy_before": [1.0, 0.5],
        "patterns": [{"rank": 1, "score": 0.3, "layer": 0, "head": 1, "top1_tokens": ["a", "b"], "top2_tokens": ["b", "b"], "inserted": [{"segment": 0, "relative_position": 0.5, "token": "b"}],
                      "accuracy_after": [0.0, 0.5], "drop_points": [100.0, 0.0], "mean_drop_points": 50.0}],
        "paper_table": {"patterns": [1], "avg_drop_per_class": [100.0, 0.0], "mean_drop_points": 50.0},
    }
    report = {
        "run_name": "t", "model": "m", "task": "sst2", "primary_metric": "accuracy", "eval_split": "dev", "eval_examples": 4,
        "importance_examples": 8, "importance_source": "dev", "total_heads": 4, "baseline": {"accuracy": 0.5}, "timings": {},
        "curves": {}, "importance": {"attattr": [[1.0]], "taylor": [[1.0]]}, "export": None,
        "analyses": {"labels": ["negative", "positive"], "triggers": trig},
        "recipe": {"importance": {"attattr": {"mode": "fast", "quadrature": "left", "steps": 20, "target": "gold"}}},
    }
    write_markdown(report, tmp_path / "report.md", None)
    md = (tmp_path / "report.md").read_text()
    assert "`attattr`: left quadrature, 20 steps, target gold label, mode fast (the paper's procedure" in md
    assert "`taylor`:" in md and "| negative | 100.0 | 0.0 | 100.0 |" in md
    write_json(report, tmp_path / "report.json")
    ms = json.loads((tmp_path / "report.json").read_text())["method_settings"]
    assert ms["attattr"]["quadrature"] == "left" and ms["attattr"]["steps"] == 20 and ms["taylor"]["target"] == "gold"
    write_analyses_files(report["analyses"], tmp_path / "analyses")
    assert (tmp_path / "analyses" / "triggers.png").is_file()
    assert json.loads((tmp_path / "analyses" / "triggers.json").read_text())["labels"] == ["negative", "positive"]
