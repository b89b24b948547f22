"""Export: reload == original, ONNX == PyTorch on shapes other than the export example's."""


import numpy as np
import pytest
import torch
from conftest import tiny_batch, tiny_model

from prune_attattr import load_classifier, load_pruned, prune_heads, save_pruned
from prune_attattr.deploy.onnx_export import check_onnx, export_onnx, onnx_latency
from prune_attattr.models import forward_logits, kept_heads


@pytest.fixture(scope="module")
def pruned_model():
    return prune_heads(tiny_model(), {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]})


def test_reload_equals_original(pruned_model, tmp_path):
    batch = tiny_batch()
    save_pruned(pruned_model, tmp_path)
    for loader in (load_pruned, load_classifier):
        again = loader(tmp_path)
        assert kept_heads(again) == kept_heads(pruned_model)
        with torch.no_grad():
            assert torch.equal(forward_logits(again, batch), forward_logits(pruned_model, batch))


def test_reload_rejects_mismatched_weights(pruned_model, tmp_path):
    import json

    save_pruned(pruned_model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["prune_attattr_pruned_heads"] = {"0": [1]}  # not the heads the weights were saved with
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="do not match"):
        load_pruned(tmp_path)


def test_onnx_equals_pytorch_dynamic_axes(pruned_model, tmp_path):
    path = export_onnx(pruned_model, tmp_path / "m.onnx", tiny_batch(batch=2, seq=7))
    batches = [tiny_batch(seed=s, batch=b, seq=t) for s, b, t in ((2, 1, 5), (3, 6, 19), (4, 3, 11))]
    diff = check_onnx(pruned_model, path, batches)
    assert diff <= 1e-4
    feeds = {k: batches[1][k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
    lat = onnx_latency(path, feeds, repeats=2)
    assert lat["median_ms"] > 0 and np.isfinite(lat["p90_ms"])
