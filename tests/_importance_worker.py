"""Worker for test_multiprocess.py: head and neuron importance and evaluation on a tiny model, written as JSON.

Run as ``python _importance_worker.py OUT.json`` (one process) or under
``accelerate launch --multi_gpu --num_processes 2 _importance_worker.py OUT.json`` (two CPU processes, gloo).
"""

import json
import sys

import torch
from accelerate import Accelerator
from conftest import tiny_batch, tiny_model

from prune_attattr import importance as imp
from prune_attattr.evaluation import evaluate_model
from prune_attattr.tasks import Encoded, make_dataloader


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    parts = [tiny_batch(seed=s, batch=4, seq=9 + s) for s in range(4)]
    ids, types, labels = [], [], []
    for b in parts:
        for row, tt, m, y in zip(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["labels"]):
            ids.append(row[m.bool()].tolist())
            types.append(tt[m.bool()].tolist())
            labels.append(int(y))
    data = Encoded(ids[:15], types[:15], labels[:15])  # 15 examples: shards are uneven
    loader = accelerator.prepare(make_dataloader(data, batch_size=2, pad_id=0))
    scores = {
        "attattr": imp.attattr_importance(model, loader, accelerator, steps=3, description=None),
        "taylor": imp.taylor_importance(model, loader, accelerator, description=None),
        "attention": imp.attention_importance(model, loader, accelerator, description=None),
        "accuracy_difference": imp.accuracy_difference_importance(model, loader, accelerator, description=None),
        "attattr_neurons": imp.attattr_neuron_importance(model, loader, accelerator, steps=3, description=None),
    }
    scores["fisher"], scores["fisher_neurons"] = imp.unit_importance("fisher", model, loader, accelerator)
    scores["taylor_neurons"] = imp.unit_importance("taylor", model, loader, accelerator, units="neurons")[1]
    metrics = evaluate_model(model, loader, accelerator, ["accuracy"])
    if accelerator.is_main_process:
        result = {k: v.tolist() for k, v in scores.items()}
        result["metrics"] = metrics
        result["processes"] = accelerator.num_processes
        with open(out, "w") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
