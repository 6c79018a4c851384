"""Truncated and corrupt files are reported before training, each naming its file: cheap structural checks
by default (TIFF tiles and IFDs inside the file, PNG chunk chain, JPEG end marker), every pixel decoded
with ``decode=True`` / ``check="decode"``."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

tifffile = pytest.importorskip("tifffile")

from slide_files import slide_pixels, write_ome_subifds, write_svs  # noqa: E402
from timm_stream.io import ImageReadError, check_image, open_image  # noqa: E402
from timm_stream.lightning import DataValidationError, LargeImageDataModule  # noqa: E402

IMG = slide_pixels(400, 520)
FRACTIONS = (0.2, 0.5, 0.8, 0.95, 0.999)  # where the download was cut


def _pyramid(path):
    with tifffile.TiffWriter(path) as tif:  # pages, each level flagged reduced (as libvips writes them)
        for k, step in enumerate((1, 2, 4)):
            tif.write(IMG[::step, ::step], tile=(64, 64), photometric="rgb", compression="zlib",
                      subfiletype=1 if k else 0, metadata=None)
    return path


WRITERS = {
    "pyramid.tif": _pyramid,
    "slide.svs": lambda p: write_svs(p, IMG),
    "ome.ome.tif": lambda p: write_ome_subifds(p, IMG),
    "photo.png": lambda p: Image.fromarray(IMG).save(p) or p,
    "photo.jpg": lambda p: Image.fromarray(IMG).save(p, quality=90) or p,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_truncated_files_are_reported_naming_the_file(tmp_path, name):
    good = tmp_path / name
    WRITERS[name](good)
    check_image(good)
    check_image(good, decode=True)
    data = good.read_bytes()
    for fraction in FRACTIONS:
        cut = tmp_path / f"cut{int(fraction * 1000)}_{name}"
        cut.write_bytes(data[:int(len(data) * fraction)])
        with pytest.raises(ImageReadError, match=rf"{cut.name}: cannot read the image.*(truncated|corrupt)"
                                                 r".*download or convert it again"):
            check_image(cut)


def test_vips_pyramid_cut_in_its_ifds(tmp_path):
    """libvips writes each level's tiles before its IFD: a cut there loses levels silently in tifffile
    (a warning only); we turn it into an error."""
    pyvips = pytest.importorskip("pyvips", reason="libvips (pyvips-binary) has no wheel for this platform")
    from slide_files import write_vips_jpeg_pyramid

    good = write_vips_jpeg_pyramid(tmp_path / "v.tif", slide_pixels())
    data = good.read_bytes()
    assert pyvips.Image.new_from_file(str(good), page=3).width > 0
    cut = tmp_path / "cut.tif"
    for missing in (8, 300, 2000, len(data) // 50):  # the last level's IFD is at the end of the file
        cut.write_bytes(data[:len(data) - missing])
        with pytest.raises(ImageReadError, match=r"cut\.tif: cannot read the image: the TIFF structure is broken"):
            check_image(cut)
        with pytest.raises(ImageReadError, match=r"cut\.tif: .*truncated or corrupt"):
            open_image(cut)  # not a pyramid with one level fewer


def test_corrupt_tile_needs_decode(tmp_path):
    """Bytes damaged inside a tile keep the structure valid: only the full decode finds them; a read of that
    tile names the file too."""
    path = _pyramid(tmp_path / "bad.tif")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(path.read_bytes())
    data[offset + 2:offset + count - 2] = np.random.default_rng(0).integers(0, 256, count - 4, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    check_image(path)
    with pytest.raises(ImageReadError, match=r"bad\.tif: cannot read the image: the \(400, 520, 3\) image .*cannot be "
                                             r"decoded"):
        check_image(path, decode=True)
    with pytest.raises(ImageReadError, match=r"bad\.tif: tile/strip 3 of level 0 cannot be decoded"):
        open_image(path)[:, :, 0:64, 192:256]
    assert open_image(path)[:, :, 0:64, 0:64].shape == (1, 3, 64, 64)  # other tiles still read


def test_datamodule_reports_every_corrupt_file_before_training(tmp_path):
    rows = []
    for i, name in enumerate(WRITERS):
        good = WRITERS[name](tmp_path / f"ok_{name}")
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
        rows += [(good.name, i % 2, "train"), (cut.name, i % 2, "train")]  # (across splits: h-hard's 10.7)
    with open(tmp_path / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split")] + rows)
    data = LargeImageDataModule(csv=str(tmp_path / "data.csv"), num_classes=2, num_workers=0, level=0)
    with pytest.raises(DataValidationError) as info:
        data.setup("fit")
    message = str(info.value)
    for name in WRITERS:
        assert f"cut_{name}" in message and f"ok_{name}" not in message, message
    # full decode as an option: the damaged tile of a structurally valid file is found up front too
    bad = _pyramid(tmp_path / "tile.tif")
    with tifffile.TiffFile(bad) as tif:
        offset = tif.pages[0].dataoffsets[0]
    raw = bytearray(bad.read_bytes())
    raw[offset + 2:offset + 40] = b"\xff" * 38
    bad.write_bytes(bytes(raw))
    with open(tmp_path / "one.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), ("tile.tif", 0), ("ok_photo.png", 1)])
    LargeImageDataModule(csv=str(tmp_path / "one.csv"), num_classes=2, num_workers=0).setup("fit")
    with pytest.raises(DataValidationError, match=r"tile\.tif: cannot read the image.*cannot be decoded"):
        LargeImageDataModule(csv=str(tmp_path / "one.csv"), num_classes=2, num_workers=0, check="decode").setup("fit")
    assert torch.is_tensor(open_image(tmp_path / "ok_photo.png").read())
