"""Worker for test_rescale.py: least squares on a half-masked tiny model, results written as JSON.

Run as ``python _least_squares_worker.py OUT.json`` (one process) or under
``accelerate launch --multi_gpu --num_processes 2 _least_squares_worker.py OUT.json`` (two CPU processes,
gloo); each process fits its strided share of the same 12 batches, the statistics are summed across them.
"""

import json
import sys

import torch
from accelerate import Accelerator
from conftest import tiny_batch, tiny_model

from prune_attattr.models import forward_logits, kept_heads, kept_neurons
from prune_attattr.recover.rescale import least_squares
from prune_attattr.sharding import my_share


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    model = tiny_model("bert", init=0.1)
    g = torch.Generator().manual_seed(0)
    hm = {i: (torch.rand(len(h), generator=g) > 0.5).float() for i, h in enumerate(kept_heads(model))}
    nm = {i: (torch.rand(len(n), generator=g) > 0.5).float() for i, n in enumerate(kept_neurons(model))}
    batches = [tiny_batch(seed=s, batch=8) for s in range(12)]
    mine = [batches[i] for i in my_share(len(batches), accelerator)]
    res = least_squares(model, mine, head_mask=hm, neuron_mask=nm, bias=True, accelerator=accelerator)
    with torch.no_grad():
        logits = forward_logits(model, tiny_batch(seed=99))
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump({
                "processes": accelerator.num_processes,
                "tokens": res.tokens,
                "heads": torch.cat([res.head_scales[i] for i in sorted(res.head_scales)]).tolist(),
                "neurons": torch.cat([res.neuron_scales[i] for i in sorted(res.neuron_scales)]).tolist(),
                "logits": logits.tolist(),
            }, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
