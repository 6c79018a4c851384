"""Tile plans: which input pixels each tile reads and which outputs it is responsible for (2-D)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .geometry import AxisGeometry, AxisTile, min_tile_length, overlap_factor, plan_axis

__all__ = ["Tile", "TilePlan", "make_plan"]


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
class TilePlan:
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
    def stride(self) -> tuple[int, int]:
        return (self.axes[0].stride, self.axes[1].stride)

    @property
    def halo(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (self.axes[0].halo, self.axes[1].halo)

    @property
    def receptive_field(self) -> tuple[int, int]:
        return (self.axes[0].size, self.axes[1].size)

    @property
    def overlap(self) -> float:
        return overlap_factor((self.rows, self.cols), self.input_size)

    @property
    def min_tile_size(self) -> tuple[int, int]:
        return tuple(min_tile_length(self.axes[i], self.align[i], self.size_multiple[i]) for i in range(2))

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
