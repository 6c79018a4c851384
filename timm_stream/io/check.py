"""Integrity checks of image files before training: a truncated download or a corrupt file is reported
up front, naming the file, instead of crashing mid-epoch.

Structural checks (default; they read headers and indexes, not pixels):

* TIFF: tifffile parses every IFD (a truncated IFD chain fails there); every tile/strip of every page,
  SubIFD included, must lie inside the file (offset + byte count <= file size).
* PNG: the chunk chain (length, type, CRC) is walked from the signature to ``IEND``; every chunk must
  lie inside the file.
* JPEG: the marker segments are walked from ``SOI`` to the first ``SOS``; the file must end with the
  ``EOI`` marker (a cut download does not; ``FF D9`` cannot occur inside entropy-coded data).

``decode=True`` decodes every pixel as well (every tile of every pyramid level of a TIFF; Pillow's full
decode, with PNG CRCs, otherwise): slower (it reads the whole file) and catches damaged compressed data.
"""
from __future__ import annotations

import os
import struct

from .errors import ImageReadError
from .open import file_kind

__all__ = ["check_image"]

_FIX = "download or convert it again"
_CANNOT = "cannot read the image:"


def _check_tiff(path: str, size: int, decode: bool) -> None:
    from .tiff import open_tiff

    with open_tiff(path) as tif:
        pages = []
        for series in tif.series:
            for level in series.levels:
                pages.extend(level.pages)
        for page in pages:
            if page is None or not hasattr(page, "dataoffsets"):
                continue
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                if count and (offset <= 0 or offset + count > size):
                    raise ImageReadError(
                        f"{path}: {_CANNOT} the file is truncated or corrupt: tile/strip {index} of the {page.shape} image "
                        f"(page {page.index}) lies at bytes {offset}..{offset + count}, beyond the file's "
                        f"{size} bytes; {_FIX}")
        if decode:
            for page in pages:
                try:
                    for _ in page.segments():
                        pass
                except Exception as exc:  # noqa: BLE001
                    raise ImageReadError(f"{path}: {_CANNOT} the {page.shape} image (page {page.index}) cannot be decoded "
                                         f"({type(exc).__name__}: {exc}); {_FIX}") from exc


def _check_png(path: str, size: int, decode: bool) -> None:
    with open(path, "rb") as f:
        f.seek(8)
        position = 8
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ImageReadError(f"{path}: {_CANNOT} the PNG file is truncated: it ends at byte {position} without the "
                                     f"IEND chunk; {_FIX}")
            length, kind = struct.unpack(">I4s", head)
            end = position + 12 + length
            if end > size:
                raise ImageReadError(f"{path}: {_CANNOT} the PNG file is truncated: its {kind.decode('latin-1')!r} chunk ends "
                                     f"at byte {end}, beyond the file's {size} bytes; {_FIX}")
            if kind == b"IEND":
                break
            f.seek(end)
            position = end


def _check_jpeg(path: str, size: int, decode: bool) -> None:
    with open(path, "rb") as f:
        position = 2
        while True:  # marker segments up to the start of scan
            f.seek(position)
            marker = f.read(4)
            if len(marker) < 4 or marker[0] != 0xFF:
                raise ImageReadError(f"{path}: {_CANNOT} the JPEG file is truncated or corrupt: no valid marker at byte "
                                     f"{position}; {_FIX}")
            if marker[1] == 0xFF:  # fill byte
                position += 1
                continue
            length = struct.unpack(">H", marker[2:])[0]
            position += 2 + length
            if marker[1] == 0xDA:  # SOS: entropy-coded data follows
                break
            if position > size:
                raise ImageReadError(f"{path}: {_CANNOT} the JPEG file is truncated: a header segment ends beyond the file's "
                                     f"{size} bytes; {_FIX}")
        f.seek(max(position, size - 64))
        tail = f.read().rstrip(b"\x00")  # some writers pad after EOI
        if not tail.endswith(b"\xff\xd9"):
            raise ImageReadError(f"{path}: {_CANNOT} the JPEG file is truncated: it does not end with the end-of-image "
                                 f"marker (FF D9); {_FIX}")


def check_image(path: str | os.PathLike, *, decode: bool = False) -> None:
    """Raise :class:`ImageReadError` (naming ``path``, the problem and the fix) if the TIFF/PNG/JPEG file is
    truncated or corrupt; see the module docstring for what is checked. Other formats: no check.

    Args:
        decode: also decode every pixel (slow: reads the whole file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found")
    size = os.path.getsize(path)
    kind = file_kind(path)
    try:
        if kind == "tiff":
            _check_tiff(path, size, decode)
        elif kind == "png":
            _check_png(path, size, decode)
        elif kind == "jpeg":
            _check_jpeg(path, size, decode)
        if decode and kind in ("png", "jpeg"):
            from .pil import open_pil

            with open_pil(path) as img:
                img.load()
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, name the file
        raise ImageReadError(f"{path}: {_CANNOT} the file is corrupt or truncated ({type(exc).__name__}: {exc}); {_FIX}") from exc
