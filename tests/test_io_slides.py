"""Slide files written by libvips and tifffile, read by ``timm_stream.open_image`` and the DataModule's
readers, checked against independent readers: OpenSlide (the field's reference) for the layouts it reads
as pyramids, libvips' own reader for SubIFD pyramids (which OpenSlide's generic TIFF reader does not list).

JPEG tolerance: OpenSlide and imagecodecs both decode with libjpeg-turbo, so the pixels are expected to be
equal; we allow a difference of at most ``JPEG_TOLERANCE`` grey levels per channel (a different IDCT in
another build of either library), and require exact equality for lossless codecs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pyvips = pytest.importorskip("pyvips", reason="libvips (pyvips + pyvips-binary) has no wheel for this platform")
openslide = pytest.importorskip("openslide", reason="OpenSlide (openslide-python + openslide-bin) has no wheel "
                                                    "for this platform")

from slide_files import OME_MPP, SUBIFD_MPP, SVS_MPP, VIPS_MPP, write_all  # noqa: E402
from timm_stream import open_image  # noqa: E402
from timm_stream.io import ImageReadError  # noqa: E402
from timm_stream.lightning import read_image, read_image_info  # noqa: E402

JPEG_TOLERANCE = 2
JPEG_FILES = ("vips_jpeg", "svs")
OPENSLIDE_PYRAMIDS = ("vips_jpeg", "svs", "single_label")  # OpenSlide lists their levels
SUBIFD_PYRAMIDS = ("vips_subifd", "ome")  # OpenSlide's generic TIFF reader lists level 0 only


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("slides"))


def _openslide_region(slide, level: int, r0: int, c0: int, h: int, w: int) -> torch.Tensor:
    ds = slide.level_downsamples[level]
    rgba = np.asarray(slide.read_region((round(c0 * ds), round(r0 * ds)), level, (w, h)))
    assert (rgba[:, :, 3] == 255).all()
    return torch.from_numpy(rgba[:, :, :3].copy()).permute(2, 0, 1)[None]


def _regions(rng, height: int, width: int, down: float, count: int = 8):
    """Random regions (r0, c0, h, w) of a level; where the level's downsample is not an integer, only at
    level-0 points that are whole pixels of the level too (elsewhere OpenSlide interpolates between pixels,
    by design of its fractional level-0 addressing)."""
    if abs(down - round(down)) < 1e-9:
        for _ in range(count):
            r0, c0 = int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))
            yield r0, c0, int(rng.integers(1, min(300, height - r0) + 1)), int(rng.integers(1, min(300, width - c0) + 1))
    else:
        yield 0, 0, height, width
        yield 0, 0, int(rng.integers(1, height)), int(rng.integers(1, width))


@pytest.mark.parametrize("kind", OPENSLIDE_PYRAMIDS)
def test_levels_and_mpp_match_openslide(slides, kind):
    path = slides[kind]
    slide = openslide.OpenSlide(str(path))
    image = open_image(path)
    assert image.level_shapes == [(h, w) for w, h in slide.level_dimensions]
    assert image.mpp0 == pytest.approx(float(slide.properties["openslide.mpp-x"]), rel=1e-6)
    for level, (w, h) in enumerate(slide.level_dimensions):
        info = read_image_info(path, level=level)  # the DataModule's header reading agrees too
        assert (info.height, info.width, info.levels) == (h, w, len(slide.level_dimensions))
        assert open_image(path, level=level).mpp == pytest.approx(image.mpp0 * slide.level_dimensions[0][0] / w)


@pytest.mark.parametrize("kind", OPENSLIDE_PYRAMIDS)
def test_regions_match_openslide_at_every_level(slides, kind):
    path = slides[kind]
    slide = openslide.OpenSlide(str(path))
    rng = np.random.default_rng(0)
    tolerance = JPEG_TOLERANCE if kind in JPEG_FILES else 0
    for level, (w, h) in enumerate(slide.level_dimensions):
        image = open_image(path, level=level)
        checked = 0
        for r0, c0, rh, cw in _regions(rng, h, w, slide.level_downsamples[level]):
            ours = image[:, :, r0:r0 + rh, c0:c0 + cw]
            assert ours.shape == (1, 3, rh, cw) and ours.dtype == torch.uint8 and ours.is_contiguous()
            expected = _openslide_region(slide, level, r0, c0, rh, cw)
            assert (ours.int() - expected.int()).abs().max().item() <= tolerance, (kind, level, r0, c0)
            checked += 1
        assert checked >= 2


@pytest.mark.parametrize("kind", SUBIFD_PYRAMIDS)
def test_subifd_pyramids_match_libvips_level_by_level(slides, kind):
    path = slides[kind]
    assert len(openslide.OpenSlide(str(path)).level_dimensions) == 1  # why libvips is the oracle here
    image = open_image(path)
    assert len(image.level_shapes) == 3 if kind == "ome" else len(image.level_shapes) >= 3
    assert image.mpp0 == pytest.approx(OME_MPP if kind == "ome" else SUBIFD_MPP, rel=1e-6)
    rng = np.random.default_rng(1)
    for level, (h, w) in enumerate(image.level_shapes):
        vips = pyvips.Image.new_from_file(str(path), subifd=level - 1)  # -1: the main image
        assert (vips.height, vips.width) == (h, w)
        expected = torch.from_numpy(vips.numpy()[:, :, :3].copy()).permute(2, 0, 1)[None]
        lazy = open_image(path, level=level)
        assert torch.equal(lazy.read(), expected), level
        for r0, c0, rh, cw in _regions(rng, h, w, 1.0, count=4):
            assert torch.equal(lazy[:, :, r0:r0 + rh, c0:c0 + cw], expected[:, :, r0:r0 + rh, c0:c0 + cw])
        np.testing.assert_array_equal(read_image(path, level=level), expected[0].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("kind", ["vips_jpeg", "vips_subifd", "svs", "ome", "single_label"])
def test_region_reads_equal_reading_the_level_whole(slides, kind):
    rng = np.random.default_rng(2)
    image = open_image(slides[kind])
    for level in range(len(image.level_shapes)):
        lazy = open_image(slides[kind], level=level)
        whole = lazy.read()
        h, w = whole.shape[2:]
        for r0, c0, rh, cw in _regions(rng, h, w, 1.0, count=6):
            region = lazy[:, :, r0:r0 + rh, c0:c0 + cw]
            assert torch.equal(region, whole[:, :, r0:r0 + rh, c0:c0 + cw])
        region[:] = 0  # a new tensor: writing into it leaves later reads alone
        assert torch.equal(lazy.read(), whole)


def test_mpp_chooses_the_level_as_openslide_downsamples_say(slides):
    for kind, mpp0 in (("vips_jpeg", VIPS_MPP), ("svs", SVS_MPP)):
        slide = openslide.OpenSlide(str(slides[kind]))
        for level, down in enumerate(slide.level_downsamples):
            assert open_image(slides[kind], mpp=mpp0 * down).level == level
            assert read_image_info(slides[kind], mpp=mpp0 * down * 1.05).level == level


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("kind", OPENSLIDE_PYRAMIDS)
def test_openslide_backend_same_levels_mpp_and_pixels(slides, kind, backend):
    pytest.importorskip(backend, reason=f"the optional {backend} backend is not installed")
    path = slides[kind]
    tolerance = JPEG_TOLERANCE if kind in JPEG_FILES else 0
    ours = open_image(path)
    theirs = open_image(path, backend=backend)
    assert theirs.level_shapes == ours.level_shapes and theirs.mpp0 == pytest.approx(ours.mpp0)
    for level in range(len(ours.level_shapes)):
        a, b = open_image(path, level=level), open_image(path, level=level, backend=backend)
        assert a.shape == b.shape and b.dtype == torch.uint8
        if abs(b.downsamples[level] - round(b.downsamples[level])) < 1e-9:
            h, w = a.shape[2:]
            assert (a[:, :, h // 3:h // 2, w // 5:w // 2].int() - b[:, :, h // 3:h // 2, w // 5:w // 2].int()
                    ).abs().max() <= tolerance
    assert open_image(path, mpp=ours.mpp0 * 4.2, backend=backend).level == open_image(path, mpp=ours.mpp0 * 4.2).level


def test_auto_backend_reads_tiff_with_tifffile(slides):
    from timm_stream.io import TiffImage

    assert isinstance(open_image(slides["svs"]), TiffImage)


def test_svs_mpp_comes_from_the_image_description(slides):
    """SVS files have no resolution tags: level=/mpp= must still work (issue 10.5)."""
    import tifffile

    with tifffile.TiffFile(slides["svs"]) as tif:
        assert tif.pages.first.get_resolution()[0] in (0, 1)  # nothing usable in the tags
    assert open_image(slides["svs"], mpp=2.0).level == 1  # 0.499 * 4
    with pytest.raises(ImageReadError, match=r"slide\.svs.*finer than the file's full resolution.*mpp >= 0\.499"):
        open_image(slides["svs"], mpp=0.25)


def test_jpeg2000_svs_matches_openslide(tmp_path):
    """Aperio's JPEG 2000 compression (33005, RGB) read by both; lossless, so equal to the written pixels."""
    import tifffile

    from slide_files import APERIO, slide_pixels

    img = slide_pixels(600, 800)
    path = tmp_path / "jp2k.svs"
    desc = f"{APERIO}800x600 [0,0 800x600] (256x256) J2K/KDU Q=70|AppMag = 20|MPP = {SVS_MPP}"
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(256, 256), photometric="rgb", compression=33005, compressionargs={"level": 0},
                  description=desc, metadata=None)
        tif.write(np.ascontiguousarray(img[::8, ::8]), photometric="rgb", description=f"{APERIO}thumbnail",
                  metadata=None)
    slide = openslide.OpenSlide(str(path))
    assert slide.properties["openslide.vendor"] == "aperio" and slide.level_count == 1
    ours = open_image(path)
    assert ours.level_shapes == [(600, 800)] and ours.mpp0 == pytest.approx(SVS_MPP)
    expected = _openslide_region(slide, 0, 120, 200, 300, 450)
    assert torch.equal(ours[:, :, 120:420, 200:650], expected)
    assert torch.equal(expected[0].permute(1, 2, 0), torch.from_numpy(img[120:420, 200:650]))


def test_openslide_transparent_pixels_become_the_background(slides):
    """Outside the scanned area OpenSlide returns transparent pixels (MIRAX, ...): they read as the slide's
    background colour (white by default), not black; opaque pixels are unchanged."""
    from PIL import Image

    image = open_image(slides["svs"], backend="openslide")
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (10, 200, 30, 255)  # opaque tissue on the left, transparent on the right
    rgba[0, 3] = (100, 100, 100, 128)  # half transparent

    class Fake:
        def read_region(self, location, level, size):
            return Image.fromarray(rgba, "RGBA")

    image._slide, image._pid = Fake(), __import__("os").getpid()
    out = image[:, :, 0:4, 0:6][0].permute(1, 2, 0).numpy()
    assert (out[:, :3] == (10, 200, 30)).all() and (out[1:, 3:] == 255).all()
    assert (out[0, 3] == round(100 * 128 / 255 + 255 * 127 / 255)).all()
