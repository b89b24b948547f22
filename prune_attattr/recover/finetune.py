"""Full fine-tuning of the classifier with Accelerate (AdamW, linear schedule with warm-up), cached.

The cache key is a hash of everything that determines the result: the base model's files (their
bytes, :func:`prune_attattr.cache.model_fingerprint`), the training examples (their token ids and
labels), the hyper-parameters, the seed and this module's version. The entry is written to a temporary
folder, completed with a marker listing every file, and renamed into place; a second run with the same
key loads the saved model instead of training, but only when the marker says the entry is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..cache import cache_root, entry_complete, model_fingerprint, write_complete_marker
from ..loading import load_classifier
from ..progress import progress
from ..tasks import Encoded, make_dataloader

FINETUNE_VERSION = 2  # 2: key on the weights' bytes (1 hashed their sizes)

__all__ = ["cache_root", "finetune_key", "finetune", "optimizer_and_schedule", "train_epochs"]


def finetune_key(model_path: Path, train: Encoded, settings: dict, labels: list[str], seed: int) -> str:
    """Hex key (16 chars) of what determines a fine-tuning result (the model folder is hashed by content)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FINETUNE_VERSION, "settings": settings, "labels": labels, "seed": seed}, sort_keys=True).encode())
    h.update(model_fingerprint(model_path).encode())
    for ids, y in zip(train.input_ids, train.labels):
        h.update(bytes(str(y), "ascii") + b":" + ",".join(map(str, ids)).encode() + b";")
    return h.hexdigest()[:16]


def _optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def optimizer_and_schedule(model, settings, total_steps: int):
    """AdamW (no decay on biases and LayerNorm) with a linear schedule and warm-up, shared by fine-tuning
    and recovery.

    Args:
        model: the model to train.
        settings: anything with ``learning_rate``, ``weight_decay`` and ``warmup_ratio``.
        total_steps: optimizer steps of the whole run (the schedule decays to 0 there).

    Returns:
        ``(optimizer, scheduler)``, not yet prepared by Accelerate.
    """
    from transformers import get_linear_schedule_with_warmup

    optimizer = _optimizer(model, settings.learning_rate, settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def train_epochs(model, loader, sampler, optimizer, scheduler, accelerator, *, epochs: int, description: str, loss_fn) -> float | None:
    """The one training loop of fine-tuning and recovery: ``epochs`` passes of optimizer steps.

    ``model``, ``loader``, ``optimizer`` and ``scheduler`` come from ``accelerator.prepare``;
    ``sampler`` is the loader's own batch sampler (reshuffled per epoch through ``set_epoch``);
    ``loss_fn(model, batch)`` returns the scalar loss of one batch.

    Returns:
        The exponential moving average (weight 0.98) of the batch losses, or None when no step ran.
    """
    running = None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in progress(loader, f"{description} epoch {epoch + 1}/{epochs}", accelerator):
            loss = loss_fn(model, batch)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            value = loss.detach().item()
            running = value if running is None else 0.98 * running + 0.02 * value
    return running


def finetune(
    model_path: Path,
    tokenizer,
    train: Encoded,
    *,
    id2label: dict[int, str],
    settings,
    seed: int,
    accelerator,
    use_cache: bool = True,
) -> tuple[Path, dict]:
    """Fine-tune ``model_path`` on ``train`` (or reuse the cached result).

    Args:
        model_path: base model directory.
        tokenizer: saved beside the fine-tuned model.
        train: tokenised training examples.
        id2label: classifier labels.
        settings: :class:`prune_attattr.config.FinetuneSettings`.
        seed: seeds the data order and the classifier's initialisation.
        accelerator: an ``accelerate.Accelerator``.
        use_cache: False: train even when a cached entry exists (the new result replaces it).

    Returns:
        ``(directory of the fine-tuned model, info dict with key, seconds, cached)``.
    """
    from accelerate.utils import set_seed

    hp = settings.model_dump(exclude={"cache_dir", "enabled", "train_examples"})
    # the process count sets the effective batch (batch_size per process) and precision changes the
    # result: both are part of the key, not of the reported hyper-parameters
    run_shape = {"processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision)}
    key = finetune_key(model_path, train, {**hp, **run_shape}, list(id2label.values()), seed)
    out_dir = cache_root(settings.cache_dir) / "finetuned" / key
    info_file = out_dir / "finetune.json"
    if use_cache and entry_complete(out_dir, required=("finetune.json", "config.json")):
        info = json.loads(info_file.read_text())
        info["cached"] = True
        return out_dir, info

    set_seed(seed)
    model = load_classifier(model_path, id2label=id2label)
    model.train()
    loader = make_dataloader(train, batch_size=settings.batch_size, pad_id=tokenizer.pad_token_id or 0, shuffle=True, seed=seed)
    sampler = loader.batch_sampler  # ours, kept by reference inside accelerate's sharding wrapper
    total_steps = len(loader) * settings.epochs
    optimizer, scheduler = optimizer_and_schedule(model, settings, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start = time.perf_counter()
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    running = train_epochs(
        model, loader, sampler, optimizer, scheduler, accelerator, epochs=settings.epochs, description="fine-tune",
        loss_fn=lambda m, batch: m(**{k: batch[k] for k in keys if k in batch}).loss,
    )
    seconds = time.perf_counter() - start
    info = {"key": key, "seconds": round(seconds, 1), "steps": total_steps, "examples": len(train), "final_loss_ema": running, **hp}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out_dir.parent))
        try:
            model_to_save = accelerator.unwrap_model(model)
            model_to_save.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "finetune.json").write_text(json.dumps(info, indent=2))
            write_complete_marker(tmp)  # last: an entry without it is never reused
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    info["cached"] = False
    return out_dir, info
