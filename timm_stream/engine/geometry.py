"""Pure geometry of tile-wise execution: receptive fields, tile plans, minimum tile sizes.

Everything here is integer arithmetic on one spatial axis at a time; nothing runs a network.

Conventions (one axis):
    A feature map produced by a local network from an input of ``length`` pixels has positions
    ``j = 0 .. out_length - 1``. Position ``j`` depends on input pixels
    ``[j * stride + lo, j * stride + hi]`` (an :class:`AxisGeometry`); pixels outside ``[0, length)``
    in that range are padding. ``stride`` is the product of the strides on the way, ``lo``/``hi`` are
    the receptive field's extent relative to ``j * stride`` (``lo <= 0 <= hi`` for usual padding).

Exactness rests on three invariants that :func:`plan_axis` guarantees for every tile:
    1. The output ranges of the tiles are disjoint and cover ``[0, out_length)``.
    2. A tile's input range covers the receptive field of every output it is responsible for,
       except beyond the real image border, where the tile touches that border so that padding is the
       same as in the un-tiled run.
    3. Every tile starts at a multiple of ``align`` (the lcm of all intermediate strides), so that each
       intermediate feature map of the tile lies on the un-tiled map's grid: tile position ``i`` at an
       intermediate stride ``s`` is un-tiled position ``i + start // s``.
Then each output of a tile is computed by exactly the same arithmetic as in the un-tiled run, and by
the chain rule the per-tile gradients (of the input and of every parameter) sum to the un-tiled ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import TileTooSmallError

__all__ = [
    "AxisGeometry",
    "AxisTile",
    "PerAxisGeometry",
    "TileTooSmallError",
    "conv_output_length",
    "pool_output_length",
    "min_tile_length",
    "plan_axis",
]


@dataclass(frozen=True)
class AxisGeometry:
    """Receptive field of a feature map along one axis: position ``j`` reads input
    pixels ``[j * stride + lo, j * stride + hi]``. ``lo > hi`` marks a map that reads no pixel at all
    (a constant such as ``zeros_like(x)``)."""

    stride: int = 1
    lo: int = 0
    hi: int = 0

    @property
    def empty(self) -> bool:
        return self.lo > self.hi

    @property
    def size(self) -> int:
        """Receptive field size in input pixels."""
        return 0 if self.empty else self.hi - self.lo + 1

    @property
    def halo(self) -> tuple[int, int]:
        """Extra input pixels needed before and after the ``stride`` pixels an output position
        stands for: what an inner tile border costs on each side."""
        if self.empty:
            return (0, 0)
        return (max(0, -self.lo), max(0, self.hi - (self.stride - 1)))

    def window(self, kernel: int, stride: int = 1, pad_before: int = 0, dilation: int = 1) -> "AxisGeometry":
        """Geometry after a sliding window (convolution or pooling) over this map: output ``j``
        reads positions ``j * stride - pad_before + t * dilation`` for ``t < kernel``."""
        if self.empty:
            return AxisGeometry(self.stride * stride, self.lo, self.hi)
        span = (kernel - 1) * dilation
        return AxisGeometry(
            self.stride * stride,
            self.lo - pad_before * self.stride,
            self.hi + (span - pad_before) * self.stride,
        )

    def shift(self, pad_before: int) -> "AxisGeometry":
        """Geometry after padding ``pad_before`` positions in front (negative: cropping)."""
        if self.empty:
            return self
        return AxisGeometry(self.stride, self.lo - pad_before * self.stride, self.hi - pad_before * self.stride)

    def union(self, other: "AxisGeometry") -> "AxisGeometry":
        """Geometry of a map computed position-wise from two maps on the same grid."""
        if self.stride != other.stride:
            raise ValueError(f"cannot combine feature maps of strides {self.stride} and {other.stride}")
        if self.empty:
            return other
        if other.empty:
            return self
        return AxisGeometry(self.stride, min(self.lo, other.lo), max(self.hi, other.hi))

    @staticmethod
    def constant(stride: int) -> "AxisGeometry":
        return AxisGeometry(stride, 1, 0)


def conv_output_length(length: int, kernel: int, stride: int = 1, pad_before: int = 0,
                       pad_after: int | None = None, dilation: int = 1) -> int:
    """Output length of a convolution (PyTorch's formula)."""
    pad_after = pad_before if pad_after is None else pad_after
    return (length + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_length(length: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
                       ceil_mode: bool = False) -> int:
    """Output length of max/avg pooling (PyTorch's formula, including its ceil_mode rule that the
    last window must start inside the input or the left padding)."""
    span = dilation * (kernel - 1) + 1
    numerator = length + 2 * padding - span
    out = (-(-numerator // stride) if ceil_mode else numerator // stride) + 1
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return out


class PerAxisGeometry:
    """The per-axis properties of anything with ``axes`` (one :class:`AxisGeometry` per spatial
    axis, rows then columns), ``align`` and ``size_multiple``: written once here, shared by tile
    plans, stream plans and stream geometries. All values are ``(rows, cols)`` in input pixels."""

    axes: tuple[AxisGeometry, AxisGeometry]
    align: tuple[int, int]
    size_multiple: tuple[int, int]

    @property
    def stride(self) -> tuple[int, int]:
        """Total stride of the output per axis."""
        return (self.axes[0].stride, self.axes[1].stride)

    @property
    def halo(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Extra input pixels (before, after) an inner tile border costs, per axis."""
        return (self.axes[0].halo, self.axes[1].halo)

    @property
    def receptive_field(self) -> tuple[int, int]:
        """Receptive field size of one output position per axis."""
        return (self.axes[0].size, self.axes[1].size)

    @property
    def min_tile_size(self) -> tuple[int, int]:
        """The smallest tile that works anywhere in an image."""
        return (min_tile_length(self.axes[0], self.align[0], self.size_multiple[0]),
                min_tile_length(self.axes[1], self.align[1], self.size_multiple[1]))


def _floor_to(value: int, multiple: int) -> int:
    return (value // multiple) * multiple


def min_tile_length(geometry: AxisGeometry, align: int, size_multiple: int = 1) -> int:
    """Smallest tile length that lets a tile at *any* position produce at least one output.

    An inner tile for output ``j`` starts at ``floor(j*stride + lo, align)`` and must reach
    ``j*stride + hi``; the rounding down to ``align`` costs at most ``align - stride + (lo mod stride)``
    pixels (the largest residue of ``j*stride + lo`` modulo ``align``); rounding the length up to
    ``size_multiple`` costs at most ``size_multiple - 1`` more. Outputs that read only the padding
    beyond the image end need a tile from the last multiple of ``align`` to the end: up to ``align``
    pixels (more than the rest only when the receptive field is smaller than the stride).
    """
    if geometry.empty:
        return size_multiple
    worst_residue = align - geometry.stride + (geometry.lo % geometry.stride)
    return max(geometry.size + worst_residue + size_multiple - 1, align)


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis: it reads input pixels ``[in_start, in_stop)`` and is responsible for
    output positions ``[out_start, out_stop)``, which are tile-output positions
    ``[out_start - in_start // stride, out_stop - in_start // stride)``."""

    in_start: int
    in_stop: int
    out_start: int
    out_stop: int
    stride: int

    @property
    def length(self) -> int:
        return self.in_stop - self.in_start

    @property
    def crop(self) -> slice:
        """Where this tile's outputs sit in the tile's own output map."""
        offset = self.in_start // self.stride
        return slice(self.out_start - offset, self.out_stop - offset)

    @property
    def input_slice(self) -> slice:
        return slice(self.in_start, self.in_stop)

    @property
    def output_slice(self) -> slice:
        return slice(self.out_start, self.out_stop)


def _tile_start(out_start: int, geometry: AxisGeometry, align: int, length: int) -> int:
    # Rounding down to `align` keeps every intermediate grid aligned (invariant 3); it only adds
    # pixels, never removes any the receptive field needs. Outputs that read nothing but the padding
    # beyond the far border (a 1x1 convolution with padding) still need a non-empty tile there.
    start = max(0, _floor_to(out_start * geometry.stride + geometry.lo, align))
    return min(start, _floor_to(length - 1, align))


def _tile_stop(out_stop: int, geometry: AxisGeometry, length: int, size_multiple: int, start: int) -> int:
    # Reaching `length` makes the tile share the image's real border (invariant 2). Networks that only
    # run on sizes divisible by some number (DLA) get tiles rounded up to it. A tile holds at least one
    # pixel, even if its outputs read only the padding before the image.
    stop = max((out_stop - 1) * geometry.stride + geometry.hi + 1, start + 1)
    return min(length, -(-stop // size_multiple) * size_multiple)


def _greedy_tiles(length: int, out_length: int, geometry: AxisGeometry, align: int,
                  max_tile: int, size_multiple: int) -> list[AxisTile] | None:
    """Fewest tiles of at most ``max_tile`` pixels, each taking as many outputs as fit; None if some
    tile cannot take even one output."""
    tiles: list[AxisTile] = []
    out_start = 0
    stride = geometry.stride
    while out_start < out_length:
        start = _tile_start(out_start, geometry, align, length)
        if length - start <= max_tile:
            out_stop = out_length
        else:
            reach = _floor_to(start + max_tile, size_multiple)  # furthest stop a tile may round up to
            out_stop = min(out_length, (reach - geometry.hi - 1) // stride + 1)
        stop = _tile_stop(out_stop, geometry, length, size_multiple, start)
        if out_stop <= out_start or stop - start > max_tile:
            return None
        tiles.append(AxisTile(start, stop, out_start, out_stop, stride))
        out_start = out_stop
    return tiles


def plan_axis(length: int, out_length: int, geometry: AxisGeometry, align: int,
              max_tile: int, size_multiple: int = 1) -> tuple[AxisTile, ...]:
    """Split one axis into the fewest tiles of at most ``max_tile`` input pixels, balanced so that the
    largest tile is as small as possible (which also balances memory and work).

    The number of tiles is minimal because every tile greedily takes all outputs it can; with that
    number fixed, a bisection finds the smallest tile length that still needs no more tiles.
    ``size_multiple`` (a divisor of ``align``) rounds inner tile lengths up for networks that need it.
    """
    if align % size_multiple:
        raise ValueError(f"size_multiple {size_multiple} must divide align {align}")
    if length <= 0 or out_length <= 0:
        raise ValueError(f"nothing to tile: input length {length}, output length {out_length}")
    if geometry.empty:
        geometry = AxisGeometry(geometry.stride, 0, 0)
    tiles = _greedy_tiles(length, out_length, geometry, align, max_tile, size_multiple)
    if tiles is None:
        raise TileTooSmallError(
            f"a tile of {max_tile} px cannot hold the receptive field of one output "
            f"({geometry.size} px at stride {geometry.stride}, tiles aligned to {align} px); "
            f"use a tile of at least {min_tile_length(geometry, align, size_multiple)} px",
            min_tile_length(geometry, align, size_multiple),
        )
    low, high = 1, max(t.length for t in tiles)
    while low < high:  # smallest max_tile that keeps the same number of tiles
        mid = (low + high) // 2
        candidate = _greedy_tiles(length, out_length, geometry, align, mid, size_multiple)
        if candidate is not None and len(candidate) <= len(tiles):
            high = mid
        else:
            low = mid + 1
    balanced = _greedy_tiles(length, out_length, geometry, align, high, size_multiple)
    assert balanced is not None and len(balanced) == len(tiles)
    return tuple(balanced)


def overlap_factor(tiles_per_axis: Sequence[Iterable[AxisTile]], lengths: Sequence[int]) -> float:
    """Input pixels read by all tiles together over the pixels of the image (1.0: no recomputation)."""
    factor = 1.0
    for tiles, length in zip(tiles_per_axis, lengths):
        factor *= sum(t.length for t in tiles) / length
    return factor


def lcm(values: Iterable[int]) -> int:
    result = 1
    for v in values:
        result = result * v // math.gcd(result, v)
    return result
