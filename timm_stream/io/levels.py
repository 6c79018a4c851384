"""Which pyramid level a request means: ``level=`` (index, negative from the smallest) or ``mpp=``
(microns per pixel: the level closest to it). Shared by every backend so they agree."""
from __future__ import annotations

import math
from typing import Sequence

from .errors import ImageReadError

__all__ = ["choose_level", "level_mpp", "MPP_FINER_TOLERANCE"]

# A request up to 10% finer than level 0 still means level 0 (scanners of one model differ by a few
# percent: 0.243 vs 0.25 um/px); anything finer would need upsampling, which we refuse.
MPP_FINER_TOLERANCE = 0.10


def level_mpp(mpp0: float | None, shapes: Sequence[tuple[int, int]]) -> list[float | None]:
    """Microns per pixel of each level: level 0's times the width ratio (as OpenSlide's downsample)."""
    if mpp0 is None:
        return [None] * len(shapes)
    w0 = shapes[0][1]
    return [mpp0 * w0 / w for _, w in shapes]


def choose_level(shapes: Sequence[tuple[int, int]], mpp0: float | None, path: str, level: int | None = None,
                 mpp: float | None = None) -> int:
    """The index (0: full resolution) of the level asked for.

    Args:
        shapes: ``(height, width)`` in pixels of every level, finest first.
        mpp0: microns per pixel of level 0 (None: unknown).
        path: the file, for error messages.
        level: a level index, negative from the smallest (``-1``: the smallest).
        mpp: instead of ``level``: the level whose microns per pixel are closest (in log scale).

    Raises:
        ValueError: both ``level`` and ``mpp`` given.
        ImageReadError: the level does not exist; ``mpp`` asked but the file has no resolution; ``mpp``
            finer than level 0 (more than :data:`MPP_FINER_TOLERANCE`).
    """
    if level is not None and mpp is not None:
        raise ValueError(f"{path}: give either level or mpp, not both")
    count = len(shapes)
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"{path}: mpp must be a positive number of microns per pixel, got {mpp}")
        if mpp0 is None:
            raise ImageReadError(f"{path}: mpp={mpp} was asked for but the file states no resolution (no "
                                 "microns per pixel in its metadata or resolution tags); choose a pyramid level "
                                 f"with level= instead (the file has {count} level(s))")
        if mpp < mpp0 * (1 - MPP_FINER_TOLERANCE):
            raise ImageReadError(f"{path}: mpp={mpp} is finer than the file's full resolution ({mpp0:.4g} um/px "
                                 f"at level 0); ask for mpp >= {mpp0:.4g} (or level=0)")
        mpps = level_mpp(mpp0, shapes)
        return min(range(count), key=lambda i: abs(math.log(mpps[i] / mpp)))
    if level is None:
        return 0
    if not -count <= level < count:
        raise ImageReadError(f"{path}: level {level} does not exist: the file has {count} pyramid level(s) "
                             f"(0..{count - 1}, or negative from the smallest); sizes {list(shapes)}")
    return level % count
