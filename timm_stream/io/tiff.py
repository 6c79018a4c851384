"""TIFF slides through tifffile: pyramid levels, microns per pixel, region reads tile by tile.

Levels are those of tifffile's first image series (``TiffFile.series[0].levels``): SubIFD pyramids
(libvips ``subifd=True``, OME-TIFF), pages flagged as reduced-resolution copies of level 0 (libvips
``pyramid=True``), and the vendor layouts tifffile parses (Aperio SVS, Hamamatsu NDPI, Philips, ...).
Label, macro and thumbnail images are separate series in tifffile and are never levels (as in OpenSlide),
nor is any page of another aspect ratio. Microns per pixel come from tifffile's own metadata parsers:
the Aperio ImageDescription (``MPP``), the OME-XML ``PhysicalSizeX``, else the resolution tags
(``XResolution`` with ``ResolutionUnit`` inch or centimeter).

Reads decode only the tiles (or strips) a region touches, through the page's own decoder
(``TiffPage.decode``, the codecs of ``imagecodecs``), with a small cache of decoded tiles because
neighbouring engine tiles overlap by their halo.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import ImageReadError
from .image import LazyImage, adapt_channels, channels_supported
from .levels import choose_level, level_mpp

__all__ = ["TiffImage", "pyramid_levels", "tiff_mpp", "open_tiff", "TIFF_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".tf2", ".scn", ".bif", ".qptiff")


# tifffile logs a broken structure as an error (an IFD chain or tag beyond the end of the file: pages and
# with them pyramid levels are lost, or tags such as JPEGTables) and an unreadable SubIFD as a warning.
_BROKEN = ("series raised",)


class _Collect(logging.Handler):
    """tifffile's errors (and SubIFD warnings) logged in this thread: a broken IFD chain is logged, not
    raised, and the pages after it silently vanish, with them pyramid levels."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread, self.messages = threading.get_ident(), []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and (record.levelno >= logging.ERROR
                                             or any(p in record.getMessage() for p in _BROKEN)):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def open_tiff(path: str) -> Iterator[Any]:
    """``tifffile.TiffFile(path)``, fully parsed (every page and series); tifffile's warnings about the
    file's structure (an IFD offset beyond the end: a truncated download) become an
    :class:`ImageReadError` naming the file and the fix."""
    import tifffile

    collect = _Collect()
    logger = logging.getLogger("tifffile")
    logger.addHandler(collect)
    try:
        tif = tifffile.TiffFile(path)
        try:
            tif.series  # noqa: B018 - parses every page (and SubIFD) now, under the handler
        except BaseException:
            tif.close()
            raise
    finally:
        logger.removeHandler(collect)
    try:
        broken = collect.messages
        if broken:
            raise ImageReadError(f"{path}: cannot read the image: the TIFF structure is broken ({broken[0]}); the "
                                 "file is truncated or corrupt: download or convert it again")
        yield tif
    finally:
        tif.close()


def _spatial(series, path: str) -> tuple[int, int, int]:
    """(H, W, C) of a tifffile series; refuses stacks, volumes and time series."""
    dims = dict(zip(series.axes, series.shape))
    if "Y" not in dims or "X" not in dims:
        raise ImageReadError(f"{path}: TIFF series has axes '{series.axes}' without Y and X; it is not an image")
    extra = [a for a in series.axes if a not in "YXS" and dims[a] != 1]
    if extra:
        raise ImageReadError(f"{path}: TIFF series has axes '{series.axes}' with shape {tuple(series.shape)}; only "
                             "2-D images with interleaved samples (Y, X, S: gray or RGB) are read; save one plane per "
                             "file, RGB interleaved (e.g. vips tiffsave in.tif out.tif --tile --pyramid)")
    return int(dims["Y"]), int(dims["X"]), int(dims.get("S", 1))


def _same_aspect(h0: int, w0: int, h: int, w: int) -> bool:
    """A reduced copy of an (h0, w0) image: the height follows from the width's downsample within
    rounding (each side was divided and rounded, up or down)."""
    down = w0 / w
    return abs(h - h0 / down) <= 1 + h0 / down * 1e-3 and h <= h0 and w <= w0


def pyramid_levels(tif, path: str) -> list:
    """The pyramid levels of an open ``tifffile.TiffFile``, finest first (``TiffPageSeries``).

    Only the first series' levels, and among them only reduced copies of level 0 (same aspect within
    rounding). Raises :class:`ImageReadError` for a file without images or with stacks/volumes.
    """
    if not tif.series:
        raise ImageReadError(f"{path}: the TIFF file has no image (truncated or corrupt?): download or convert it "
                             "again")
    levels = list(tif.series[0].levels)
    h0, w0, _ = _spatial(levels[0], path)
    kept = [levels[0]]
    for series in levels[1:]:
        h, w, _ = _spatial(series, path)
        if _same_aspect(h0, w0, h, w) and w < kept[-1].shape[list(kept[-1].axes).index("X")]:
            kept.append(series)
    return kept


def tiff_mpp(tif) -> float | None:
    """Microns per pixel of level 0 from tifffile's metadata parsers (None: unknown)."""
    import tifffile

    page = tif.pages.first
    try:
        if tif.is_svs:
            # tifffile's Aperio parser; public in the tifffile.tifffile module only
            value = tifffile.tifffile.svs_description_metadata(page.description).get("MPP")
            if value:
                return float(value)
        if tif.is_ome and tif.ome_metadata:
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
            size = pixels.get("PhysicalSizeX")
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
            if size and scale:
                return float(size) * scale
    except Exception:  # noqa: BLE001 - odd vendor metadata means "unknown", not a crash
        pass
    try:
        unit = int(page.resolutionunit)
        x_res = page.get_resolution()[0]
    except Exception:  # noqa: BLE001
        return None
    if not x_res or unit not in (2, 3):  # 2: inch, 3: centimeter; 1 (none) states no physical size
        return None
    return (25400.0 if unit == 2 else 10000.0) / float(x_res)


class TiffImage(LazyImage):
    """One pyramid level of a TIFF slide as a lazy ``(1, C, H, W)`` uint8 image (see :mod:`.image`).

    Args:
        path: the file.
        level, mpp: which level (see :func:`~timm_stream.io.levels.choose_level`).
        channels: channels to return (gray repeated, alpha dropped); default: the file's.
        cache_bytes: decoded tiles kept per image (bytes), for the overlap of neighbouring reads.

    Attributes:
        level: the level chosen; ``level_shapes``: ``(H, W)`` of every level; ``mpp``: microns per pixel
            of the chosen level (None: unknown); ``mpp0``: of level 0.

    Raises:
        ImageReadError: not a TIFF, no image, a stack/volume, a codec that is not installed, pixels that
            are not uint8, a level that does not exist, an mpp finer than level 0.
    """

    def __init__(self, path: str | os.PathLike, level: int | None = None, mpp: float | None = None,
                 channels: int | None = None, cache_bytes: int = 32 << 20):
        import tifffile

        self.path = os.fspath(path)
        try:
            with open_tiff(self.path) as tif:
                levels = pyramid_levels(tif, self.path)
                self.level_shapes = [_spatial(s, self.path)[:2] for s in levels]
                self.mpp0 = tiff_mpp(tif)
                self.level = choose_level(self.level_shapes, self.mpp0, self.path, level, mpp)
                height, width, samples = _spatial(levels[self.level], self.path)
                page = levels[self.level].keyframe
                if page.compression not in tifffile.TIFF.DECOMPRESSORS:
                    raise ImageReadError(f"{self.path}: TIFF compression {page.compression!r} needs a codec that "
                                         "is not installed: pip install imagecodecs")
                if levels[self.level].dtype != np.uint8:
                    raise ImageReadError(f"{self.path}: pixels are {levels[self.level].dtype}, not uint8; "
                                         "convert the image to 8 bits")
        except (ImageReadError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever tifffile says, name the file
            raise ImageReadError(f"{self.path}: cannot read the TIFF structure ({type(exc).__name__}: {exc})") from exc
        if not channels_supported(samples, channels):
            raise ImageReadError(f"{self.path}: the image has {samples} channels, the model takes {channels}")
        self.samples = samples
        self.mpp = level_mpp(self.mpp0, self.level_shapes)[self.level]
        self.shape = torch.Size((1, channels or samples, height, width))
        self.dtype = torch.uint8
        self.channels = channels
        self.cache_bytes = cache_bytes
        self._state_reset()

    # ------------------------------------------------------------------ opening (per process)
    def _state_reset(self) -> None:
        self._lock = threading.Lock()
        self._tif = None
        self._page = None
        self._pid = None
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cached = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_lock", "_tif", "_page", "_pid", "_cache", "_cached"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._state_reset()

    def _open(self):
        """The level's page, the file opened once per process (forked workers reopen it)."""
        import tifffile

        if self._page is None or self._pid != os.getpid():
            tif = tifffile.TiffFile(self.path)
            levels = pyramid_levels(tif, self.path)
            if [_spatial(s, self.path)[:2] for s in levels] != self.level_shapes:
                tif.close()
                raise ImageReadError(f"{self.path}: the file changed since it was opened; open it again")
            self._tif, self._page, self._pid = tif, levels[self.level].keyframe, os.getpid()
            self._cache.clear()
            self._cached = 0
        return self._page

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
            self._tif = self._page = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ reading
    def _segment(self, page, index: int):
        """Decoded segment ``index`` as (array (depth, h, w, s) or None if empty, position (s, d, y, x, 0))."""
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            fh = self._tif.filehandle
            if count:
                fh.seek(offset)
                data = fh.read(count)
                if len(data) != count:
                    raise ImageReadError(f"{self.path}: the file is truncated: tile/strip {index} of level "
                                         f"{self.level} lies beyond its end; download or convert it again")
            else:
                data = None
        kwargs = {}
        if page.compression in (6, 7, 34892, 33007):  # JPEG: shared tables, NDPI headers
            kwargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        try:
            array, position, _ = page.decode(data, index, _fullsize=page.is_tiled, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(f"{self.path}: tile/strip {index} of level {self.level} cannot be decoded "
                                 f"({type(exc).__name__}: {exc}); the file is corrupt: download or convert it "
                                 "again") from exc
        result = (array, position)
        with self._lock:
            self._cache[index] = result
            self._cached += 0 if array is None else array.nbytes
            while self._cached > self.cache_bytes and len(self._cache) > 1:
                _, (old, _) = self._cache.popitem(last=False)
                self._cached -= 0 if old is None else old.nbytes
        return result

    def read_region(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        with self._lock:
            page = self._open()
        height, width = self.shape[2], self.shape[3]
        out = np.zeros((r1 - r0, c1 - c0, self.samples), dtype=np.uint8)
        if r1 > r0 and c1 > c0:
            seg_h, seg_w = page.chunks[0], page.chunks[1]  # tile (or strip) length and width in pixels
            per_x = math.ceil(width / seg_w)
            per_plane = math.ceil(height / seg_h) * per_x
            planes = self.samples if page.planarconfig == 2 else 1
            for plane in range(planes):
                for sy in range(r0 // seg_h, (r1 - 1) // seg_h + 1):
                    for sx in range(c0 // seg_w, (c1 - 1) // seg_w + 1):
                        array, position = self._segment(page, plane * per_plane + sy * per_x + sx)
                        if array is None:
                            continue  # an empty tile reads as 0, as in tifffile
                        y, x = sy * seg_h, sx * seg_w
                        ya, yb = max(r0, y), min(r1, y + array.shape[1])
                        xa, xb = max(c0, x), min(c1, x + array.shape[2])
                        block = array[0, ya - y:yb - y, xa - x:xb - x]
                        if planes > 1:
                            out[ya - r0:yb - r0, xa - c0:xb - c0, plane] = block[..., 0]
                        else:
                            out[ya - r0:yb - r0, xa - c0:xb - c0] = block
        tensor = torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0).contiguous()
        return adapt_channels(tensor, self.channels, self.path)

    # ------------------------------------------------------------------ other levels
    def at_level(self, level: int) -> "TiffImage":
        """The same file at another level (e.g. the smallest, for a tissue mask)."""
        return TiffImage(self.path, level=level, channels=self.channels, cache_bytes=self.cache_bytes)
