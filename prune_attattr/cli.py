"""Command line: ``prune-attattr RECIPE.yaml [--set key.sub=value ...] [--force] [--no-cache]``, and
``prune-attattr bench exported/<run> [--threads N] [--sentences N] [--rounds N] [--eval] [--json FILE]``, which
re-times a finished run's ONNX graphs on this machine (:func:`prune_attattr.deploy.bench.bench_run`; it writes
nothing but the ``--json`` file).

A thin layer over :func:`prune_attattr.pipeline.run`: bad input ends with one line on stderr and
exit code 2; Ctrl-C ends with exit code 130 and SIGTERM (``kill``, ``timeout``, SLURM, Kubernetes)
with 143; none of them leaves a half-written export. Finished stages stay cached, so the same
command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, the shell's code for a process ended by SIGTERM


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune-attattr",
        description="Score attention heads with self-attention attribution (Hao et al. 2021) and the Michel et al. "
        "2019 baselines, prune them incrementally, report accuracy vs heads kept, export the pruned model.",
        epilog="prune-attattr bench RUN_DIR [--threads N] [--json FILE]: re-time a finished run's ONNX graphs on this "
        "machine (prune-attattr bench --help).",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. --set importance.examples=100 (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing <output_dir>/<run_name>")
    p.add_argument("--validate", action="store_true", help="only validate the recipe and print it")
    p.add_argument(
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="recompute the fine-tuning, importance scores and pruning steps even when cached (new results are still stored)",
    )
    return p


def _thread_list(text: str) -> list[int]:
    """``--threads 1,2`` -> ``[1, 2]`` (argparse type; a count below 1 or not a number is a usage error)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 2 or 1,2 (got '{text}')") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"thread counts must be at least 1 (got '{text}')")
    return counts


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune-attattr bench",
        description="Re-time a finished run's ONNX graphs (unpruned and pruned, float32 and int8) with ONNX Runtime "
        "on this machine, at batch 1 and 16 on the run's dev sentences; prints a table, writes nothing but --json.",
    )
    p.add_argument("run", help="a finished run folder, e.g. exported/sst2")
    p.add_argument(
        "--threads", type=_thread_list, default=None, metavar="N[,N...]",
        help="ONNX Runtime intra-op thread counts; each graph is reported at its fastest (default: 1 and the run's runtime.threads, "
        "else all cores, and batches split between that many one-thread sessions)",
    )
    p.add_argument("--split", type=int, default=None, metavar="N", help="with --threads: also time batches cut between N one-thread sessions run at once")
    p.add_argument("--sentences", type=int, default=256, help="dev sentences timed (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds; the median is reported (default 5)")
    p.add_argument(
        "--eval",
        action="store_true",
        help="also re-measure each graph's dev metric here (int8 results depend on the CPU's integer kernels)",
    )
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE", help="also write the figures to FILE as JSON")
    return p


def bench_main(argv: list[str]) -> int:
    """``prune-attattr bench RUN``: print the deployment table of :func:`prune_attattr.deploy.bench.bench_run`.

    The table is printed whole (never cut to the terminal's width) when stdout is not a terminal."""
    args = _bench_parser().parse_args(argv)
    for key in ("sentences", "rounds"):
        value = getattr(args, key)
        if value is not None and value < 1:
            print(f"prune-attattr bench: error: --{key} must be at least 1 (got {value})", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.split is not None and args.split < 2:
        print(f"prune-attattr bench: error: --split must be at least 2 sessions (got {args.split})", file=sys.stderr)
        return EXIT_BAD_INPUT
    _quiet_libraries()
    import json

    from rich.console import Console

    from .deploy.bench import bench_run
    from .errors import RunError
    from .models import ModelError
    from .report import deployment_table
    from .tasks import DataError

    try:
        result = bench_run(args.run, threads=args.threads, split=args.split, sentences=args.sentences, rounds=args.rounds, evaluate=args.eval)
    except (RunError, DataError, ModelError) as exc:
        print(f"prune-attattr bench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("prune-attattr bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    out = Console(width=None if sys.stdout.isatty() else 10_000)
    out.print(deployment_table(result))
    if args.json_file:
        try:
            with open(args.json_file, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        except OSError as exc:
            print(f"prune-attattr bench: error: cannot write --json {args.json_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0


def _raise_terminated(signum, frame):
    from .errors import Terminated

    raise Terminated(f"signal {signum}")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench" and not os.path.isfile("bench"):
        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    from .config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"prune-attattr: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.validate:
        import yaml

        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    _quiet_libraries()
    from .errors import RunError, Terminated
    from .models import ModelError
    from .pipeline import run
    from .tasks import DataError

    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)  # SIGTERM unwinds like Ctrl-C: cleanup runs
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        run(recipe, force=args.force, recipe_source=args.recipe, use_cache=args.use_cache)
    except (RunError, DataError, ModelError) as exc:
        print(f"prune-attattr: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated:
        print("prune-attattr: terminated (SIGTERM); no export was written; finished stages are cached", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("prune-attattr: interrupted; no export was written; finished stages are cached", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
