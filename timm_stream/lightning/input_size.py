"""The smallest image a model accepts, found by running it on shape-only ("meta") tensors.

A network's total stride is not its minimum input: padded convolutions and poolings give a ResNet
(stride 32) a 1x1 output for a 16x16 (even a 1x1) image, while other networks fail on sizes their
downsampling cannot split. Running the very model, un-tiled, on meta tensors answers the question
for any architecture without allocating memory or touching the real weights.
"""
from __future__ import annotations

from itertools import chain

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["smallest_input_size"]

_LIMIT = 1 << 14  # no CNN of this zoo needs a bigger image; beyond, report the limit


def _runs(model: nn.Module, state: dict, channels: int, dtype: torch.dtype, height: int, width: int) -> bool:
    x = torch.empty(1, channels, height, width, device="meta", dtype=dtype)
    try:
        with torch.no_grad():
            out = functional_call(model, state, (x,))
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError):  # what too-small inputs raise
        return False
    return all(t.numel() > 0 for t in (out if isinstance(out, (tuple, list)) else (out,)))


def _smallest(runs, other: int) -> int | None:
    """Smallest length ``n`` (the other axis at ``other``) with ``runs(n)``, by doubling then bisection
    (assumes a larger length runs whenever a smaller one does, as padded downsampling does)."""
    high = 1
    while not runs(high, other):
        high *= 2
        if high > _LIMIT:
            return None
    low = high // 2  # fails (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if runs(mid, other) else (mid, high)
    return high


def smallest_input_size(model: nn.Module, channels: int | None = None, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """``(height, width)`` in pixels: the smallest image ``model`` (un-tiled, eval mode) turns into a
    non-empty output, each axis searched with the other at its own minimum's ample bound.

    ``channels``: input channels (default: the first convolution's). ``dtype``: the input dtype (default: uint8 for models that normalize their input, else the
    parameters' dtype). Raises ``ValueError`` when no size up to 16384 px runs.
    """
    if channels is None:  # what the first convolution takes
        channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    streaming = getattr(model, "streaming", None)
    training = model.training
    if dtype is None:
        preprocess = getattr(getattr(model, "streamer", None), "preprocess", None)
        param = next(model.parameters(), None)
        dtype = torch.uint8 if preprocess is not None else (param.dtype if param is not None else torch.float32)
    state = {name: torch.empty_like(t, device="meta") for name, t in chain(model.named_parameters(),
                                                                           model.named_buffers())}
    try:
        if streaming is not None:
            model.streaming = False  # the same modules un-tiled: the question is the network's, not the tiles'
        model.eval()
        runs = lambda h, w: _runs(model, state, channels, dtype, h, w)  # noqa: E731
        square = _smallest(lambda n, _: runs(n, n), 0)
        if square is None:
            raise ValueError(f"{type(model).__name__} runs on no image up to {_LIMIT}x{_LIMIT} px")
        height = _smallest(lambda n, w: runs(n, w), square)
        width = _smallest(lambda n, h: runs(h, n), square)
        return (height or square, width or square)
    finally:
        model.train(training)
        if streaming is not None:
            model.streaming = streaming
