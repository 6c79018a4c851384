"""Which pages are pyramid levels, level/mpp choice, and the errors of ``open_image`` (each names the file
and the fix). Files written with tifffile only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip("tifffile")

from slide_files import SINGLE_MPP, SVS_MPP, slide_pixels, write_ome_subifds, write_single_with_label, write_svs  # noqa: E402
from timm_stream import open_image  # noqa: E402
from timm_stream.io import ImageReadError  # noqa: E402
from timm_stream.lightning import read_image, read_image_info  # noqa: E402

IMG = slide_pixels(600, 800)


@pytest.mark.parametrize("reduced_label", [False, True], ids=["plain-label", "label-flagged-reduced"])
def test_label_photo_after_a_single_resolution_slide_is_not_a_level(tmp_path, reduced_label):
    """Issue 10.5: a 300x700 label photo after the slide was level 1; level=1/-1 and mpp=2.0 returned it."""
    path = write_single_with_label(tmp_path / "s.tif", IMG, reduced_label=reduced_label)
    image = open_image(path)
    assert image.level_shapes == [(600, 800)]
    assert read_image_info(path).levels == 1
    assert open_image(path, level=-1).shape == (1, 3, 600, 800)
    assert open_image(path, mpp=2.0).level == 0  # the closest (the only) level, never the label
    np.testing.assert_array_equal(read_image(path, level=-1), IMG)
    with pytest.raises(ImageReadError, match=r"s\.tif: level 1 does not exist: the file has 1 pyramid level"):
        open_image(path, level=1)


def test_svs_thumbnail_label_macro_are_not_levels(tmp_path):
    path = write_svs(tmp_path / "a.svs", IMG)
    image = open_image(path)
    assert image.level_shapes == [(600, 800), (150, 200)]  # baseline and the 4x level; not 75x100, 300x700, 400x1200
    assert image.mpp0 == pytest.approx(SVS_MPP)
    assert open_image(path, level=-1).shape == (1, 3, 150, 200)
    assert open_image(path, mpp=SVS_MPP * 4).level == 1


def test_a_reduced_page_of_another_aspect_is_not_a_level(tmp_path):
    """A variant the issue did not spell out: a pyramid whose reduced pages include one of another aspect
    (e.g. a macro photo flagged reduced): only same-aspect copies are levels."""
    path = tmp_path / "p.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(IMG, tile=(128, 128), photometric="rgb", metadata=None)
        tif.write(IMG[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1, metadata=None)
        tif.write(np.zeros((150, 400, 3), np.uint8), tile=(64, 64), photometric="rgb", subfiletype=1, metadata=None)
    assert open_image(path).level_shapes == [(600, 800), (300, 400)]
    assert torch.equal(open_image(path, level=-1).read()[0].permute(1, 2, 0), torch.from_numpy(IMG[::2, ::2]))


def test_ome_subifd_levels_and_physical_size(tmp_path):
    path = write_ome_subifds(tmp_path / "o.ome.tif", IMG)
    image = open_image(path)
    assert image.level_shapes == [(600, 800), (300, 400), (150, 200)]
    assert open_image(path, level=2).mpp == pytest.approx(4 * image.mpp0)


# ------------------------------------------------------------------------------------------- errors
def test_level_that_does_not_exist(tmp_path):
    path = write_svs(tmp_path / "a.svs", IMG)
    for level in (2, -3):
        with pytest.raises(ImageReadError, match=rf"a\.svs: level {level} does not exist.*0\.\.1, or negative"):
            open_image(path, level=level)


def test_mpp_finer_than_level_0(tmp_path):
    path = write_single_with_label(tmp_path / "s.tif", IMG)
    assert open_image(path, mpp=SINGLE_MPP * 0.95).level == 0  # within the scanner tolerance
    with pytest.raises(ImageReadError, match=r"s\.tif: mpp=0\.2 is finer than .*0\.5 um/px.*ask for mpp >= 0\.5"):
        open_image(path, mpp=0.2)
    with pytest.raises(ImageReadError, match=r"s\.tif: mpp=0\.2 is finer"):
        read_image_info(path, mpp=0.2)


def test_mpp_of_a_file_without_resolution(tmp_path):
    path = tmp_path / "n.tif"
    tifffile.imwrite(path, IMG, tile=(128, 128), photometric="rgb", metadata=None)
    with pytest.raises(ImageReadError, match=r"n\.tif: mpp=1\.0 was asked for but the file states no resolution"
                                             r".*level= instead"):
        open_image(path, mpp=1.0)


def test_unsupported_format_names_the_file_and_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not an image format anyone reads" * 10)
    with pytest.raises(ImageReadError, match=r"slide\.mrxs: unsupported image format.*(convert it|openslide)"):
        open_image(path)
    import timm_stream.io.open as io_open

    monkeypatch.setattr(io_open, "openslide_available", lambda: False)  # as on a machine without OpenSlide
    with pytest.raises(ImageReadError, match=r"slide\.mrxs: unsupported .*pip install openslide-python openslide-bin"):
        open_image(path)


def test_missing_optional_backend(tmp_path, monkeypatch):
    import builtins

    path = write_single_with_label(tmp_path / "s.tif", IMG)
    real_import = builtins.__import__

    def no_backends(name, *args, **kwargs):
        if name in ("openslide", "tiffslide"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_backends)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda name, *a: no_backends(name))
    for backend, hint in (("openslide", "pip install openslide-python openslide-bin"), ("tiffslide", "pip install tiffslide")):
        with pytest.raises(ImageReadError, match=rf"s\.tif: backend='{backend}' needs {backend}, which is not "
                                                 rf"installed.*{hint}"):
            open_image(path, backend=backend)


def test_other_refusals(tmp_path):
    path = write_single_with_label(tmp_path / "s.tif", IMG)
    with pytest.raises(ValueError, match="either level or mpp"):
        open_image(path, level=0, mpp=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        open_image(path, backend="bioformats")
    with pytest.raises(ImageReadError, match=r"nothere\.tif: file not found"):
        open_image(tmp_path / "nothere.tif")
    png = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray(IMG).save(png)
    with pytest.raises(ImageReadError, match=r"p\.png: level/mpp apply to pyramidal slide files only"):
        open_image(png, level=2)
    assert torch.equal(open_image(png)[:, :, 5:9, 7:20][0].permute(1, 2, 0), torch.from_numpy(IMG[5:9, 7:20]))
    Image.fromarray(IMG).save(tmp_path / "p.bmp")  # other single-resolution formats Pillow reads
    assert torch.equal(open_image(tmp_path / "p.bmp").read()[0].permute(1, 2, 0), torch.from_numpy(IMG))
    np.testing.assert_array_equal(read_image(tmp_path / "p.bmp"), IMG)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 64, 64), np.uint8), photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(ImageReadError, match=r"stack\.tif: .*only 2-D images"):
        open_image(stack)
    wide = tmp_path / "u16.tif"
    tifffile.imwrite(wide, np.zeros((64, 64), np.uint16), metadata=None)
    with pytest.raises(ImageReadError, match=r"u16\.tif: pixels are uint16, not uint8"):
        open_image(wide)


@pytest.mark.parametrize("compression", ["jpeg", "lzw", "zlib", "webp", "jpeg2000", 33005, "zstd", "packbits"])
def test_slide_codecs_read_out_of_the_box(tmp_path, compression):
    """Issue 14.1: the codecs of real slides (JPEG; Aperio's JPEG 2000 33005; LZW, deflate, WebP, ...) read
    after a plain install (imagecodecs is a core dependency)."""
    path = tmp_path / "c.tif"
    lossless = {"webp": {"level": 100}, "jpeg2000": {"level": 0}, 33005: {"level": 0}}  # lossless modes
    tifffile.imwrite(path, IMG, tile=(128, 128), photometric="rgb", compression=compression, metadata=None,
                     compressionargs=lossless.get(compression, {}))
    image = open_image(path)
    ours = image[:, :, 100:390, 150:700][0].permute(1, 2, 0).numpy().astype(int)
    reference = tifffile.imread(path)[100:390, 150:700].astype(int)
    np.testing.assert_array_equal(ours, reference)  # tifffile's own whole-page read
    if compression != "jpeg":  # lossy: compared with tifffile's decode above only
        np.testing.assert_array_equal(ours, IMG[100:390, 150:700])
