"""A tiny random BERT classifier saved with the embedded model's tokenizer, and recipes that run it
end to end in seconds (used by the pipeline tests and the two-process whole-pipeline test)."""

from pathlib import Path

import torch


def make_tiny_model_dir(path: Path, *, seed: int = 0, layers: int = 3, heads: int = 4, hidden: int = 32) -> Path:
    """Save a random 2-label BERT (``layers`` x ``heads`` heads) with the embedded MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from prune_attattr.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded"), local_files_only=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "0", 1: "1"},
        label2id={"0": 0, "1": 1},
        initializer_range=0.3,
    )
    path = Path(path)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_recipe(model_dir: Path, output_dir: Path, cache_dir: Path, *, run_name: str = "tiny", sections: str = "") -> str:
    """YAML of a small SST-2 run on ``model_dir`` (no fine-tuning), every method, curves and export (6 heads).

    ``sections``: YAML of whole top-level sections that replace the defaults (e.g. ``"export: {...}"``)."""
    import yaml

    recipe = {
        "run_name": run_name,
        "output_dir": str(output_dir),
        "seed": 3,
        "model": {"path": str(model_dir), "max_length": 32},
        "data": {"task": "sst2", "dev_limit": 40},
        "finetune": {"enabled": False, "cache_dir": str(cache_dir)},
        "importance": {
            "methods": ["attattr", "taylor", "accuracy_difference", "attention", "random"],
            "examples": 12,
            "source": "train_heldout",
            "batch_size": 4,
            "attattr": {"steps": 2, "mode": "fast", "quadrature": "gauss"},
        },
        "pruning": {"step_fraction": 0.25, "eval_batch_size": 8},
        # a random model is at chance, where export.max_drop refuses to choose (issue 17): an explicit count
        "export": {"method": "attattr", "heads": 6, "onnx": False},
        "runtime": {"cpu": True, "threads": 1},
    }
    recipe.update(yaml.safe_load(sections) or {})
    return yaml.safe_dump(recipe, sort_keys=False)
