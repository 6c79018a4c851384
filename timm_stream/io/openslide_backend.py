"""Slides through OpenSlide (``pip install openslide-python openslide-bin``): the formats tifffile does not
read (MIRAX .mrxs, Hamamatsu .vms/.vmu, Leica .scn, Ventana .bif, Sakura .svslide, DICOM, ...), with the
same lazy region protocol and level/mpp semantics as :class:`~timm_stream.io.tiff.TiffImage`.

OpenSlide addresses regions in level-0 coordinates; a read of level ``k`` pixels ``(r, c)`` asks for the
level-0 point ``(round(c * downsample_k), round(r * downsample_k))``. Where a level's downsample is not an
integer (e.g. 1500 px over 187 px: 8.02), that point is a fraction of a level pixel off and OpenSlide
interpolates between pixels; the tifffile backend returns the level's stored pixels. Pixels OpenSlide
returns (partly) transparent, outside the scanned area of e.g. MIRAX slides, are composited onto the
slide's background colour (``openslide.background-color``, default white), as OpenSlide recommends.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch
from torch import Tensor

from .errors import ImageReadError
from .image import LazyImage, adapt_channels, channels_supported
from .levels import choose_level, level_mpp

__all__ = ["OpenSlideImage", "openslide_available", "composite", "OPENSLIDE_HINT"]

OPENSLIDE_HINT = "pip install openslide-python openslide-bin"


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # OSError: the Python package without the C library
        return False
    return True


# backend name -> (module, slide class, mpp property, install hint); tiffslide mirrors OpenSlide's API
_BACKENDS = {
    "openslide": ("openslide", "OpenSlide", "openslide.mpp-x", OPENSLIDE_HINT),
    "tiffslide": ("tiffslide", "TiffSlide", "tiffslide.mpp-x", "pip install tiffslide"),
}


def _slide_class(backend: str, path: str):
    import importlib

    module, cls, _, hint = _BACKENDS[backend]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, OSError) as exc:  # OSError: the Python package without the C library
        raise ImageReadError(f"{path}: backend='{backend}' needs {module}, which is not installed "
                             f"({type(exc).__name__}: {exc}): {hint}") from exc


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``(h, w, 4)`` RGBA (not premultiplied, as openslide-python returns it) over an opaque
    ``background`` -> uint8 ``(h, w, 3)``; opaque pixels are returned unchanged."""
    alpha = rgba[:, :, 3:]
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[:, :, :3])
    a = alpha.astype(np.float32) / 255
    out = rgba[:, :, :3] * a + np.asarray(background, np.float32) * (1 - a)
    return np.rint(out).astype(np.uint8)


class OpenSlideImage(LazyImage):
    """One level of a slide read through OpenSlide (or tiffslide, ``backend="tiffslide"``), as a lazy
    ``(1, 3, H, W)`` uint8 image (RGB).

    Attributes and errors as :class:`~timm_stream.io.tiff.TiffImage`; mpp from ``openslide.mpp-x``.
    Raises :class:`ImageReadError` naming the install command when the backend is not installed.
    """

    def __init__(self, path: str | os.PathLike, level: int | None = None, mpp: float | None = None,
                 channels: int | None = None, backend: str = "openslide"):
        self.path = os.fspath(path)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
        self.backend = backend
        try:
            slide = _slide_class(backend, self.path)(self.path)
        except Exception as exc:  # noqa: BLE001 - OpenSlideUnsupportedFormatError, OpenSlideError
            raise ImageReadError(f"{self.path}: OpenSlide cannot read this file ({type(exc).__name__}: {exc}); "
                                 "convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)") from exc
        try:
            self.level_shapes = [(h, w) for w, h in slide.level_dimensions]
            value = slide.properties.get(_BACKENDS[backend][2])
            self.mpp0 = float(value) if value else None
            colour = slide.properties.get("openslide.background-color") or "FFFFFF"
            self.background = tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))
            self.downsamples = list(slide.level_downsamples)
        finally:
            slide.close()
        self.level = choose_level(self.level_shapes, self.mpp0, self.path, level, mpp)
        if not channels_supported(3, channels):
            raise ImageReadError(f"{self.path}: the slide is RGB (3 channels), the model takes {channels}")
        self.mpp = level_mpp(self.mpp0, self.level_shapes)[self.level]
        height, width = self.level_shapes[self.level]
        self.shape = torch.Size((1, channels or 3, height, width))
        self.dtype = torch.uint8
        self.channels = channels
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._slide, self._pid = None, None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_slide", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def read_region(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        with self._lock:  # one OpenSlide handle per process; OpenSlide itself is thread-safe
            if self._slide is None or self._pid != os.getpid():
                self._slide, self._pid = _slide_class(self.backend, self.path)(self.path), os.getpid()
            slide = self._slide
        down = self.downsamples[self.level]
        if r1 <= r0 or c1 <= c0:
            return torch.zeros((1, self.shape[1], r1 - r0, c1 - c0), dtype=torch.uint8)
        rgba = np.asarray(slide.read_region((round(c0 * down), round(r0 * down)), self.level, (c1 - c0, r1 - r0)))
        rgb = composite(rgba, self.background)
        # tiffslide hands back read-only arrays; the region returned must be the caller's to write into
        rgb = torch.from_numpy(np.require(rgb, requirements="W")).permute(2, 0, 1).unsqueeze(0).contiguous()
        return adapt_channels(rgb, self.channels, self.path)

    def at_level(self, level: int) -> "OpenSlideImage":
        return OpenSlideImage(self.path, level=level, channels=self.channels, backend=self.backend)
