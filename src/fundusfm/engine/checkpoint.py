"""Checkpoint and weights files, written so that a failure never costs the previous one.

Every file goes through a temporary file in the same folder and a rename, so a run killed
mid-write (kill -9, power loss) or a full disk leaves the last complete file in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fundusfm.errors import CheckpointWriteError
from fundusfm.io import write_atomic


def _write_atomic(write: Callable[[Path], None], path: Path) -> None:
    """`io.write_atomic`, with a failed write (e.g. a full disk) said in words: the previous
    `path` is as it was, and the run can continue with --resume once there is space."""
    try:
        write_atomic(path, write)
    except OSError as exc:
        kept = "the previous one is intact" if path.is_file() else "none was written before"
        raise CheckpointWriteError(
            exc.errno,
            f"could not write {path} ({exc.strerror or exc}); {kept}. Free disk "
            "space (or choose another run.out) and continue with --resume",
        ) from exc


def save_atomic(obj: dict, path: Path) -> None:
    _write_atomic(lambda tmp: torch.save(obj, tmp), path)


def save_weights(model: nn.Module, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write_atomic(lambda tmp: save_file(tensors, tmp), path)
