"""On-disk caches of long stages, keyed on content, written atomically.

Two kinds of entries live under :func:`cache_root`:

- ``finetuned/<key>/``: a fine-tuned model (see :mod:`prune_attattr.finetune`). Written to a temporary
  folder, completed with a :data:`COMPLETE` marker that lists every file and its size, then renamed
  into place; :func:`entry_complete` checks the marker before an entry is reused.
- ``stages/<key>.json``: a stage result (one method's head importance, one evaluated pruning step).
  Written to a temporary file and renamed, so a killed process leaves either the whole entry or none.

Keys are SHA-256 digests of everything that determines a result: the model's bytes
(:func:`model_fingerprint`), the tokenised examples (:func:`encoded_digest`), the settings and the seed.
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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class StageCache:
    """JSON results of stages under ``<root>/stages/<key>.json`` (atomic writes; unreadable entries are misses).

    Args:
        root: cache folder (:func:`cache_root`).
        enabled: False (``--no-cache``): :meth:`get` always misses; :meth:`put` still writes, so the
            next run can resume.
    """

    def __init__(self, root: Path, enabled: bool = True):
        self.dir = Path(root) / "stages"
        self.enabled = enabled

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The stored value of ``key``, or None (missing, unreadable, or the cache is disabled)."""
        if not self.enabled:
            return None
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return entry.get("value")

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``, atomically."""
        _atomic_write(self.path(key), json.dumps({"key": key, "value": value}))
