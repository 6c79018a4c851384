"""Training-memory estimates from the engine's plan (nothing runs but a shape trace).

How the numbers are made (per image of ``input_size``, batch ``batch_size``):

* parameters: weights + gradients + optimizer states (AdamW: 2), fp32.
* image: the uint8 input batch.
* un-tiled activations: the activation elements of the streamed part for the whole image, as the
  engine's tracer counts them (``plan.work``: every input-dependent tensor the forward allocates, the
  per-tile float conversion included) -- what autograd keeps for backward when the model runs
  un-tiled, at ``bytes_per_element``.
* streamed activations: for each streamed piece, its activation elements scaled to its largest tile
  (``work * tile area / map area``), doubled for the tile's backward; the largest piece counts.
  Plus the stitched maps between pieces (and the final feature map), each with its gradient.

Activations of an un-streamed tail (``stream_stages`` below the model's maximum) and allocator
overheads are not included; the Python/torch runtime (about 0.3-0.6 GiB of RSS on the CPU) is not either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["MemoryEstimate", "estimate_training_memory", "format_bytes"]

GIB = 2 ** 30


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.0f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    input_size: tuple[int, int]
    batch_size: int
    parameter_bytes: int
    image_bytes: int
    untiled_activation_bytes: int
    tile_activation_bytes: int
    stitched_bytes: int
    num_tiles: int

    @property
    def streamed_bytes(self) -> int:
        return self.parameter_bytes + self.image_bytes + self.tile_activation_bytes + self.stitched_bytes

    @property
    def untiled_bytes(self) -> int:
        return self.parameter_bytes + self.image_bytes + self.untiled_activation_bytes

    def __str__(self) -> str:
        h, w = self.input_size
        return (f"{h}x{w} x{self.batch_size}: streamed ~{format_bytes(self.streamed_bytes)} "
                f"(tile activations {format_bytes(self.tile_activation_bytes)}, stitched maps "
                f"{format_bytes(self.stitched_bytes)}, parameters+optimizer {format_bytes(self.parameter_bytes)}, "
                f"image {format_bytes(self.image_bytes)}, {self.num_tiles} tiles); un-tiled "
                f"~{format_bytes(self.untiled_bytes)} (activations {format_bytes(self.untiled_activation_bytes)})")


def _stitched_elements(model: nn.Module, plan, channels: int, dtype: torch.dtype) -> list[float]:
    streamer = model.streamer
    try:  # the engine's traced chain: exact output shape of every piece
        chain = streamer._chain_for(plan.input_size[0], plan.input_size[1], dtype, channels)
        return [float(math.prod(chain[b - 1].output_shape)) for _, b in streamer._bounds]
    except (AttributeError, TypeError):  # pragma: no cover - engine internals changed: upper bound
        # the engine only stitches maps no larger than the input
        return [float(channels * plan.input_size[0] * plan.input_size[1])] * len(plan.pieces)


def estimate_training_memory(model: nn.Module, input_size: Sequence[int], *, batch_size: int = 1,
                             bytes_per_element: int = 4, optimizer_states: int = 2,
                             channels: int | None = None) -> MemoryEstimate:
    """Estimate one training step's memory for a ``stream_<arch>`` model, streamed and un-tiled.

    ``bytes_per_element``: 4 for fp32, 2 for 16-bit mixed precision; ``optimizer_states``: per
    parameter (AdamW 2, SGD with momentum 1, plain SGD 0).
    """
    height, width = int(input_size[0]), int(input_size[1])
    channels = channels or model.streamer.in_channels
    dtype = next(model.parameters()).dtype
    plan = model.stream_plan((height, width))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameter_bytes = 4 * (params + trainable * (1 + optimizer_states))
    image_bytes = batch_size * channels * height * width
    untiled = sum(plan.work) * bytes_per_element * batch_size
    tile = 0.0
    for work, piece in zip(plan.work, plan.pieces):
        area = piece.input_size[0] * piece.input_size[1]
        largest = piece.largest_tile[0] * piece.largest_tile[1]
        tile = max(tile, work * min(1.0, largest / area) * 2)
    stitched = sum(_stitched_elements(model, plan, channels, dtype)) * 2
    return MemoryEstimate((height, width), batch_size, int(parameter_bytes), int(image_bytes), int(untiled),
                          int(tile * bytes_per_element * batch_size), int(stitched * bytes_per_element * batch_size),
                          plan.num_tiles)
