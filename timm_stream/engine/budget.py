"""The cost model of a streamed forward + backward: peak memory and FLOPs of a chain of tiled pieces, and
how many tile graphs to keep from forward to backward within a memory budget.

Timeline (one image batch; ``M`` stitched output map of a piece, ``G`` one kept tile graph, ``K`` kept
graphs, ``W`` the piece's parameter-gradient accumulators, costs per tile from :mod:`.memory`):

* forward of piece ``p``: the maps and kept graphs of the pieces before it, its own output map being
  stitched, its kept graphs, and the working memory of one tile forward without autograd;
* backward of piece ``p`` (pieces run in reverse): the same of the pieces before it, its output map and
  that map's gradient, the gradient of its input map being summed, ``W``, and one tile's forward +
  backward with the other kept graphs still alive (kept tiles are consumed first), and the parameter
  gradients of the pieces after it (in ``.grad`` by then).

A piece that is a single tile runs plainly (autograd keeps its whole graph, output included), exactly
like an un-tiled module. Time is counted in FLOPs: a forward, the backward as two forwards (the usual
estimate), one more forward for every tile that is recomputed in backward, and ``fresh_flops`` FLOPs per
byte of fresh host pages each tile faults in (its forward without autograd, and its forward + backward;
0 on CUDA; see :func:`.memory.host_cost`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from .memory import LinearCost, StepCost, TraceCost

__all__ = ["PieceCost", "peak_memory", "step_time", "allocate_kept"]


@dataclass(frozen=True)
class PieceCost:
    """One tiled piece for the cost model. ``rows``, ``cols``: input lengths (pixels, halo included) of
    its tiles along each axis (tiles run row by row); ``cost``: per-tile cost; ``map_bytes``: its
    stitched output map (0 when it feeds a streamed pooling); ``input_map_bytes``: the map it reads,
    whose gradient backward sums (0 for the first piece unless the input needs a gradient);
    ``param_bytes``: its trainable parameters."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    cost: "LinearCost | TraceCost"
    map_bytes: int
    input_map_bytes: int
    param_bytes: int

    def __post_init__(self) -> None:
        # the most of each cost over the grid's distinct tile sizes (a few): with a host allocator the peak
        # is not monotone in the area (blocks cross the mmap threshold), so the largest tile may not be
        # the costliest
        sizes = [self.cost((r, c)) for r in set(self.rows) for c in set(self.cols)]
        object.__setattr__(self, "largest", StepCost(*(max(getattr(c, f.name) for c in sizes)
                                                       for f in dataclasses.fields(StepCost))))
        for name, lengths in (("_row_prefix", self.rows), ("_col_prefix", self.cols)):
            prefix = [0]
            for length in lengths:
                prefix.append(prefix[-1] + length)
            object.__setattr__(self, name, prefix)

    @property
    def num_tiles(self) -> int:
        return len(self.rows) * len(self.cols)

    def _area(self, count: int) -> int:
        """Input pixels of the first ``count`` tiles (row-major): whole rows of tiles, then a part row,
        without listing the tiles (a whole slide at small tiles has millions)."""
        full, rest = divmod(count, len(self.cols))
        area = self._row_prefix[full] * self._col_prefix[-1]
        if rest:
            area += self.rows[full] * self._col_prefix[rest]
        return area

    def flops(self, first: int, stop: int) -> float:
        """Forward FLOPs of tiles ``first`` to ``stop - 1``: linear in their areas."""
        return self.cost.flops(stop - first, self._area(stop) - self._area(first))

    def _sum(self, count: int, value: Callable[[StepCost], float]) -> float:
        """``value`` of the cost of each of the first ``count`` tiles (row-major), summed per distinct
        tile size (a grid has a few: balanced tiles, border tiles with less halo)."""
        full, rest = divmod(count, len(self.cols))
        per_row = {}
        total = 0.0
        for r, n in Counter(self.rows[:full]).items():
            if r not in per_row:
                per_row[r] = sum(m * value(self.cost((r, c))) for c, m in Counter(self.cols).items())
            total += n * per_row[r]
        if rest:
            total += sum(m * value(self.cost((self.rows[full], c))) for c, m in Counter(self.cols[:rest]).items())
        return total

    def fresh(self, first: int, stop: int, forward_only: bool = False) -> float:
        """Bytes of fresh host pages of tiles ``first`` to ``stop - 1``: their forward + backward, or
        (``forward_only``) their forward without autograd."""
        value = (lambda c: c.forward_fresh) if forward_only else (lambda c: c.fresh)
        return self._sum(stop, value) - self._sum(first, value)


def peak_memory(pieces: Sequence[PieceCost], kept: Sequence[int]) -> int:
    """Most bytes alive at once during the forward and backward of ``pieces``, keeping ``kept[p]`` tile
    graphs of piece ``p`` (a single-tile piece always keeps its one graph)."""
    peak, before = 0, 0  # `before`: maps and kept graphs of the pieces already run
    # the parameter gradients of the pieces after each one: backward has put them in `.grad` by then
    later = [sum(p.param_bytes for p in pieces[i + 1:]) for i in range(len(pieces))]
    for piece, k, grads in zip(pieces, kept, later):
        c = piece.largest
        if piece.num_tiles == 1:  # plain autograd: the graph holds the output map too
            forward = before + c.graph
            backward = before + piece.map_bytes + piece.input_map_bytes + grads + c.peak
            before += c.graph
        else:
            own = piece.map_bytes + k * c.graph
            forward = before + own + (c.forward_peak if k < piece.num_tiles else 0)
            backward = (before + 2 * piece.map_bytes + piece.input_map_bytes + grads + piece.param_bytes + c.peak
                        + max(k - 1, 0) * c.graph)
            before += own
        peak = max(peak, forward, backward)
    return int(peak)


def step_time(pieces: Sequence[PieceCost], kept: Sequence[int], fresh_flops: float = 0.0) -> float:
    """Time of forward + backward in FLOPs: forward, backward (2x forward), the recomputation of every
    tile not kept (its forward), and ``fresh_flops`` per byte of fresh host pages."""
    total = 0.0
    for piece, k in zip(pieces, kept):
        n = piece.num_tiles
        recomputed = 0 if n == 1 else n - k  # the last k tiles are kept
        total += 3 * piece.flops(0, n) + piece.flops(0, recomputed)
        if fresh_flops:
            total += fresh_flops * (piece.fresh(0, n) + piece.fresh(0, recomputed, forward_only=True))
    return total


def allocate_kept(pieces: Sequence[PieceCost], budget: int) -> list[int] | None:
    """Kept tile graphs per piece: as many as fit in ``budget`` bytes, the last piece first (its graphs
    live the shortest time: from its forward to its backward, nothing else in between). ``None`` when
    even keeping none exceeds the budget."""
    kept = [1 if p.num_tiles == 1 else 0 for p in pieces]
    if peak_memory(pieces, kept) > budget:
        return None
    for index in reversed(range(len(pieces))):
        n = pieces[index].num_tiles
        if n == 1:
            continue
        lo, hi = 0, n  # largest k with peak <= budget (peak is monotone in k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            kept[index] = mid
            if peak_memory(pieces, kept) <= budget:
                lo = mid
            else:
                hi = mid - 1
        kept[index] = lo
    return kept
