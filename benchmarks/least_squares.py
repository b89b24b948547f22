"""Least-squares mask tuning on the embedded MiniLM fine-tuned on SST-2: dev accuracy before/after, seconds.

Heads and feed-forward neurons are masked at a FLOPs budget (:func:`prune_attattr.prune.search.search_units`,
one budget for both) by random scores, by Fisher scores computed here (Kwon et al. 2022: sum over
examples of the squared gradient of the loss with respect to each unit's mask; 256 training sentences),
or by scores from a JSON file ``{"heads": [[...]], "neurons": [[...]]}``; then
:func:`prune_attattr.recover.rescale.least_squares` tunes the kept units' scales on a few thousand training
tokens. Costs per token (multiply-adds, issue 15): a head ``4 d d_h + 2 T d_h``, a neuron ``2 d``, at
the mean SST-2 dev length ``T``; embeddings and classifier are left out.

The fine-tuned model is the pipeline's cached fine-tune (``~/.cache/prune-attattr/finetuned/<key>/`` with
``COMPLETE.json``; the newest complete two-label entry) unless ``--model`` names one.

Measured (fine-tuned MiniLM, unpruned 88.65%; 4,115 calibration tokens; damping 1e-3; 1 thread; least
squares 4.1-4.5 s, 14 s for 16k tokens), dev accuracy masked -> after least squares:

    scores  balance budget heads neurons   no bias        bias
    fisher  none    0.50    50    3682   85.21 -> 84.86
    fisher  none    0.35    33    2710   81.31 -> 81.54
    fisher  cost    0.50    55    3352   84.06 -> 83.60   84.06
    fisher  cost    0.35    39    2313   79.47 -> 81.88   77.87
    random  cost    0.50    36    4608   73.17 -> 70.30   60.32
    random  cost    0.35    26    3172   62.16 -> 58.26   50.92

Run (2-core CPU, about a minute per configuration):
    PYTHONPATH=$PWD python benchmarks/least_squares.py [--model DIR] [--budgets 0.5 0.35] [--scores random fisher]
        [--tokens 4096] [--damping 1e-3] [--bias both] [--balance cost]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from prune_attattr.attention import AttentionControl
from prune_attattr.cache import cache_root, entry_complete
from prune_attattr.loading import load_classifier
from prune_attattr.models import encoder_layers, forward_logits, head_dim, intermediate_size, self_attention
from prune_attattr.recover.rescale import least_squares, masks_from_pruned
from prune_attattr.prune.search import search_units
from prune_attattr.tasks import GLUE_TASKS, encode, glue_path, make_dataloader, read_examples


def find_finetuned() -> Path:
    root = cache_root() / "finetuned"
    found = []
    for d in root.glob("*") if root.is_dir() else []:
        if entry_complete(d, required=("finetune.json", "config.json")):
            labels = json.loads((d / "config.json").read_text()).get("id2label", {})
            if len(labels) == 2:
                found.append(d)
    if not found:
        raise SystemExit(f"no complete fine-tuned SST-2 model under {root}; run the recipe first or pass --model")
    return max(found, key=lambda d: (d / "COMPLETE.json").stat().st_mtime)


def load_split(tokenizer, split: str):
    spec = GLUE_TASKS["sst2"]
    ex = read_examples(glue_path(spec.train_file if split == "train" else spec.dev_file), text_column=spec.text_column,
                       label_column=spec.label_column, labels=spec.labels)
    return encode(tokenizer, ex, 64)


@torch.no_grad()
def accuracy(model, loader, control=None) -> float:
    right = total = 0
    for batch in loader:
        pred = forward_logits(model, batch, control).argmax(-1)
        right += int((pred == batch["labels"]).sum())
        total += len(pred)
    return right / total


def fisher(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Kwon et al.'s Fisher importance: ``sum_examples (d loss / d mask)^2`` per head ``[L, H]`` and neuron ``[L, I]``
    (per-example masks ``[B, units]``, so one backward gives every example's gradient)."""
    layers = len(encoder_layers(model))
    heads, neurons = model.config.num_attention_heads, intermediate_size(model)
    hs, ns = torch.zeros(layers, heads), torch.zeros(layers, neurons)
    for batch in loader:
        b = batch["input_ids"].shape[0]
        hm = {i: torch.ones(b, heads, requires_grad=True) for i in range(layers)}
        nm = {i: torch.ones(b, neurons, requires_grad=True) for i in range(layers)}
        logits = forward_logits(model, batch, AttentionControl(head_mask=hm, neuron_mask=nm))
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        grads = torch.autograd.grad(loss, [*hm.values(), *nm.values()])
        for i in range(layers):
            hs[i] += grads[i].pow(2).sum(0)
            ns[i] += grads[layers + i].pow(2).sum(0)
    return hs, ns


def calibration(train, tokens: int, pad_id: int, seed: int, exclude: set[int]) -> list[dict]:
    order = [i for i in random.Random(seed).sample(range(len(train)), len(train)) if i not in exclude]
    chosen, count = [], 0
    for i in order:
        if count >= tokens:
            break
        chosen.append(i)
        count += train.lengths[i]
    return list(make_dataloader(train.subset(chosen), batch_size=32, pad_id=pad_id))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--scores", nargs="+", default=["random", "fisher"], help="random, fisher or a JSON file")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--bias", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--balance", choices=["cost", "none"], default="cost")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = args.model or find_finetuned()
    model = load_classifier(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id or 0
    train, dev = load_split(tokenizer, "train"), load_split(tokenizer, "dev")
    dev_loader = list(make_dataloader(dev, batch_size=64, pad_id=pad))
    t_mean = sum(dev.lengths) / len(dev)
    layers, d = len(encoder_layers(model)), model.config.hidden_size
    d_h = head_dim(self_attention(model, 0))
    head_cost, neuron_cost = [4 * d * d_h + 2 * t_mean * d_h] * layers, [2 * d] * layers
    heads, neurons = model.config.num_attention_heads, intermediate_size(model)
    share = heads * head_cost[0] / (heads * head_cost[0] + neurons * neuron_cost[0])
    t = time.perf_counter()
    base = accuracy(model, dev_loader)
    print(f"model {path}\nunpruned dev accuracy {100 * base:.2f}% ({time.perf_counter() - t:.0f} s); mean dev length {t_mean:.1f}; "
          f"heads {100 * share:.0f}% of a layer's multiply-adds")
    rng = random.Random(args.seed)
    score_ids = rng.sample(range(len(train)), 256)
    rows = []
    for source in args.scores:
        t = time.perf_counter()
        if source == "random":
            g = torch.Generator().manual_seed(args.seed)
            hs, ns = torch.rand(layers, heads, generator=g), torch.rand(layers, neurons, generator=g)
        elif source == "fisher":
            hs, ns = fisher(model, make_dataloader(train.subset(score_ids), batch_size=32, pad_id=pad))
        else:
            data = json.loads(Path(source).read_text())
            hs, ns = torch.tensor(data["heads"]), torch.tensor(data["neurons"])
        score_s = time.perf_counter() - t
        for budget in args.budgets:
            choice = search_units(hs, ns, head_cost, neuron_cost, 0.0, budget, balance=args.balance)
            hm, nm = masks_from_pruned(model, choice.pruned_heads, choice.pruned_neurons)
            before = accuracy(model, dev_loader, AttentionControl(head_mask=hm, neuron_mask=nm))
            for tokens in args.tokens:
                batches = calibration(train, tokens, pad, args.seed, set(score_ids))
                for bias in {"no": [False], "yes": [True], "both": [False, True]}[args.bias]:
                    student = copy.deepcopy(model)
                    res = least_squares(student, batches, head_mask=hm, neuron_mask=nm, teacher=model, damping=args.damping, bias=bias)
                    after = accuracy(student, dev_loader)
                    row = dict(scores=source, budget=budget, fraction=round(choice.fraction, 4), heads=choice.heads_kept,
                               neurons=choice.neurons_kept, tokens=res.tokens, bias=bias, before=round(100 * before, 2),
                               after=round(100 * after, 2), seconds=round(res.seconds, 1), skipped=len(res.skipped),
                               score_seconds=round(score_s, 1))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\nunpruned {100 * base:.2f}%  (damping {args.damping}, balance {args.balance})")
    print(f"{'scores':>8} {'budget':>6} {'heads':>5} {'neurons':>7} {'tokens':>6} {'bias':>5} {'before':>7} {'after':>7} {'s':>5}")
    for r in rows:
        print(f"{r['scores']:>8} {r['budget']:>6} {r['heads']:>5} {r['neurons']:>7} {r['tokens']:>6} {str(r['bias']):>5} "
              f"{r['before']:>7.2f} {r['after']:>7.2f} {r['seconds']:>5.1f}")


if __name__ == "__main__":
    main()
