"""On-disk caches of long stages, keyed on content, written atomically.

Two kinds of entries live under :func:`cache_root`:

- ``finetuned/<key>/``: a fine-tuned model (see :mod:`prune_attattr.recover.finetune`). Written to a temporary
  folder, completed with a :data:`COMPLETE` marker that lists every file and its size, then renamed
  into place; :func:`entry_complete` checks the marker before an entry is reused.
- ``stages/<key>.json``: a stage result (one method's head importance, one evaluated pruning step).
  Written to a temporary file and renamed, so a killed process leaves either the whole entry or none.
  A result with tensors (a recovered model's weights, the teacher's logits) has them in
  ``stages/<key>.safetensors``, written the same way *before* the JSON, whose record of the file's
  size is checked before the tensors are reused.

Keys are SHA-256 digests of everything that determines a result: the model's bytes
(:func:`model_fingerprint`, or :func:`tensors_digest` of weights in memory), the tokenised examples
(:func:`encoded_digest`), the settings and the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "COMPLETE",
    "cache_root",
    "file_digest",
    "model_fingerprint",
    "encoded_digest",
    "digest",
    "tensors_digest",
    "write_complete_marker",
    "entry_complete",
    "StageCache",
]

#: Marker file written last into a finished cache folder: ``{"files": {name: size in bytes}}``.
COMPLETE = "COMPLETE.json"
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def cache_root(configured: str | None = None) -> Path:
    """Cache folder: ``configured``, else ``$XDG_CACHE_HOME/prune-attattr``, else ``~/.cache/prune-attattr``."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prune-attattr"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """SHA-256 hex digest of a model folder's content: the name and bytes of every config, weight,
    tokenizer and vocabulary file (``*.json``, ``*.safetensors``, ``*.bin``, ``*.txt``, ``*.model``), so two
    checkpoints with the same config and file sizes but different weights get different digests.
    ``COMPLETE.json`` (the cache's own marker) is left out."""
    path = Path(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        f = path / name
        if name != COMPLETE and f.is_file() and name.endswith(_MODEL_SUFFIXES):
            h.update(name.encode() + b"\0" + file_digest(f).encode() + b"\0")
    return h.hexdigest()


def encoded_digest(data) -> str:
    """SHA-256 hex digest of tokenised examples (:class:`~prune_attattr.tasks.Encoded`): ids, segment ids, labels."""
    h = hashlib.sha256()
    types = data.token_type_ids if data.token_type_ids is not None else [None] * len(data)
    for ids, tt, y in zip(data.input_ids, types, data.labels):
        h.update(f"{y}:{','.join(map(str, ids))}|{'' if tt is None else ','.join(map(str, tt))};".encode())
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """SHA-256 hex digest of JSON-serialisable ``parts`` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensors_digest(tensors: dict) -> str:
    """SHA-256 hex digest of named tensors (a ``state_dict``): every name, dtype, shape and the raw bytes."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_complete_marker(folder: Path) -> None:
    """Write :data:`COMPLETE` into ``folder`` listing every other file (relative name -> size)."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE
    }
    (folder / COMPLETE).write_text(json.dumps({"files": files}, indent=1))


def entry_complete(folder: Path, required: Iterable[str] = ()) -> bool:
    """True when ``folder`` has a :data:`COMPLETE` marker, every file it lists exists with that size,
    and every name in ``required`` is among them."""
    marker = Path(folder) / COMPLETE
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if any(name not in files for name in required):
        return False
    for name, size in files.items():
        p = Path(folder) / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def _atomic_replace(path: Path, write) -> None:
    """``write(temporary path)``, fsync, then rename over ``path``: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write(path: Path, text: str) -> None:
    _atomic_replace(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class StageCache:
    """JSON results of stages under ``<root>/stages/<key>.json`` (atomic writes; unreadable entries are misses),
    with optional tensors beside them in ``<key>.safetensors``.

    Args:
        root: cache folder (:func:`cache_root`).
        enabled: False (``--no-cache``): :meth:`get` and :meth:`get_tensors` always miss; :meth:`put`
            still writes, so the next run can resume.
    """

    def __init__(self, root: Path, enabled: bool = True):
        self.dir = Path(root) / "stages"
        self.enabled = enabled

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def tensors_path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _entry(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return entry

    def get(self, key: str) -> Any | None:
        """The stored value of ``key``, or None (missing, unreadable, or the cache is disabled)."""
        entry = self._entry(key)
        return None if entry is None else entry.get("value")

    def get_tensors(self, key: str) -> dict | None:
        """The tensors stored with ``key`` (name -> CPU tensor), or None: no entry, an entry stored without
        tensors, a tensor file missing or of another size than the entry records, unreadable, or the
        cache is disabled."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        entry = self._entry(key)
        record = entry.get("tensors") if entry is not None else None
        path = self.tensors_path(key)
        try:
            if not isinstance(record, dict) or path.stat().st_size != record.get("bytes"):
                return None
            return load_file(path)
        except (OSError, SafetensorError):  # a torn or foreign file reads as a miss, like a torn JSON entry
            return None

    def put(self, key: str, value: Any, tensors: dict | None = None) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``, atomically. ``tensors`` (name -> tensor; copied
        to the CPU) go to ``<key>.safetensors``, written and renamed before the JSON entry that records
        their size, so a killed process never leaves an entry whose tensors are missing or torn."""
        entry = {"key": key, "value": value}
        if tensors is not None:
            from safetensors.torch import save_file

            cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}  # copies: no shared storage
            path = self.tensors_path(key)
            _atomic_replace(path, lambda tmp: save_file(cpu, tmp))
            entry["tensors"] = {"file": path.name, "bytes": path.stat().st_size}
        _atomic_write(self.path(key), json.dumps(entry))
