"""Lazy images: inputs the engine reads region by region instead of holding whole.

The *lazy image protocol* (what ``timm_stream.open_image`` returns): an object with ``shape`` (a
``torch.Size`` ``(N, C, H, W)``), ``dtype`` (a ``torch.dtype``), ``ndim == 4``, ``device == cpu`` and a
thread-safe ``__getitem__((slice(None), slice(None), slice(r0, r1), slice(c0, c1)))`` returning a new
contiguous CPU tensor of shape ``(N, C, r1 - r0, c1 - c0)``. The engine never asks for more than one
tile's region (halo included) at a time, and reads the next tile's region in one background thread
while the current tile computes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

from torch import Tensor

__all__ = ["is_lazy_image", "read_region", "read_whole", "prefetch_regions"]


def is_lazy_image(x: Any) -> bool:
    """True for an object following the lazy image protocol (not a tensor, has ``shape``, ``dtype`` and
    ``__getitem__``)."""
    return not isinstance(x, Tensor) and hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


def read_region(x: Any, rows: slice, cols: slice) -> Tensor:
    """``x[:, :, rows, cols]``: a view for a tensor, a fresh read for a lazy image (checked to be a
    tensor of the promised shape, so that a faulty reader fails here and not deep inside a network)."""
    region = x[:, :, rows, cols]
    if is_lazy_image(x):
        n, c = x.shape[0], x.shape[1]
        expected = (n, c, rows.stop - rows.start, cols.stop - cols.start)
        if not isinstance(region, Tensor) or tuple(region.shape) != expected:
            got = tuple(region.shape) if isinstance(region, Tensor) else type(region).__name__
            raise TypeError(f"the lazy image {type(x).__name__} returned {got} for rows {rows.start}:{rows.stop}, "
                            f"columns {cols.start}:{cols.stop}; the lazy image protocol requires a torch.Tensor "
                            f"of shape {expected}: fix its __getitem__")
    return region


def read_whole(x: Any) -> Tensor:
    """The whole image as a tensor (a lazy image is read once, entirely: only for un-tiled runs)."""
    if not is_lazy_image(x):
        return x
    return read_region(x, slice(0, int(x.shape[2])), slice(0, int(x.shape[3])))


def prefetch_regions(x: Any, regions: Sequence[tuple[slice, slice]]) -> Iterator[Tensor]:
    """Yield ``x[:, :, rows, cols]`` for each region in order. For a lazy image the next region is
    read in one background thread while the caller works on the current one (decoding a slide's
    tiles overlaps the network's compute); a tensor is sliced in place (views, nothing read)."""
    if not is_lazy_image(x):
        for rows, cols in regions:
            yield x[:, :, rows, cols]
        return
    if not regions:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="timm_stream-prefetch") as pool:
        future = pool.submit(read_region, x, *regions[0])
        for index in range(len(regions)):
            region = future.result()
            if index + 1 < len(regions):
                future = pool.submit(read_region, x, *regions[index + 1])
            yield region
            del region
