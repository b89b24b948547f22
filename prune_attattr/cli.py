"""Command line: ``prune-attattr RECIPE.yaml [--set key.sub=value ...] [--force] [--no-cache]``.

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
