"""Worker for test_recovery.py: a few recovery steps of a pruned tiny model, results written as JSON.

Run as ``python _recovery_worker.py OUT.json`` (one process) or under
``accelerate launch --multi_gpu --num_processes 2 _recovery_worker.py OUT.json`` (two CPU processes, gloo).
``DataLoaderConfiguration(split_batches=True)`` keeps the global batch (and so the optimisation) the same for any process count.
"""

import copy
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from conftest import tiny_batch, tiny_model

from prune_attattr import prune_heads, recover
from prune_attattr.config import RecoverySettings
from prune_attattr.models import forward_logits
from prune_attattr.recover.distill import recovery_dataloader, teacher_logits
from prune_attattr.tasks import Encoded


def synthetic(n: int, seed: int) -> Encoded:
    """Sentences of random tokens; label 1 when the first token is below 60 (learnable from [CLS])."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 120, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return Encoded(ids, [[0] * len(x) for x in ids], [int(x[0] < 60) for x in ids])


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    teacher = no_dropout(tiny_model(labels=2))
    student = prune_heads(copy.deepcopy(teacher), {0: [0, 2], 1: [0, 1, 2, 3], 2: [1]})
    data = synthetic(32, seed=3)
    loader = recovery_dataloader(data, batch_size=8, pad_id=0, seed=0)
    with torch.no_grad():
        before = forward_logits(student, tiny_batch(labels=2))
    table = teacher_logits(teacher, loader, accelerator, description=None)
    settings = RecoverySettings(enabled=True, epochs=2, batch_size=8, learning_rate=1e-3, alpha=0.5, temperature=2.0)
    info = recover(student, None, loader, accelerator, settings, cached_teacher=table)
    with torch.no_grad():
        logits = forward_logits(student, tiny_batch(labels=2))
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump({"processes": accelerator.num_processes, "teacher": table.tolist(), "logits": logits.tolist(), "before": before.tolist(), "steps": info["steps"]}, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
