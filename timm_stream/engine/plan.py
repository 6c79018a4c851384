"""Tile plans: which input pixels each tile reads and which outputs it is responsible for (2-D)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .geometry import AxisGeometry, AxisTile, PerAxisGeometry, overlap_factor, plan_axis

__all__ = ["Tile", "TilePlan", "make_plan", "normalize_tile_size"]


def normalize_tile_size(tile_size: Any) -> tuple[int, int]:
    """The one reading of a ``tile_size`` argument: a positive int (square tiles) or a pair
    ``(height, width)`` of positive ints (list or tuple), in input pixels. Returns ``(height, width)``.

    Raises ``ValueError`` for anything else (bools, floats, strings, zero, negative values, other
    lengths), naming the value received.
    """
    if isinstance(tile_size, (tuple, list)) and len(tile_size) == 2:
        pair = tuple(tile_size)
    else:
        pair = (tile_size, tile_size)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"tile_size must be a positive int or a pair (height, width) of positive ints, "
                         f"got {tile_size!r}")
    return (int(pair[0]), int(pair[1]))


@dataclass(frozen=True)
class Tile:
    rows: AxisTile
    cols: AxisTile

    @property
    def input_region(self) -> tuple[slice, slice]:
        return (self.rows.input_slice, self.cols.input_slice)

    @property
    def output_region(self) -> tuple[slice, slice]:
        return (self.rows.output_slice, self.cols.output_slice)

    @property
    def crop(self) -> tuple[slice, slice]:
        """Where this tile's outputs sit in the tile's own output map."""
        return (self.rows.crop, self.cols.crop)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.length, self.cols.length)


@dataclass(frozen=True)
class TilePlan(PerAxisGeometry):
    """How an input of ``input_size`` is cut into tiles for a module of the given geometry.

    ``stride``: total stride of the output; ``halo``: extra input pixels a tile needs (before, after)
    the pixels its outputs stand for, per axis; ``overlap``: pixels read by all tiles over image pixels
    (1.0 means no pixel is computed twice); ``min_tile_size``: the smallest tile that works anywhere.
    """

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    tile_size: tuple[int, int]
    axes: tuple[AxisGeometry, AxisGeometry]
    align: tuple[int, int]
    rows: tuple[AxisTile, ...]
    cols: tuple[AxisTile, ...]
    size_multiple: tuple[int, int] = (1, 1)

    @property
    def tiles(self) -> list[Tile]:
        return [Tile(r, c) for r in self.rows for c in self.cols]

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    @property
    def num_tiles(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.rows), len(self.cols))

    @property
    def overlap(self) -> float:
        return overlap_factor((self.rows, self.cols), self.input_size)

    @property
    def largest_tile(self) -> tuple[int, int]:
        return (max(t.length for t in self.rows), max(t.length for t in self.cols))

    def __str__(self) -> str:
        (h, w), (oh, ow) = self.input_size, self.output_size
        return (f"TilePlan({h}x{w} -> {oh}x{ow}, stride {self.stride}, halo {self.halo}, "
                f"{self.grid[0]}x{self.grid[1]} tiles of at most {self.largest_tile[0]}x{self.largest_tile[1]}, "
                f"overlap {self.overlap:.3f})")


def make_plan(input_size: tuple[int, int], output_size: tuple[int, int], tile_size: tuple[int, int],
              axes: tuple[AxisGeometry, AxisGeometry], align: tuple[int, int],
              size_multiple: tuple[int, int] = (1, 1)) -> TilePlan:
    rows, cols = (
        plan_axis(input_size[i], output_size[i], axes[i], align[i], tile_size[i], size_multiple[i])
        for i in range(2)
    )
    return TilePlan(tuple(input_size), tuple(output_size), tuple(tile_size), axes, align, rows, cols,
                    tuple(size_multiple))
