"""AttAttr speed and fidelity: the paper's procedure against the fast path, same model, same examples.

    python benchmarks/attattr_speed.py                       # embedded MiniLM fine-tuned by recipes/sst2.yaml, 200 examples
    python benchmarks/attattr_speed.py --model bert-base --examples 8   # random 12x12, hidden 768
    python benchmarks/attattr_speed.py --fast-quadrature gauss --fast-steps 4 --json out.json
    python benchmarks/attattr_speed.py --unsorted                      # API on unsorted input vs the plain procedure
    python benchmarks/attattr_speed.py --unsorted --model bert-base
    python benchmarks/attattr_speed.py --unsorted --count-flops --examples 8   # also the FLOPs each path does

``--unsorted``: a plain implementation of the paper's procedure (one example at a time, unpadded,
left Riemann m = 20, target = predicted class; written here, not with the package's attribution code)
against ``attention_attribution(model, batch)`` with its defaults on the first ``--examples`` (32)
SST-2 dev sentences in file order, padded batches of ``--batch-size`` (16), then on the same
sentences sorted by length. Prints both times, the speed-ups and the largest difference between
the matrices. The embedded model's classifier head is random (seed 0; timing does not depend on
it) unless ``--model-dir`` names a fine-tuned directory.

Prints: wall time of each path and their ratio; Spearman correlation of the two head rankings; max
per-head relative difference; the integrated-gradients completeness gap of each path (|Σ Attr -
(F(A) - F(0))| relative to |F(A) - F(0)|, per example and layer); and, for the fine-tuned model, the
largest difference between the two pruning curves in accuracy points. Uses the fine-tuning cache of
the recipe (the first call fine-tunes, about 13 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "sst2.yaml"))
    p.add_argument("--model", choices=["recipe", "bert-base"], default="recipe")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=None, help="fast path examples per batch (default: recipe)")
    p.add_argument("--fast-quadrature", default=None, help="default: the recipe's")
    p.add_argument("--fast-steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--chunk-size", type=int, default=None, help="deprecated row cap per forward")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per forward (default: the recipe's importance.max_tokens_per_forward)")
    p.add_argument("--ref-steps", type=int, default=20)
    p.add_argument("--also", nargs="*", default=[], metavar="QUADRATURE:STEPS", help="extra fast variants to time and compare, e.g. left:20 gauss:3")
    p.add_argument("--no-curves", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--unsorted", action="store_true", help="plain procedure vs the API on unsorted, padded batches")
    p.add_argument("--model-dir", default=None, help="--unsorted: a local (fine-tuned) model directory instead of the embedded one")
    p.add_argument("--repeat", type=int, default=1, help="--unsorted: time each path this many times, keep the fastest")
    p.add_argument("--count-flops", action="store_true", help="--unsorted: also count each path's matrix-product FLOPs (forward and backward; one more untimed run of each)")
    return p.parse_args()


def _plain_attattr(model, one, steps=20):
    """The paper's procedure for one unpadded example ``[1, n]``: per layer, ``steps`` scaled copies of the
    layer's attention (alpha = i/m) in one forward of the whole model, one backward, left Riemann sum.

    Returns ``[layers, heads, n, n]`` for the predicted class. Uses only the model and the attention
    hook (AttentionControl.replace), none of the package's attribution code.
    """
    from prune_attattr import AttentionControl
    from prune_attattr.models import forward_logits

    with torch.no_grad():
        ctrl = AttentionControl(record=True)
        target = forward_logits(model, one, ctrl).argmax(-1)
    copies = {k: v.expand(steps, -1) for k, v in one.items()}
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    out = []
    for layer in sorted(ctrl.recorded):
        a = ctrl.recorded[layer].detach()
        scaled = (alphas.view(steps, 1, 1, 1) * a).requires_grad_(True)
        probs = forward_logits(model, copies, AttentionControl(replace={layer: scaled})).softmax(-1)
        (grad,) = torch.autograd.grad(probs[:, target[0]].sum(), scaled)
        out.append(a[0] * grad.sum(0) / steps)
    return torch.stack(out)


def _flop_counter():
    """A dispatch mode that adds up the FLOPs of matrix products (mm, addmm, bmm, baddbmm: 2 per
    multiply-add) and of fused attention (QK^T and PV; twice that for its backward) that run inside it.

    Not ``torch.utils.flop_counter.FlopCounterMode``: its module tracker fails on the plain procedure's
    ``autograd.grad`` to a leaf tensor ("A leaf node was passed to _will_engine_execute_node", torch 2.13)."""
    import math

    from torch.utils._python_dispatch import TorchDispatchMode

    class FlopCount(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("mm", "bmm"):
                self.total += 2 * math.prod(args[0].shape) * args[1].shape[-1]
            elif name in ("addmm", "baddbmm"):
                self.total += 2 * math.prod(args[1].shape) * args[2].shape[-1]
            elif "scaled_dot_product" in name:
                q, k = args[0], args[1]
                self.total += 4 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1] * (2 if "backward" in name else 1)
            return out

    return FlopCount()


def _unsorted(args, console) -> int:
    from transformers import AutoTokenizer

    from prune_attattr import attention_attribution, load_classifier, load_recipe
    from prune_attattr.attention import register_attention
    from prune_attattr.models import frozen, resolve_model_path
    from prune_attattr.tasks import glue_path, read_examples

    examples = args.examples if args.examples != 200 else 32
    bsz = args.batch_size or 16
    max_length = load_recipe(args.recipe).model.max_length
    embedded = resolve_model_path("embedded")
    tokenizer = AutoTokenizer.from_pretrained(embedded, local_files_only=True)
    torch.manual_seed(0)
    if args.model == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(num_labels=2)  # 12 layers x 12 heads, hidden 768, vocabulary of bert-base-uncased
        cfg._attn_implementation = register_attention()
        model = BertForSequenceClassification(cfg).eval()
        label = "random bert-base-sized model (12x12, hidden 768)"
    elif args.model_dir:
        model = load_classifier(args.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
        label = f"model {args.model_dir}"
    else:
        model = load_classifier(embedded, num_labels=2)
        label = "embedded MiniLM-L6 (6x12, hidden 384), classifier head random (seed 0)"
    dev = read_examples(glue_path("SST-2/dev.tsv"), text_column="sentence", label_column="label", labels=["0", "1"])
    texts = dev.texts[:examples]
    singles = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length)) for t in texts]
    lengths = [int(x["input_ids"].shape[1]) for x in singles]

    def batches(order):
        chosen = [texts[i] for i in order]
        return [dict(tokenizer(chosen[i : i + bsz], return_tensors="pt", padding=True, truncation=True, max_length=max_length))
                for i in range(0, len(chosen), bsz)]

    file_order = list(range(len(texts)))
    by_length = sorted(file_order, key=lambda i: lengths[i])
    unsorted_batches, sorted_batches = batches(file_order), batches(by_length)
    pad_file = sum(b["input_ids"].numel() for b in unsorted_batches) / sum(lengths)
    pad_sorted = sum(b["input_ids"].numel() for b in sorted_batches) / sum(lengths)
    console.print(
        f"[bold]{label}[/]; {len(texts)} SST-2 dev sentences in file order ({sum(lengths)} tokens, "
        f"{min(lengths)}..{max(lengths)} per sentence), padded batches of {bsz}; torch threads {torch.get_num_threads()}"
    )

    def timed(fn):
        best, result = float("inf"), None
        for _ in range(max(1, args.repeat)):
            t = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - t)
        return best, result

    def plain():
        with frozen(model):  # a plain implementation would not freeze; gradients reach only `scaled` either way
            return [_plain_attattr(model, one) for one in singles]

    def api(batch_list):
        kwargs = {"max_tokens_per_forward": args.max_tokens} if args.max_tokens else {}  # default: the API's own
        return [attention_attribution(model, b, **kwargs) for b in batch_list]

    t_plain, ref = timed(plain)
    t_unsorted, got_unsorted = timed(lambda: api(unsorted_batches))
    t_sorted, got_sorted = timed(lambda: api(sorted_batches))

    def max_diff(got, order):
        worst = 0.0
        for pos, i in enumerate(order):
            b, row = divmod(pos, bsz)
            n = lengths[i]
            worst = max(worst, float((got[b][row][..., :n, :n] - ref[i]).abs().max()))
        return worst

    flops = None
    if args.count_flops:
        flops = {}
        for name, fn in (("plain", plain), ("api_unsorted", lambda: api(unsorted_batches)), ("api_sorted", lambda: api(sorted_batches))):
            with _flop_counter() as counter:
                fn()
            flops[name] = counter.total

    scale = max(float(r.abs().max()) for r in ref)
    figures = {
        "model": label,
        "examples": len(texts),
        "batch_size": bsz,
        "threads": torch.get_num_threads(),
        "tokens": sum(lengths),
        "padded_tokens_per_token": {"file_order": pad_file, "sorted": pad_sorted},
        "plain_seconds": t_plain,
        "api_unsorted_seconds": t_unsorted,
        "api_sorted_seconds": t_sorted,
        "speedup_unsorted": t_plain / t_unsorted,
        "speedup_sorted": t_plain / t_sorted,
        "max_abs_diff_unsorted": max_diff(got_unsorted, file_order),
        "max_abs_diff_sorted": max_diff(got_sorted, by_length),
        "max_abs_attribution": scale,
        "gflop": None if flops is None else {k: v / 1e9 for k, v in flops.items()},
    }
    from rich.table import Table

    table = Table(title="AttAttr: plain procedure (paper, one example at a time) vs attention_attribution(model, batch)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("plain procedure (left Riemann m=20, unpadded, one example at a time) s", f"{t_plain:.2f}", "")
    table.add_row(f"API, file order, padded batches of {bsz} (padded/real tokens {pad_file:.2f}) s", f"{t_unsorted:.2f}", "")
    table.add_row(f"API, sorted by length (padded/real tokens {pad_sorted:.2f}) s", f"{t_sorted:.2f}", "")
    table.add_row("speed-up, unsorted input", f"{t_plain / t_unsorted:.2f}x", ">= 2x")
    table.add_row("speed-up, sorted input", f"{t_plain / t_sorted:.2f}x", "")
    table.add_row("max |plain - API| (unsorted / sorted)", f"{figures['max_abs_diff_unsorted']:.1e} / {figures['max_abs_diff_sorted']:.1e}", "~1e-6")
    table.add_row("max |attribution|", f"{scale:.3g}", "")
    if flops is not None:
        g = {k: v / 1e9 for k, v in flops.items()}
        table.add_row("GFLOP plain / API unsorted / API sorted", f"{g['plain']:.0f} / {g['api_unsorted']:.0f} / {g['api_sorted']:.0f}", "")
        table.add_row("FLOP ratio plain / API (unsorted / sorted)", f"{g['plain'] / g['api_unsorted']:.2f}x / {g['plain'] / g['api_sorted']:.2f}x", "")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _completeness(model, loader, mode, steps, quadrature, chunk, max_tokens=None, max_batches=2):
    """Mean over (example, layer) of |Σ Attr - (F(A) - F(0))| / mean |F(A) - F(0)|."""
    from prune_attattr import AttentionControl, attention_attribution
    from prune_attattr.models import forward_logits

    gaps, deltas = [], []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        attr = attention_attribution(model, batch, steps=steps, mode=mode, quadrature=quadrature, chunk_size=chunk, max_tokens_per_forward=max_tokens, target="gold")
        with torch.no_grad():
            ctrl = AttentionControl(record=True)
            p = forward_logits(model, batch, ctrl).softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
            for layer in range(attr.shape[1]):
                zero = torch.zeros_like(ctrl.recorded[layer])
                p0 = forward_logits(model, batch, AttentionControl(replace={layer: zero})).softmax(-1)
                p0 = p0.gather(1, batch["labels"][:, None]).squeeze(1)
                gaps.append((attr[:, layer].sum((1, 2, 3)) - (p - p0)).abs())
                deltas.append((p - p0).abs())
    return float(torch.cat(gaps).mean() / torch.cat(deltas).mean())


def main() -> int:
    args = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from rich.console import Console
    from rich.table import Table
    from scipy.stats import spearmanr

    from prune_attattr import load_recipe, pruning_curve
    from prune_attattr.evaluation import evaluate_model
    from prune_attattr.importance import attattr_importance
    from prune_attattr.stages.prepare import prepare
    from prune_attattr.tasks import make_dataloader

    console = Console()
    if args.unsorted:
        return _unsorted(args, console)
    accelerator = Accelerator(cpu=True)
    recipe = load_recipe(args.recipe, [f"importance.examples={args.examples}"])
    a = recipe.importance.attattr
    fast_q = args.fast_quadrature or a.quadrature
    fast_m = args.fast_steps or a.steps
    chunk = args.chunk_size or a.chunk_size  # deprecated row cap; None: token bound only
    max_tokens = args.max_tokens or recipe.importance.max_tokens_per_forward
    bsz = args.batch_size or recipe.importance.batch_size
    prep = prepare(recipe, accelerator, quiet=True)
    model, imp_enc = prep.model, prep.imp_enc
    label = "embedded MiniLM-L6 (6x12, hidden 384), fine-tuned on SST-2"
    if args.model == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification

        from prune_attattr.attention import register_attention

        torch.manual_seed(0)
        cfg = BertConfig(num_labels=2)  # 12 layers x 12 heads, hidden 768
        cfg._attn_implementation = register_attention()
        model = BertForSequenceClassification(cfg).eval()
        label = "random bert-base-sized model (12x12, hidden 768)"
        args.no_curves = True
    loader = make_dataloader(imp_enc, batch_size=bsz, pad_id=prep.ctx.pad_id)
    tokens = sum(imp_enc.lengths)
    console.print(f"[bold]{label}[/]; {len(imp_enc)} SST-2 examples ({tokens} tokens); torch threads {torch.get_num_threads()}")

    t = time.perf_counter()
    ref = attattr_importance(model, loader, accelerator, steps=args.ref_steps, mode="reference", quadrature="left", target="gold", description="reference (paper)")
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    fast = attattr_importance(model, loader, accelerator, steps=fast_m, mode="fast", quadrature=fast_q, chunk_size=chunk, max_tokens_per_forward=max_tokens, target="gold", description="fast")
    t_fast = time.perf_counter() - t

    variants = []
    for spec in args.also:
        q, m = spec.split(":")
        t = time.perf_counter()
        other = attattr_importance(model, loader, accelerator, steps=int(m), mode="fast", quadrature=q, chunk_size=chunk, max_tokens_per_forward=max_tokens, target="gold", description=f"fast {spec}")
        secs = time.perf_counter() - t
        variants.append({
            "quadrature": q, "steps": int(m), "seconds": secs, "speedup": t_ref / secs,
            "spearman": float(spearmanr(ref.flatten().numpy(), other.flatten().numpy()).statistic),
            "max_diff_rel_to_max_score": ((other - ref).abs().max() / ref.abs().max()).item(),
        })

    rho = float(spearmanr(ref.flatten().numpy(), fast.flatten().numpy()).statistic)
    rel = ((fast - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
    rel_to_max = ((fast - ref).abs().max() / ref.abs().max()).item()
    small = make_dataloader(imp_enc.subset(range(min(16, len(imp_enc)))), batch_size=8, pad_id=prep.ctx.pad_id)
    comp_ref = _completeness(model, small, "reference", args.ref_steps, "left", chunk, max_tokens)
    comp_fast = _completeness(model, small, "fast", fast_m, fast_q, chunk, max_tokens)

    curve_diff = None
    curves = {}
    if not args.no_curves:
        evaluate = lambda m: evaluate_model(m, prep.dev_loader, accelerator, prep.ctx.metrics)  # noqa: E731
        for name, scores in (("reference", ref), ("fast", fast)):
            curves[name] = [s.metrics["accuracy"] for s in pruning_curve(model, scores, evaluate, step_fraction=recipe.pruning.step_fraction)]
        curve_diff = max(abs(x - y) for x, y in zip(curves["reference"], curves["fast"])) * 100

    figures = {
        "model": label,
        "examples": len(imp_enc),
        "threads": torch.get_num_threads(),
        "reference": {"mode": "reference", "quadrature": "left", "steps": args.ref_steps, "seconds": t_ref},
        "fast": {"mode": "fast", "quadrature": fast_q, "steps": fast_m, "batch_size": bsz, "chunk_size": chunk, "max_tokens_per_forward": max_tokens, "seconds": t_fast},
        "speedup": t_ref / t_fast,
        "spearman": rho,
        "max_rel_diff_per_head": rel,
        "max_diff_rel_to_max_score": rel_to_max,
        "completeness_gap_reference": comp_ref,
        "completeness_gap_fast": comp_fast,
        "curve_max_diff_points": curve_diff,
        "curves": curves,
        "variants": variants,
    }
    table = Table(title="AttAttr: paper procedure vs fast path")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(f"reference (left Riemann, m={args.ref_steps}, one example at a time) s", f"{t_ref:.1f}", "")
    table.add_row(f"fast ({fast_q}, m={fast_m}, batch {bsz}) s", f"{t_fast:.1f}", "")
    table.add_row("speed-up", f"{t_ref / t_fast:.1f}x", ">= 10x")
    table.add_row("per example: reference / fast ms", f"{1000 * t_ref / len(imp_enc):.0f} / {1000 * t_fast / len(imp_enc):.0f}", "")
    table.add_row("Spearman of head rankings", f"{rho:.4f}", ">= 0.99")
    table.add_row("max per-head relative difference", f"{rel:.4f}", "")
    table.add_row("max head difference / max head score", f"{rel_to_max:.4f}", "")
    table.add_row("completeness gap, reference", f"{comp_ref:.4f}", "")
    table.add_row("completeness gap, fast", f"{comp_fast:.4f}", "")
    table.add_row("pruning curves, max difference (points)", "n/a" if curve_diff is None else f"{curve_diff:.2f}", "<= 0.5")
    console.print(table)
    if variants:
        vt = Table(title="other fast variants (same examples)")
        for c in ("quadrature", "steps", "seconds", "speed-up", "Spearman", "max diff / max score"):
            vt.add_column(c, justify="right")
        for v in variants:
            vt.add_row(v["quadrature"], str(v["steps"]), f"{v['seconds']:.1f}", f"{v['speedup']:.1f}x", f"{v['spearman']:.4f}", f"{v['max_diff_rel_to_max_score']:.4f}")
        console.print(vt)
    if curves:
        console.print("accuracy per step (reference):", " ".join(f"{100 * x:.1f}" for x in curves["reference"]))
        console.print("accuracy per step (fast):     ", " ".join(f"{100 * x:.1f}" for x in curves["fast"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
