"""Atomic checkpoint writes.

What Lightning 2.6 does by itself (``TorchCheckpointIO`` -> ``lightning.fabric.utilities.cloud_io._atomic_save``):
it serializes the whole checkpoint into memory, then writes it inside an ``fsspec`` transaction. For
local paths fsspec writes to ``tempfile.mkstemp()`` -- in the system temp folder, not in the
checkpoint's folder -- and ``shutil.move``\\ s it into place when the transaction commits. When the
temp folder is on another filesystem than the checkpoints (common: ``/tmp`` on tmpfs or local disk,
checkpoints on a network or data volume) the move is a *copy* into the final name, which a crash or
kill can leave half-written; a killed process also leaves its temp file behind in ``/tmp``.

:class:`AtomicCheckpointIO` writes to a temporary file in the checkpoint's own folder, fsyncs it and
``os.replace``\\ s it onto the final name (atomic on POSIX and Windows), so the final name always holds
either the previous complete file or the new complete file. Remote (non-local fsspec) paths keep
Lightning's behaviour. ``timm-stream`` (the CLI) adds it to every Trainer unless the config names
another ``CheckpointIO`` plugin.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path``: temp file in the same
    folder, fsync, ``os.replace``; the temp file is removed if anything fails."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        path = os.fspath(path)
        if path.startswith("file://"):
            path = path[len("file://"):]
        atomic_torch_save(checkpoint, path)
