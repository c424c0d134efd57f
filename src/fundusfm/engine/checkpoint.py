"""Checkpoint and weights files, written so that a failure never costs the previous one.

Every file goes through a temporary file in the same folder and a rename, so a run killed
mid-write (kill -9, power loss) or a full disk leaves the last complete file in place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class CheckpointWriteError(OSError):
    """A checkpoint or weights file could not be written (disk full, quota, permissions)."""


def _write_atomic(write: Callable[[str], None], path: Path) -> None:
    """Write through a temporary file in the same folder, then rename over `path`.

    A failed write (e.g. a full disk) removes the partial file and leaves the previous
    `path` as it was; the error says so.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous one is intact" if path.is_file() else "none was written before"
        raise CheckpointWriteError(
            exc.errno,
            f"could not write {path} ({exc.strerror or exc}); {kept}. Free disk "
            "space (or choose another run.out) and continue with --resume",
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: dict, path: Path) -> None:
    _write_atomic(lambda tmp: torch.save(obj, tmp), path)


def save_weights(model: nn.Module, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write_atomic(lambda tmp: save_file(tensors, tmp), path)
