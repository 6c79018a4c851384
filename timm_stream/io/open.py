"""``open_image``: a file as a lazy image, the backend chosen by what can read it."""
from __future__ import annotations

import os

from .errors import ImageReadError
from .image import LazyImage
from .openslide_backend import OPENSLIDE_HINT, OpenSlideImage, openslide_available
from .pil import PILImage
from .tiff import TiffImage

__all__ = ["open_image", "file_kind", "is_slide_file", "BACKENDS"]

BACKENDS = ("auto", "tifffile", "openslide", "tiffslide", "pil")
_MAGIC = {b"II*\x00": "tiff", b"MM\x00*": "tiff", b"II+\x00": "tiff", b"MM\x00+": "tiff",
          b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg"}


def file_kind(path: str) -> str | None:
    """'tiff', 'png', 'jpeg' from the file's first bytes (not its name), else None."""
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def _openslide_reads(path: str) -> bool:
    if not openslide_available():
        return False
    import openslide

    return bool(openslide.OpenSlide.detect_format(path))


def _pil_reads(path: str) -> bool:
    """Pillow identifies the format (BMP, GIF, WebP, ...) from the header."""
    try:
        from .pil import open_pil

        with open_pil(path):
            return True
    except Exception:  # noqa: BLE001 - UnidentifiedImageError and friends: not an image Pillow reads
        return False


def is_slide_file(path: str) -> bool:
    """Whether ``path`` is read region by region (a TIFF, or a format OpenSlide reads), as opposed to the
    single-resolution formats Pillow decodes whole (PNG, JPEG, BMP, ...)."""
    kind = file_kind(path)
    return kind == "tiff" or (kind is None and _openslide_reads(path))


def open_image(path: str | os.PathLike, level: int | None = None, mpp: float | None = None,
               backend: str = "auto", channels: int | None = None) -> LazyImage:
    """Open an image file as a lazy ``(1, C, H, W)`` uint8 image: nothing but metadata is read here;
    ``image[:, :, r0:r1, c0:c1]`` reads (and decodes) only that region of the chosen level.

    Args:
        path: a TIFF slide (tiled/pyramidal TIFF, Aperio SVS, Hamamatsu NDPI, OME-TIFF, ... through
            tifffile), any format OpenSlide reads (MIRAX, VMS, SCN, ... with ``backend="openslide"`` or
            ``"auto"``), or a PNG/JPEG (Pillow; decoded whole on the first read).
        level: pyramid level, 0 = full resolution, negative from the smallest. Default 0.
        mpp: instead of ``level``: the level closest to this many microns per pixel (from the file's
            metadata: Aperio ``MPP``, OME ``PhysicalSizeX``, resolution tags, ``openslide.mpp-x``).
        backend: ``"auto"`` (tifffile for TIFF files, Pillow for PNG/JPEG, OpenSlide for the rest when
            installed), ``"tifffile"``, ``"openslide"``, ``"tiffslide"``, ``"pil"``.
        channels: channels to return (gray repeated, alpha dropped). Default: the file's.

    Returns:
        A :class:`~timm_stream.io.image.LazyImage` with ``shape`` ``(1, C, H, W)`` (pixels of the level),
        ``dtype`` ``torch.uint8``, and ``level``, ``level_shapes``, ``mpp`` (microns per pixel of the level,
        None if unknown).

    Raises:
        ImageReadError: file not found; a format no installed backend reads (the message says what to
            install or how to convert); a backend that is not installed; a level that does not exist; an
            mpp finer than level 0 or asked of a file without resolution; a missing codec.
        ValueError: both ``level`` and ``mpp``; an unknown backend.
    """
    path = os.fspath(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found")
    if backend in ("openslide", "tiffslide"):
        return OpenSlideImage(path, level, mpp, channels=channels, backend=backend)
    kind = file_kind(path)
    if backend == "tifffile" or (backend == "auto" and kind == "tiff"):
        if kind != "tiff":
            raise ImageReadError(f"{path}: not a TIFF file (backend='tifffile'); use backend='auto'")
        return TiffImage(path, level, mpp, channels=channels)
    if backend == "pil" or (backend == "auto" and kind in ("png", "jpeg")):
        if level not in (None, 0, -1) or mpp is not None:
            raise ImageReadError(f"{path}: level/mpp apply to pyramidal slide files only; this image has one "
                                 "resolution: drop level/mpp or convert it to a pyramidal TIFF")
        return PILImage(path, channels=channels)
    if _openslide_reads(path):
        return OpenSlideImage(path, level, mpp, channels=channels)
    if backend == "auto" and _pil_reads(path):
        return open_image(path, level, mpp, backend="pil", channels=channels)
    if openslide_available():
        raise ImageReadError(f"{path}: unsupported image format (neither TIFF, PNG, JPEG nor a format OpenSlide "
                             "reads); convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)")
    raise ImageReadError(f"{path}: unsupported image format for the installed readers (TIFF, PNG, JPEG); slide "
                         f"formats such as MRXS, VMS or SCN need OpenSlide: {OPENSLIDE_HINT}")
