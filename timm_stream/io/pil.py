"""PNG, JPEG and other single-resolution formats through Pillow, behind the lazy image protocol.

These formats cannot be read by region: the first read decodes the whole image once and keeps it
(fine for the photo-sized images they hold; store slides as tiled TIFF).
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch
from torch import Tensor

from .errors import ImageReadError
from .image import LazyImage, adapt_channels, channels_supported

__all__ = ["PILImage", "open_pil", "PIL_CHANNELS"]

PIL_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4, "P": 3, "LA": 2, "CMYK": 3, "YCbCr": 3, "RGBX": 4}


def open_pil(path: str):
    """``PIL.Image.open`` without the decompression-bomb refusal (large images are the point)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_pil(path: str) -> np.ndarray:
    """The whole image as uint8 ``(H, W, c)`` (c in 1, 2, 3, 4)."""
    with open_pil(path) as img:
        if img.mode not in ("L", "RGB", "RGBA", "LA"):
            if img.mode not in PIL_CHANNELS:
                raise ImageReadError(f"{path}: image mode '{img.mode}' is not 8-bit; convert it to 8-bit RGB "
                                     "or grayscale")
            img = img.convert("RGB")
        array = np.asarray(img)
    return array[:, :, None] if array.ndim == 2 else array


class PILImage(LazyImage):
    """A PNG/JPEG/... file as a lazy ``(1, C, H, W)`` uint8 image; decoded whole on the first read.

    Raises:
        ImageReadError: unreadable header, a mode that is not 8-bit, unusable channels.
    """

    def __init__(self, path: str | os.PathLike, channels: int | None = None):
        self.path = os.fspath(path)
        try:
            with open_pil(self.path) as img:
                if img.mode not in PIL_CHANNELS:
                    raise ImageReadError(f"{self.path}: image mode '{img.mode}' is not 8-bit; convert it to 8-bit "
                                         "RGB or grayscale")
                width, height = img.size
                have = PIL_CHANNELS[img.mode]
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(f"{self.path}: cannot read the image header ({type(exc).__name__}: {exc})") from exc
        if not channels_supported(have, channels):
            raise ImageReadError(f"{self.path}: the image has {have} channels, the model takes {channels}")
        self.channels = channels
        self.level, self.level_shapes, self.mpp, self.mpp0 = 0, [(height, width)], None, None
        self.shape = torch.Size((1, channels or have, height, width))
        self.dtype = torch.uint8
        self._lock = threading.Lock()
        self._array = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_array")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._array = threading.Lock(), None

    def read_region(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        with self._lock:
            if self._array is None:
                try:  # kept as a (1, c, H, W) tensor; reads clone their region (the caller may write)
                    self._array = torch.from_numpy(decode_pil(self.path).copy()).permute(2, 0, 1)[None].contiguous()
                except ImageReadError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise ImageReadError(f"{self.path}: cannot read the image ({type(exc).__name__}: {exc}); "
                                         "the file is corrupt or truncated: download or convert it again") from exc
        return adapt_channels(self._array[:, :, r0:r1, c0:c1].clone(), self.channels, self.path)
