"""Recovery training of a pruned classifier, distilled from the unpruned one.

After heads are removed the remaining weights are fine-tuned on the training split with

    loss = (1 - alpha) * CE(student logits, gold) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", section 2: the ``T^2`` keeps the
gradient scale of the soft term independent of ``T``; CoFi, Xia et al. 2022, section 3.3, distils the
same way after structured pruning). The teacher's logits are computed once for every training example
(:func:`teacher_logits`) and looked up by example index, never recomputed per epoch.

``recovery.hidden_weight`` beta > 0 adds layer-wise distillation (TinyBERT, Jiao et al. 2020, Eq. 8;
CoFi section 3.3): ``beta * mean_l MSE(h_student^l, h_teacher^l)`` over the real tokens of each layer's
output hidden states (:func:`hidden_loss`). Pruning heads and neurons keeps the hidden size and the
depth, so layer ``l`` of the student is matched to layer ``l`` of the teacher without a projection; the
teacher then runs on every batch (hidden states of every example are too large to cache). AdamW with a
linear schedule (:func:`prune_attattr.recover.finetune.optimizer_and_schedule`), on Accelerate.

Pruned heads stay pruned: :func:`prune_attattr.prune_heads` removed their rows and columns, so the
optimizer has no parameter to grow them back with.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .finetune import optimizer_and_schedule, train_epochs
from ..models import forward_logits, input_names, kept_heads
from ..progress import progress
from ..tasks import Encoded, make_dataloader

__all__ = ["RecoveryError", "kd_loss", "hidden_loss", "recovery_dataloader", "teacher_logits", "recover"]

INDEX_KEY = "example_index"


class RecoveryError(ValueError):
    """Recovery cannot run on what it was given (the message says what to do)."""


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, *, alpha: float, temperature: float
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    Args:
        student: student logits ``[B, C]``.
        teacher: teacher logits ``[B, C]`` (ignored, may be None, when ``alpha == 0``).
        labels: gold class indices ``[B]``.
        alpha: weight of the distillation term in [0, 1].
        temperature: ``T > 0``.

    Returns:
        Scalar loss: both terms are means over the batch (KL summed over classes, then averaged).

    Raises:
        RecoveryError: ``alpha > 0`` without teacher logits, or shapes that do not match.
    """
    ce = nn.functional.cross_entropy(student.float(), labels)
    if alpha == 0:
        return ce
    if teacher is None or teacher.shape != student.shape:
        raise RecoveryError(
            f"distillation (recovery.alpha {alpha}) needs teacher logits of shape {tuple(student.shape)}, got "
            f"{None if teacher is None else tuple(teacher.shape)}"
        )
    t = temperature
    log_p_student = nn.functional.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = nn.functional.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * t * t * kl


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
    """Layer-wise distillation loss: the mean over layers of the mean squared error between student and
    teacher hidden states, over real tokens (TinyBERT, Jiao et al. 2020, Eq. 8, without a projection).

    Args:
        student, teacher: each layer's output hidden states ``[B, T, H]`` (``output_hidden_states``, the
            embeddings' output first); the same number of layers and the same ``H``.
        attention_mask: ``[B, T]``, 1 on real tokens.

    Returns:
        Scalar: ``mean_l sum_{b,t real} ||s - t||^2 / (n_real * H)``; 0 when student == teacher.

    Raises:
        RecoveryError: different depths or shapes (a student with removed layers needs a layer map).
    """
    if len(student) != len(teacher):
        raise RecoveryError(f"layer-wise distillation needs the teacher's depth: student {len(student) - 1} layers, teacher {len(teacher) - 1}")
    mask = attention_mask.to(student[0].dtype).unsqueeze(-1)
    real = mask.sum().clamp_min(1.0)
    terms = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise RecoveryError(f"hidden states differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        terms.append((((s.float() - t.float()) ** 2) * mask).sum() / (real * s.shape[-1]))
    return torch.stack(terms).mean()


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


def recovery_dataloader(data: Encoded, *, batch_size: int, pad_id: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled, length-grouped training batches (as :func:`prune_attattr.tasks.make_dataloader`) that also
    carry ``example_index [B]`` (position in ``data``), the key of the cached teacher logits.

    Not prepared: :func:`recover` and :func:`teacher_logits` prepare it with their accelerator.
    """
    base = make_dataloader(data, batch_size=batch_size, pad_id=pad_id, shuffle=True, seed=seed)
    collate = base.collate_fn

    def collate_indexed(items):
        batch = collate([x for _, x in items])
        batch[INDEX_KEY] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch

    return torch.utils.data.DataLoader(_Indexed(base.dataset), batch_sampler=base.batch_sampler, collate_fn=collate_indexed)


def _check_loader(dataloader) -> None:
    if not hasattr(dataloader, "batch_sampler") or not hasattr(dataloader.batch_sampler, "set_epoch"):
        raise RecoveryError("recover needs a dataloader from prune_attattr.recover.distill.recovery_dataloader (not yet prepared)")


@torch.no_grad()
def teacher_logits(teacher: nn.Module, dataloader, accelerator, *, description: str | None = "teacher logits") -> torch.Tensor:
    """Teacher logits of every example of a :func:`recovery_dataloader`, computed once.

    Every process runs the teacher on its shard; the results are gathered so that each process holds
    the whole table.

    Returns:
        float32 ``[N, C]`` on the accelerator's device, row ``i`` = example ``i`` of the dataloader's data.

    Raises:
        RecoveryError: a dataloader whose batches carry no ``example_index``.
    """
    _check_loader(dataloader)
    teacher.eval()
    loader = accelerator.prepare(dataloader)
    n = len(dataloader.dataset)
    table, seen = None, torch.zeros(n, dtype=torch.bool)
    it = progress(loader, description, accelerator) if description else loader
    for batch in it:
        if INDEX_KEY not in batch:
            raise RecoveryError("teacher_logits needs batches with 'example_index'; build the loader with recovery_dataloader")
        logits = forward_logits(teacher, batch).float()
        idx = batch[INDEX_KEY]
        idx = accelerator.pad_across_processes(idx, dim=0, pad_index=-1)
        logits = accelerator.pad_across_processes(logits, dim=0)
        idx, logits = accelerator.gather((idx, logits))
        keep = idx >= 0
        idx, logits = idx[keep].cpu(), logits[keep].cpu()
        if table is None:
            table = torch.zeros(n, logits.shape[-1])
        table[idx] = logits
        seen[idx] = True
    if table is None or not bool(seen.all()):
        raise RecoveryError(f"teacher_logits saw {int(seen.sum())} of {n} examples; the dataloader must cover its data")
    return table.to(accelerator.device)


def recover(pruned: nn.Module, teacher: nn.Module | None, dataloader, accelerator, settings, *, cached_teacher: torch.Tensor | None = None) -> dict:
    """Fine-tune a pruned classifier in place, distilling from ``teacher`` (recovery after pruning).

    Args:
        pruned: the pruned student (structurally pruned; its heads stay pruned). Trained in place and
            returned to eval mode.
        teacher: the unpruned fine-tuned classifier, or None when ``settings.alpha == 0`` or
            ``cached_teacher`` is given (and ``settings.hidden_weight`` is 0: layer-wise distillation runs
            the teacher on every batch). Not trained.
        dataloader: from :func:`recovery_dataloader` (not prepared; batches carry ``example_index``).
        accelerator: an ``accelerate.Accelerator``; with several processes each one takes its shard of
            every epoch and gradients are averaged (DDP).
        settings: :class:`prune_attattr.config.RecoverySettings` (``epochs``, ``learning_rate``,
            ``weight_decay``, ``warmup_ratio``, ``alpha``, ``temperature``, ``hidden_weight``).
        cached_teacher: teacher logits ``[N, C]`` from :func:`teacher_logits`, to share them between
            several recoveries on the same data.

    Returns:
        ``{"steps", "examples", "seconds", "final_loss_ema", "alpha", "temperature", "hidden_weight", "epochs"}``.

    Raises:
        RecoveryError: distillation without a teacher, a dataloader without example indices, a
            teacher whose classes differ from the student's, or layer-wise distillation without a teacher.
    """
    _check_loader(dataloader)
    kept_before = kept_heads(pruned)
    alpha, temp = float(settings.alpha), float(settings.temperature)
    beta = float(getattr(settings, "hidden_weight", 0.0))
    if beta > 0 and teacher is None:
        raise RecoveryError(f"recovery.hidden_weight {beta} distils hidden states: pass teacher (the unpruned model)")
    start = time.perf_counter()
    table = None
    if alpha > 0:
        if cached_teacher is not None:
            table = cached_teacher.to(accelerator.device)
        elif teacher is not None:
            table = teacher_logits(teacher, dataloader, accelerator)
        else:
            raise RecoveryError(f"recovery.alpha {alpha} distils from the unpruned model: pass teacher (or cached_teacher)")
        if table.shape[0] != len(dataloader.dataset):
            raise RecoveryError(f"cached teacher logits have {table.shape[0]} rows but the dataloader has {len(dataloader.dataset)} examples")
        n_labels = pruned.config.num_labels
        if table.shape[1] != n_labels:
            raise RecoveryError(f"teacher has {table.shape[1]} classes but the pruned model has {n_labels}")
    sampler = dataloader.batch_sampler  # kept by reference inside accelerate's sharding wrapper
    total_steps = len(dataloader) * settings.epochs
    optimizer, scheduler = optimizer_and_schedule(pruned, settings, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(pruned, optimizer, dataloader, scheduler)
    model.train()
    names = input_names(accelerator.unwrap_model(model))  # the wrapper (DDP) is no transformers model

    if beta > 0:
        teacher = teacher.to(accelerator.device).eval()

    def loss_fn(m, batch):
        inputs = {k: batch[k] for k in names if k in batch}
        out = m(**inputs, output_hidden_states=beta > 0)
        teach = table[batch[INDEX_KEY]] if table is not None else None
        loss = kd_loss(out.logits, teach, batch["labels"], alpha=alpha, temperature=temp)
        if beta > 0:
            with torch.no_grad():
                t_hidden = teacher(**inputs, output_hidden_states=True).hidden_states
            loss = loss + beta * hidden_loss(out.hidden_states, t_hidden, batch["attention_mask"])
        return loss

    running = train_epochs(
        model, loader, sampler, optimizer, scheduler, accelerator, epochs=settings.epochs, description="recovery", loss_fn=loss_fn
    )
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(model)
    student.eval()
    accelerator.free_memory()  # drop accelerate's references to this run's optimizer and model
    if kept_heads(student) != kept_before:  # pragma: no cover - structural pruning makes this impossible
        raise RuntimeError("recovery changed the set of kept heads")
    return {
        "steps": total_steps,
        "examples": len(dataloader.dataset),
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss_ema": running,
        "alpha": alpha,
        "temperature": temp,
        "hidden_weight": beta,
        "epochs": settings.epochs,
    }
