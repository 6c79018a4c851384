"""The lazy image protocol and the views that map it.

A *lazy image* stands for an ``(N, C, H, W)`` image that is read region by region: it has ``shape``
(a :class:`torch.Size`), ``dtype`` (a :class:`torch.dtype`), ``ndim == 4``, ``device`` (the CPU) and
``image[:, :, r0:r1, c0:c1]``, which returns a NEW contiguous CPU tensor of shape
``(N, C, r1 - r0, c1 - c0)`` that the caller may write into. Reads are thread-safe (the engine prefetches
the next tile's region in a background thread) and nothing of the size of the image is allocated by the
object itself. The streaming engine accepts such an object wherever it accepts a tensor.

:class:`OrientedImage` applies one of the 8 symmetries of the square (flips and 90-degree rotations) by
mapping the requested region to the base image's region and transforming only that region: nothing is
copied whole (used for augmentation).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["LazyImage", "OrientedImage", "region_of", "is_lazy_image", "adapt_channels", "channels_supported", "orient"]


def is_lazy_image(x: Any) -> bool:
    """True for an object implementing the lazy image protocol (not a tensor); the engine's test."""
    return not isinstance(x, Tensor) and hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


def region_of(index: Any, shape: torch.Size, what: str) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` of an index ``(slice(None), slice(None), rows, cols)`` (or a prefix of it).

    Raises:
        IndexError: anything but full slices over N and C and unit-step slices over rows and columns.
    """
    if not isinstance(index, tuple):
        index = (index,)
    index = index + (slice(None),) * (4 - len(index))
    if len(index) != 4 or not all(isinstance(s, slice) for s in index):
        raise IndexError(f"{what}: a lazy image is indexed as image[:, :, r0:r1, c0:c1] (slices only), got {index!r}")
    n, c, rows, cols = index
    if n != slice(None) or c != slice(None):
        raise IndexError(f"{what}: a lazy image reads all images and channels: index them as [:, :, rows, cols]; "
                         f"got {index!r}")
    if rows.step not in (None, 1) or cols.step not in (None, 1):
        raise IndexError(f"{what}: regions are read with step 1 only, got {index!r}")
    r0, r1, _ = rows.indices(shape[2])
    c0, c1, _ = cols.indices(shape[3])
    return r0, max(r0, r1), c0, max(c0, c1)


class LazyImage:
    """Base of the lazy images: subclasses set ``shape`` and ``dtype`` and implement :meth:`read_region`.

    Attributes:
        shape: ``torch.Size((N, C, H, W))``; H, W in pixels of the chosen level.
        dtype: ``torch.uint8`` for slides.
        path: the file (or a description of the source), used in error messages.
    """

    ndim = 4
    device = torch.device("cpu")
    shape: torch.Size
    dtype: torch.dtype
    path: str = "<image>"

    def read_region(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Rows ``r0:r1`` and columns ``c0:c1`` (pixels of this level) as a new contiguous ``(N, C, h, w)``
        tensor of ``self.dtype``. Thread-safe."""
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Tensor:
        return self.read_region(*region_of(index, self.shape, self.path))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    def read(self) -> Tensor:
        """The whole image as a tensor (allocates ``N*C*H*W`` elements: only for images that fit)."""
        return self.read_region(0, self.shape[2], 0, self.shape[3])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


class OrientedImage(LazyImage):
    """``base`` rotated by ``k`` quarter turns (``torch.rot90(x, k, dims=(2, 3))``) and then, if ``flip``,
    mirrored left-right (``x.flip(3)``): the 8 symmetries of the square, lazily.

    A read of rows ``r0:r1``, columns ``c0:c1`` reads the one corresponding region of ``base`` and
    transforms just that region, so results equal transforming the whole image and slicing it.

    Args:
        base: a lazy image (or a tensor) ``(N, C, H, W)``.
        k: quarter turns counter-clockwise, any int (taken modulo 4), as ``torch.rot90``.
        flip: mirror the columns after rotating.
    """

    def __init__(self, base: Any, k: int = 0, flip: bool = False):
        self.base, self.k, self.flip = base, int(k) % 4, bool(flip)
        n, c, h, w = base.shape
        self.shape = torch.Size((n, c, w, h) if self.k % 2 else (n, c, h, w))
        self.dtype = base.dtype
        self.path = getattr(base, "path", "<tensor>")

    def read_region(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        _, _, height, width = self.shape
        if self.flip:  # x.flip(3)[:, :, rows, c0:c1] == x[:, :, rows, W-c1:W-c0].flip(3)
            c0, c1 = width - c1, width - c0
        # torch.rot90(x, k)[..., i, j] in terms of x (H, W of x = the unrotated base):
        #   k=1: x[..., j, W-1-i]; k=2: x[..., H-1-i, W-1-j]; k=3: x[..., H-1-j, i]
        bh, bw = self.base.shape[2], self.base.shape[3]
        if self.k == 0:
            box = (r0, r1, c0, c1)
        elif self.k == 1:
            box = (c0, c1, bw - r1, bw - r0)
        elif self.k == 2:
            box = (bh - r1, bh - r0, bw - c1, bw - c0)
        else:
            box = (bh - c1, bh - c0, r0, r1)
        region = self.base[:, :, box[0]:box[1], box[2]:box[3]]
        region = torch.rot90(region, self.k, dims=(2, 3)) if self.k else region
        if self.flip:
            region = region.flip(3)
        if self.k or self.flip:
            return region.contiguous()
        return region.clone() if isinstance(self.base, Tensor) else region  # a new tensor, never a view

    def orient(self, x: Tensor) -> Tensor:
        """Apply this view's symmetry to a whole ``(N, C, h, w)`` tensor of the base (e.g. its tissue mask)."""
        return orient(x, self.k, self.flip)


def adapt_channels(x: Tensor, channels: int | None, path: str) -> Tensor:
    """``(N, c, h, w)`` -> ``(N, channels, h, w)``: gray is repeated, alpha dropped (gray+alpha: gray).

    Raises:
        ImageReadError: any other channel count than the model's.
    """
    have = x.shape[1]
    if channels is None or have == channels:
        return x
    if have == 2 and channels in (1, 3):
        x, have = x[:, :1], 1
    if have == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if have == 4 and channels == 3:
        return x[:, :3].contiguous()
    from .errors import ImageReadError

    raise ImageReadError(f"{path}: the image has {have} channels, the model takes {channels}; convert the image")


def channels_supported(have: int, channels: int | None) -> bool:
    """Whether :func:`adapt_channels` can turn ``have`` channels into ``channels``."""
    return channels is None or have == channels or have == 1 or (have == 2 and channels in (1, 3)) \
        or (have == 4 and channels == 3)


def orient(x: Tensor, k: int, flip: bool) -> Tensor:
    """``torch.rot90(x, k, dims=(2, 3))`` then, if ``flip``, ``x.flip(3)``: the symmetry of
    :class:`OrientedImage`, applied to a whole tensor (e.g. a mask)."""
    x = torch.rot90(x, k % 4, dims=(2, 3)) if k % 4 else x
    return x.flip(3) if flip else x
