"""Mixed precision (runtime.mixed_precision) in importance and evaluation, checked on CPU with bfloat16.

The forwards must really run in bf16 (seen by hooks on the Linear layers), the attribution leaves,
gradients and sums must stay float32, and the results must stay close to the float32 run.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_batch, tiny_model

from prune_attattr import attention_attribution
from prune_attattr import importance as imp
from prune_attattr.evaluation import predict
from prune_attattr.precision import autocast, resolve_precision


class DtypeMeter:
    """Forward hooks on every Linear: the dtypes of their outputs."""

    def __init__(self, model):
        self.dtypes = set()
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def _hook(self, module, args, output):
        self.dtypes.add(output.dtype)

    def close(self):
        for h in self.handles:
            h.remove()


def _stub_accelerator(mixed_precision):
    """What the methods use of an Accelerator, with the precision set (one process, CPU)."""
    return SimpleNamespace(
        mixed_precision=mixed_precision,
        device=torch.device("cpu"),
        is_main_process=True,
        gather_for_metrics=lambda x: x,
    )


def test_resolve_precision():
    assert resolve_precision(None) == "no"
    assert resolve_precision(None, _stub_accelerator("bf16")) == "bf16"
    assert resolve_precision("fp16", _stub_accelerator("bf16")) == "fp16"
    with pytest.raises(ValueError, match="mixed_precision 'fp8'"):
        resolve_precision("fp8")
    with autocast("cpu", "bf16"):
        assert torch.nn.Linear(3, 3)(torch.randn(2, 3)).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_attribution_bf16_autocast_float32_sums(mode, monkeypatch):
    model, batch = tiny_model(init=0.1), tiny_batch()  # init 0.3 amplifies bf16 rounding to ~9% of the max
    want = attention_attribution(model, batch, steps=6, target="gold", mode=mode)
    leaves = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        leaves.extend(t.dtype for t in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))
        grads = real_grad(outputs, inputs, *args, **kwargs)
        leaves.extend(g.dtype for g in grads)
        return grads

    monkeypatch.setattr(torch.autograd, "grad", spy)
    meter = DtypeMeter(model)
    got = attention_attribution(model, batch, steps=6, target="gold", mode=mode, mixed_precision="bf16")
    meter.close()
    assert meter.dtypes == {torch.bfloat16}  # every Linear ran in bf16
    assert leaves and set(leaves) == {torch.float32}  # scaled probabilities and their gradients
    assert got.dtype == torch.float32
    scale = want.abs().max()
    assert scale > 0
    err = (got - want).abs().max() / scale
    assert 0 < err < 0.02  # bf16 rounding (8-bit mantissa), not another quantity


def _loader(batch):
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


@pytest.mark.parametrize("method", ["attattr", "taylor", "accuracy_difference", "attention"])
def test_importance_follows_accelerator_precision(method):
    model, batch = tiny_model(init=0.1), tiny_batch(batch=6, seq=10)
    fn = {
        "attattr": lambda acc: imp.attattr_importance(model, _loader(batch), acc, steps=4, description=None),
        "taylor": lambda acc: imp.taylor_importance(model, _loader(batch), acc, description=None),
        "accuracy_difference": lambda acc: imp.accuracy_difference_importance(model, _loader(batch), acc, description=None),
        "attention": lambda acc: imp.attention_importance(model, _loader(batch), acc, description=None),
    }[method]
    want = fn(_stub_accelerator("no"))
    meter = DtypeMeter(model)
    got = fn(_stub_accelerator("bf16"))
    meter.close()
    assert meter.dtypes == {torch.bfloat16}
    assert got.dtype == torch.float32 and got.shape == want.shape
    if method == "accuracy_difference":  # metric drops: a few predictions may flip
        assert (got - want).abs().max() <= 2 / 6 + 1e-3
    else:
        assert torch.allclose(got, want, atol=0.02 * float(want.abs().max()))


def test_evaluation_follows_accelerator_precision():
    model, batch = tiny_model(init=0.1), tiny_batch(batch=6, seq=10)
    logits32, labels32, _ = predict(model, _loader(batch), _stub_accelerator("no"))
    meter = DtypeMeter(model)
    logits, labels, loss = predict(model, _loader(batch), _stub_accelerator("bf16"))
    meter.close()
    assert meter.dtypes == {torch.bfloat16}
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(labels, labels32)
    assert torch.allclose(logits, logits32, atol=0.02 * float(logits32.abs().max()))
