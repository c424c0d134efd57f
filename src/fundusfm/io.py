"""File helpers every stage shares: atomic writes, JSON, sha256 (the one copy of each).

An atomic write goes to a uniquely named temporary file beside the target and is renamed
over it: a reader (another grid shard, a resumed run) never sees half a file, and a failed
write (a full disk, an interrupt) leaves the previous file as it was. No heavy imports, so
`grid status` stays torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, written files get the usual mode


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically (newlines as given)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    return write_atomic(path, write)


def write_csv(path: Path, frame) -> Path:
    """A table as CSV (no index), atomically; the folder is created when missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, frame.to_csv(index=False))


def write_npy(path: Path, array: np.ndarray) -> Path:
    """Save an array as .npy atomically (no pickled objects)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return write_atomic(path, write)


def json_safe(value):
    """`value` with NaN and infinities as None (JSON has no NaN; a missing metric is null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, obj) -> Path:
    """Write `obj` as indented JSON, atomically; NaN becomes null, other objects str()."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, default=str))


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def value_sha256(value) -> str:
    """sha256 of a JSON-able value, independent of key order (settings -> a cache key)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
