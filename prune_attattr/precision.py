"""Mixed precision for inference loops (importance, evaluation): autocast from ``runtime.mixed_precision``.

Fine-tuning gets autocast from ``accelerator.prepare(model)``. The importance methods run the model
piece by piece (embeddings, single layers, the classifier), so they enter autocast themselves, with
the accelerator's setting and its device type. Sums that must stay exact (attribution accumulators,
losses, metrics) are kept in float32 by the callers.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["PRECISIONS", "resolve_precision", "autocast"]


def resolve_precision(mixed_precision: str | None, accelerator=None) -> str:
    """The precision to use: ``mixed_precision`` when given, else the accelerator's, else ``"no"``.

    Raises:
        ValueError: a value other than ``no``, ``bf16``, ``fp16``.
    """
    if mixed_precision is None:
        mixed_precision = str(getattr(accelerator, "mixed_precision", "no") or "no") if accelerator is not None else "no"
    mixed_precision = str(mixed_precision)
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision '{mixed_precision}' is not supported; use one of {list(PRECISIONS)}")
    return mixed_precision


def autocast(device: torch.device | str, mixed_precision: str = "no"):
    """A context manager running the block under ``torch.autocast`` for ``device``'s type (no-op for ``"no"``).

    Raises:
        ValueError: the device type cannot autocast to that dtype (torch would otherwise disable
            autocast with only a warning).
    """
    dtype = PRECISIONS[resolve_precision(mixed_precision)]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"mixed_precision '{mixed_precision}': autocast is not available on device type '{device_type}'")
    import warnings

    ctx = torch.autocast(device_type=device_type, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type=device_type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype
    if not enabled:
        raise ValueError(
            f"mixed_precision '{mixed_precision}' is not supported on device type '{device_type}'; "
            "use runtime.mixed_precision 'no' (or 'bf16' on CPU)"
        )
    return ctx
