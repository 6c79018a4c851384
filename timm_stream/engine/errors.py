"""Errors raised by the streaming engine. Each names the problem and what to do about it."""
from __future__ import annotations

__all__ = ["StreamingError", "NonLocalModuleError", "TileTooSmallError", "TraceError", "MemoryBudgetError"]


class StreamingError(ValueError):
    """Base class of the engine's errors about what it was asked to stream."""


class TileTooSmallError(StreamingError):
    """The tile cannot hold the receptive field of even one output position. ``min_tile_size`` is the
    smallest tile that works, when known."""

    def __init__(self, message: str, min_tile_size: tuple[int, int] | int | None = None):
        super().__init__(message)
        self.min_tile_size = min_tile_size


class TraceError(StreamingError, RuntimeError):
    """The module could not be run symbolically to derive its geometry (e.g. the input has the wrong
    number of channels: the message carries torch's own error)."""


class NonLocalModuleError(StreamingError):
    """A module's output at one position depends on more than a bounded neighbourhood of the input
    (global pooling, GroupNorm, ...), or it would compute something else per tile (random masks,
    padding computed from the input size). Tiling it would give a wrong answer, so it is refused."""

    def __init__(self, module_path: str, operation: str, reason: str, fix: str | None = None):
        self.module_path = module_path or "<root>"
        self.operation = operation
        self.reason = reason
        message = f"module '{self.module_path}' ({operation}) cannot be streamed: {reason}"
        if fix:
            message += f". {fix}"
        super().__init__(message)


class MemoryBudgetError(StreamingError):
    """No tiling of this input fits the memory budget. ``minimum``: the smallest budget that works for
    this input (bytes), named in the message."""

    def __init__(self, message: str, minimum: int | None = None):
        super().__init__(message)
        self.minimum = minimum
