"""Datasets: the GLUE tasks shipped with the package, user files, tokenisation, and the dataloader factory.

GLUE SST-2, MRPC, RTE (train + dev) and MNLI (a 21,409-pair subset of train, and dev_matched) live in
``prune_attattr/data/glue`` (see its PROVENANCE.md). Files are read as the GLUE processors read them: TSV with quoting disabled,
MRPC's header BOM stripped. :func:`make_dataloader` is the single place where examples become
batches, so tests swap data there.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the recipe type only; tasks.py stays below config in the layering
    from .config import Recipe

__all__ = [
    "TaskSpec",
    "GLUE_TASKS",
    "DataError",
    "Examples",
    "read_examples",
    "read_dataset",
    "examples_from_rows",
    "glue_path",
    "encode",
    "Encoded",
    "make_dataloader",
    "load_task_data",
    "label_names",
]


class DataError(ValueError):
    """A data file or column the tool cannot use (message names the file and what to do)."""


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task: file names, columns and labels (in classifier order)."""

    name: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    labels: tuple[str, ...]
    train_file: str | None
    dev_file: str
    metrics: tuple[str, ...] = ("accuracy",)
    # human-readable class names, same order as labels: GLUE's names (the ClassLabel names of the `datasets` glue
    # configs) where the files hold numbers; they become the exported model's id2label
    label_names: tuple[str, ...] | None = None

    def display_labels(self) -> list[str]:
        """Names to show for the classes: ``label_names`` when set, else the labels as in the file."""
        return list(self.label_names or self.labels)


GLUE_TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2", "sentence", None, "label", ("0", "1"), "SST-2/train.tsv", "SST-2/dev.tsv", label_names=("negative", "positive")
    ),
    "mrpc": TaskSpec(
        "mrpc",
        "#1 String",
        "#2 String",
        "Quality",
        ("0", "1"),
        "MRPC/train.tsv",
        "MRPC/dev.tsv",
        ("accuracy", "f1"),
        label_names=("not_equivalent", "equivalent"),
    ),
    "rte": TaskSpec(
        "rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "RTE/train.tsv", "RTE/dev.tsv"
    ),
    # GLUE's MnliProcessor label order. train.jsonl is a 21,409-pair subset of MNLI train (PROVENANCE.md).
    "mnli": TaskSpec(
        "mnli",
        "premise",
        "hypothesis",
        "label",
        ("contradiction", "entailment", "neutral"),
        "MNLI/train.jsonl",
        "MNLI/dev_matched.jsonl",
    ),
}


def label_names(task: str, labels: Sequence[str]) -> list[str]:
    """The classes' names in class-id order, for ``id2label``, reports and pictures.

    A GLUE task's readable names when ``labels`` are its file labels in its order (SST-2: ``0``, ``1`` ->
    ``negative``, ``positive``; MRPC: ``not_equivalent``, ``equivalent``; RTE and MNLI files already hold
    the names, MNLI in GLUE's MnliProcessor order ``contradiction``, ``entailment``, ``neutral``, which is
    the class order of every model fine-tuned here); otherwise ``labels`` themselves (a ``datasets``
    ClassLabel's names, a custom file's label strings, ``data.labels``).
    """
    spec = GLUE_TASKS.get(task)
    return spec.display_labels() if spec is not None and list(spec.labels) == list(labels) else [str(x) for x in labels]


def glue_path(relative: str) -> Path:
    """Absolute path of a file under the packaged ``data/glue`` folder."""
    return Path(str(resources.files("prune_attattr") / "data" / "glue" / relative))


@dataclass
class Examples:
    """Raw examples of one split: ``texts[i]``, optional ``pairs[i]``, ``labels[i]`` (class index)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int]
    source: str = ""
    rows: list[int] | None = None  # line/row number of each example in ``source`` (for error messages)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples(
            [self.texts[i] for i in indices],
            [self.pairs[i] for i in indices] if self.pairs is not None else None,
            [self.labels[i] for i in indices],
            self.source,
            [self.rows[i] for i in indices] if self.rows is not None else None,
        )

    def where(self, i: int) -> str:
        """``"<file> row N"`` (or ``"example i"``) of example ``i``, for error messages."""
        place = f"row {self.rows[i]}" if self.rows is not None else f"example {i}"
        return f"{self.source or 'data'} {place}"


def _rows(path: Path) -> list[tuple[int, dict]]:
    """``(row number, {column: value})`` per record; JSONL values keep their JSON type, TSV/CSV values are str."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
                    if not isinstance(record, dict):
                        raise DataError(f"{path}: line {n} is not a JSON object")
                    rows.append((n, record))
        return rows
    if suffix in (".tsv", ".csv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix == ".tsv":
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            return [(n, dict(r)) for n, r in enumerate(reader, 2)]
    raise DataError(f"{path}: unsupported file type '{suffix}'; use .tsv, .csv or .jsonl")


def read_examples(
    path: str | Path,
    *,
    text_column: str,
    label_column: str,
    labels: Sequence[str],
    text_pair_column: str | None = None,
) -> Examples:
    """Read a TSV/CSV/JSONL file into :class:`Examples`.

    Raises:
        DataError: missing file, missing column, a label outside ``labels``, or a label column whose
            values mix JSON types (e.g. ``1`` and ``"1"``: one of them is not what the file means).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist; check the path in the recipe")
    rows = _rows(path)
    if not rows:
        raise DataError(f"data file '{path}' has no rows")
    columns = set(rows[0][1])
    for key, col in (("text_column", text_column), ("label_column", label_column), ("text_pair_column", text_pair_column)):
        if col is not None and col not in columns:
            raise DataError(f"{path}: no column '{col}' (data.{key}); columns are {sorted(columns)}")
    first_type: dict[str, int] = {}
    for n, row in rows:
        first_type.setdefault(type(row.get(label_column)).__name__, n)
    if len(first_type) > 1:
        seen = ", ".join(f"{t} (first at line {n})" for t, n in first_type.items())
        raise DataError(
            f"{path}: column '{label_column}' mixes value types: {seen}; write every label the same way (e.g. all strings)"
        )
    index = {str(lab): i for i, lab in enumerate(labels)}
    texts, pairs, ys, numbers = [], [] if text_pair_column else None, [], []
    for n, row in rows:
        row = {k: "" if v is None else str(v) for k, v in row.items()}
        lab = str(row[label_column]).strip()
        if lab not in index:
            raise DataError(
                f"{path}: row {n} has label '{lab}' outside the declared labels {list(labels)}; "
                "fix the file or data.labels"
            )
        texts.append(row[text_column])
        if pairs is not None:
            pairs.append(row[text_pair_column])
        ys.append(index[lab])
        numbers.append(n)
    return Examples(texts, pairs, ys, str(path), numbers)


def read_dataset(
    path: str,
    *,
    split: str,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    config: str | None = None,
) -> tuple[dict[str, list], list[str] | None]:
    """One split of a ``datasets`` dataset as columns of strings, and its label names if it declares them.

    ``path`` is what ``datasets.load_dataset`` takes (a hub id, a local folder of data files, a
    builder such as ``json``), or a folder written by ``save_to_disk``. Hub access follows
    ``HF_HUB_OFFLINE``, ``HF_DATASETS_CACHE`` and ``HF_TOKEN``.

    Returns:
        ``({"text": [...], "pair": [...] or None, "label": [str, ...]}, names)`` where ``names`` are the
        ``ClassLabel`` names of ``label_column`` (class id = index), or None for plain values.

    Raises:
        DataError: the dataset, split or a column cannot be had (one line).
    """
    import datasets

    where = f"data.dataset '{path}'" + (f" ({config})" if config else "")
    local = Path(path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{where} has no split '{split}'; splits are {sorted(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except DataError:
        raise
    except Exception as exc:  # unknown split/config, no network and no cache, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}, split '{split}': {first}") from None
    columns = list(ds.column_names)
    for key, col in (("text_column", text_column), ("label_column", label_column), ("text_pair_column", text_pair_column)):
        if col is not None and col not in columns:
            raise DataError(f"{where}: no column '{col}' (data.{key}); columns are {columns}")
    feature = ds.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    raw = ds[label_column]
    if names is not None:
        bad = [v for v in raw if not 0 <= int(v) < len(names)]
        if bad:
            raise DataError(f"{where}, split '{split}': label {bad[0]} is not a class of {names} (an unlabelled test split?)")
        labels = [names[int(v)] for v in raw]
    else:
        labels = [str(v).strip() for v in raw]
    return {
        "text": [str(t) for t in ds[text_column]],
        "pair": [str(t) for t in ds[text_pair_column]] if text_pair_column else None,
        "label": labels,
    }, names


def examples_from_rows(rows: dict[str, list], labels: Sequence[str], source: str) -> Examples:
    """:class:`Examples` from :func:`read_dataset` columns, class id = position in ``labels``.

    Raises:
        DataError: a label outside ``labels``.
    """
    index = {str(lab): i for i, lab in enumerate(labels)}
    bad = [lab for lab in rows["label"] if lab not in index]
    if bad:
        raise DataError(f"{source}: label '{bad[0]}' is outside the labels {list(labels)}; fix data.labels")
    return Examples(list(rows["text"]), rows["pair"], [index[lab] for lab in rows["label"]], source)


@dataclass
class Encoded:
    """Tokenised examples: lists of token ids per example (no padding) and class labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.lengths:
            self.lengths = [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> Encoded:
        return Encoded(
            [self.input_ids[i] for i in indices],
            [self.token_type_ids[i] for i in indices] if self.token_type_ids is not None else None,
            [self.labels[i] for i in indices],
        )


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    """Tokenise ``examples`` with truncation to ``max_length`` tokens (special tokens included).

    Raises:
        DataError: an example whose text (or pair) tokenises to special tokens only (empty or
            whitespace text, characters the vocabulary drops): the model would classify nothing.
    """
    if examples.pairs is not None:
        enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
    special = set(tokenizer.all_special_ids)
    for i, ids in enumerate(enc["input_ids"]):
        if all(t in special for t in ids):
            raise DataError(
                f"{examples.where(i)}: text {examples.texts[i]!r} tokenizes to nothing (special tokens only); "
                "remove the row or fix its text"
            )
    tti = enc.get("token_type_ids")
    return Encoded(list(enc["input_ids"]), list(tti) if tti is not None else None, list(examples.labels))


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, data: Encoded):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = {"input_ids": self.data.input_ids[i], "labels": self.data.labels[i]}
        if self.data.token_type_ids is not None:
            item["token_type_ids"] = self.data.token_type_ids[i]
        return item


def _collate(pad_id: int):
    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        types = torch.zeros((len(items), width), dtype=torch.long) if "token_type_ids" in items[0] else None
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            mask[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(x["token_type_ids"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([x["labels"] for x in items])}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    return collate


class _BatchesByLength(torch.utils.data.Sampler):
    """Batches of similar length (little padding): sorted for evaluation, or shuffled in groups of
    ``group`` batches for training (the recipe behind ``LengthGroupedSampler``), reshuffled per epoch."""

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int, group: int = 50):
        self.lengths, self.batch_size, self.shuffle, self.seed, self.group = lengths, batch_size, shuffle, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        idx = list(range(len(self.lengths)))
        if not self.shuffle:
            idx.sort(key=lambda i: self.lengths[i])
            return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(idx)
        span = self.batch_size * self.group
        batches = []
        for s in range(0, len(idx), span):
            chunk = sorted(idx[s : s + span], key=lambda i: self.lengths[i])
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size if not self.shuffle else len(self._batches())


def make_dataloader(
    data: Encoded, *, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0
) -> torch.utils.data.DataLoader:
    """The one dataloader factory: length-grouped batches, dynamic padding.

    Batches hold ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B]`` and, for models with
    segment ids, ``token_type_ids [B, T]``; ``T`` is the longest example of the batch.
    """
    sampler = _BatchesByLength(data.lengths, batch_size, shuffle, seed)
    return torch.utils.data.DataLoader(_Dataset(data), batch_sampler=sampler, collate_fn=_collate(pad_id))


def _dataset_task(recipe: Recipe) -> tuple[Examples | None, Examples, list[str]]:
    """Train (when fine-tuning or scoring on held-out train) and dev splits of a ``datasets`` dataset.

    Labels: ``data.labels`` if given, else the label column's ``ClassLabel`` names, else the sorted
    distinct values of both splits (numerically when all are integers).
    """
    d = recipe.data
    kw = dict(text_column=d.text_column, label_column=d.label_column, text_pair_column=d.text_pair_column, config=d.dataset_config)
    need_train = recipe.finetune.enabled or recipe.importance.source == "train_heldout"
    dev_rows, names = read_dataset(d.dataset, split=d.dev_split, **kw)
    train_rows = read_dataset(d.dataset, split=d.train_split, **kw)[0] if need_train else None
    labels = list(d.labels) if d.labels else names
    if labels is None:
        seen = set(dev_rows["label"]) | set(train_rows["label"] if train_rows else [])
        numeric = all(v.lstrip("-").isdigit() for v in seen)
        labels = sorted(seen, key=int) if numeric else sorted(seen)
    train = examples_from_rows(train_rows, labels, f"{d.dataset}:{d.train_split}") if train_rows else None
    dev = examples_from_rows(dev_rows, labels, f"{d.dataset}:{d.dev_split}")
    return train, dev, labels


def load_task_data(recipe: Recipe) -> tuple[Examples | None, Examples, list[str], list[str]]:
    """``(train or None, dev, labels, metric names)`` for the recipe's task (``recipe.data``).

    Raises:
        DataError: missing file, column or undeclared label; a dev split (after ``data.dev_limit``)
            with fewer than two classes, on which accuracy and F1 say nothing about the model.
    """
    d = recipe.data
    if d.task == "custom":
        kw = dict(text_column=d.text_column, text_pair_column=d.text_pair_column, label_column=d.label_column, labels=d.labels)
        train = read_examples(d.train_file, **kw) if d.train_file else None
        dev = read_examples(d.dev_file, **kw)
        labels, metrics = list(d.labels), list(d.metrics or ["accuracy"])
    elif d.task == "dataset":
        train, dev, labels = _dataset_task(recipe)
        metrics = list(d.metrics or ["accuracy"])
    else:
        spec = GLUE_TASKS[d.task]
        kw = dict(text_column=spec.text_column, text_pair_column=spec.text_pair_column, label_column=spec.label_column, labels=spec.labels)
        train = read_examples(glue_path(spec.train_file), **kw) if spec.train_file else None
        dev = read_examples(glue_path(spec.dev_file), **kw)
        labels, metrics = list(spec.labels), list(d.metrics or spec.metrics)
    if d.dev_limit:
        dev = dev.subset(range(min(d.dev_limit, len(dev))))
    present = sorted(set(dev.labels))
    if len(present) < 2:
        raise DataError(
            f"{dev.source}: the dev split{' (first ' + str(d.dev_limit) + ' rows, data.dev_limit)' if d.dev_limit else ''} "
            f"has only class '{labels[present[0]]}'; evaluation needs at least two classes: use more rows or another file"
        )
    return train, dev, labels, metrics
