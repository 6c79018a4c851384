"""Small slide files for the io tests, written the way real pipelines write them: libvips (JPEG tiled
pyramid with reduced-resolution pages; deflate SubIFD pyramid) and tifffile (Aperio SVS layout with
thumbnail, label and macro pages; OME-TIFF with SubIFDs; a single-resolution slide followed by a label
photo). Every level has texture (a gradient plus noise blocks), so a wrong tile or offset shows."""
from __future__ import annotations

from pathlib import Path

import numpy as np

H, W = 1200, 1600  # level 0, pixels
SVS_MPP, VIPS_MPP, SUBIFD_MPP, OME_MPP, SINGLE_MPP = 0.499, 0.5, 0.25, 0.3, 0.5
APERIO = "Aperio Image Library v12.0.15 \n"


def slide_pixels(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): smooth gradients (JPEG-friendly) with noisy blocks (tile-boundary detectors)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + 2 * yy) % 256], -1).astype(np.uint8)
    bh, bw = min(150, height // 3), min(180, width // 3)
    for _ in range(6):
        r, c = rng.integers(0, height - bh), rng.integers(0, width - bw)
        img[r:r + bh, c:c + bw] = rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8)
    return img


def _vips(array: np.ndarray):
    import pyvips

    array = np.ascontiguousarray(array)
    return pyvips.Image.new_from_memory(array.data, array.shape[1], array.shape[0], array.shape[2], "uchar")


def write_vips_jpeg_pyramid(path: Path, img: np.ndarray) -> Path:
    """libvips ``tiffsave(tile, pyramid, compression=jpeg)``: levels as reduced-resolution pages."""
    _vips(img).tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=90, tile_width=256,
                        tile_height=256, xres=1000 / VIPS_MPP, yres=1000 / VIPS_MPP, resunit="cm")
    return path


def write_vips_subifd_pyramid(path: Path, img: np.ndarray) -> Path:
    """libvips ``tiffsave(tile, pyramid, subifd=True, compression=deflate)`` (resolution in px/mm)."""
    _vips(img).tiffsave(str(path), tile=True, pyramid=True, subifd=True, compression="deflate", tile_width=128,
                        tile_height=128, xres=1000 / SUBIFD_MPP, yres=1000 / SUBIFD_MPP)
    return path


def write_svs(path: Path, img: np.ndarray, seed: int = 1) -> Path:
    """Aperio SVS layout: baseline (JPEG tiles; MPP in the ImageDescription, no resolution tags), thumbnail
    (stripped), a 4x reduced level (tiled), label (stripped, reduced flag) and macro (stripped, flags 9)."""
    import tifffile

    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    desc = f"{APERIO}{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = {SVS_MPP}|Filename = test"
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(256, 256), photometric="rgb", compression="jpeg", description=desc, metadata=None)
        thumb = np.ascontiguousarray(img[::8, ::8])
        tif.write(thumb, photometric="rgb", description=f"{APERIO}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - ",
                  metadata=None)
        level = np.ascontiguousarray(img[::4, ::4])
        tif.write(level, tile=(256, 256), photometric="rgb", compression="jpeg",
                  description=f"{APERIO}{w}x{h} -> {level.shape[1]}x{level.shape[0]} - ", metadata=None)
        tif.write(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8), photometric="rgb", subfiletype=1,
                  description=f"{APERIO}label 700x300", metadata=None)
        tif.write(rng.integers(0, 256, (400, 1200, 3), dtype=np.uint8), photometric="rgb", subfiletype=9,
                  description=f"{APERIO}macro 1200x400", metadata=None)
    return path


def write_ome_subifds(path: Path, img: np.ndarray) -> Path:
    """OME-TIFF, levels 2x and 4x as SubIFDs (zlib), PhysicalSizeX in the OME-XML (no resolution tags)."""
    import tifffile

    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(img, tile=(256, 256), subifds=2, photometric="rgb", compression="zlib",
                  metadata={"axes": "YXS", "PhysicalSizeX": OME_MPP, "PhysicalSizeY": OME_MPP})
        tif.write(img[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")
        tif.write(img[::4, ::4], tile=(128, 128), subfiletype=1, photometric="rgb", compression="zlib")
    return path


def write_single_with_label(path: Path, img: np.ndarray, reduced_label: bool = False, seed: int = 2) -> Path:
    """A single-resolution tiled slide followed by a 300x700 label photo (issue 10.5). ``reduced_label``:
    the label page even carries the reduced-resolution flag (its aspect still gives it away)."""
    import tifffile

    rng = np.random.default_rng(seed)
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(256, 256), photometric="rgb", resolution=(1e4 / SINGLE_MPP, 1e4 / SINGLE_MPP),
                  resolutionunit="CENTIMETER", metadata=None)
        tif.write(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8), photometric="rgb", metadata=None,
                  subfiletype=1 if reduced_label else 0)
    return path


def write_all(folder: Path) -> dict[str, Path]:
    """Every kind above in ``folder``, from one image."""
    img = slide_pixels()
    return {
        "vips_jpeg": write_vips_jpeg_pyramid(folder / "vips_jpeg.tif", img),
        "vips_subifd": write_vips_subifd_pyramid(folder / "vips_subifd.tif", img),
        "svs": write_svs(folder / "slide.svs", img),
        "ome": write_ome_subifds(folder / "slide.ome.tif", img),
        "single_label": write_single_with_label(folder / "single_label.tif", img),
    }
