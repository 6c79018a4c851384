"""The lazy image protocol: region reads, lazy flips/rotations (nothing read whole), thread-safe reads,
pickling for DataLoader workers, the DataModule's lazy slides with tissue masks and mask files, and the
tissue mask itself (Otsu on saturation, from the lowest level: level 0 is never read)."""
from __future__ import annotations

import csv
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip("tifffile")

from slide_files import slide_pixels  # noqa: E402
from timm_stream import LazyImage, open_image, tissue_mask  # noqa: E402
from timm_stream.io import OrientedImage, TiffImage, is_lazy_image, otsu_threshold  # noqa: E402
from timm_stream.lightning import LargeImageDataModule, LargeImageDataset, collate_images, read_image  # noqa: E402

SYMMETRIES = [(k, f) for k in range(4) for f in (False, True)]


class RecordingImage(LazyImage):
    """A tensor behind the lazy protocol that records every region read."""

    def __init__(self, x: torch.Tensor):
        self.x, self.shape, self.dtype, self.path, self.reads = x, x.shape, x.dtype, "<recording>", []

    def read_region(self, r0, r1, c0, c1):
        self.reads.append((r0, r1, c0, c1))
        return self.x[:, :, r0:r1, c0:c1].clone()


def _pyramid(path, img, tile=64):
    with tifffile.TiffWriter(path) as tif:
        for k, step in enumerate((1, 2, 4)):
            tif.write(np.ascontiguousarray(img[::step, ::step]), tile=(tile, tile), photometric="rgb",
                      compression="zlib", subfiletype=1 if k else 0, metadata=None,
                      resolution=(1e4 / 0.5 / step,) * 2, resolutionunit="CENTIMETER")
    return path


def _tissue_slide(height=384, width=512, seed=0):
    """White-grey background with noise, pink 'tissue' in two known rectangles."""
    rng = np.random.default_rng(seed)
    img = rng.integers(225, 245, (height, width, 1), dtype=np.uint8).repeat(3, 2)
    truth = np.zeros((height, width), bool)
    for r, c, h, w in ((40, 60, 150, 180), (230, 300, 120, 170)):
        img[r:r + h, c:c + w] = np.stack([rng.integers(170, 220, (h, w)), rng.integers(60, 120, (h, w)),
                                          rng.integers(140, 200, (h, w))], -1)
        truth[r:r + h, c:c + w] = True
    return img, truth


# ------------------------------------------------------------------------------------------- protocol
def test_protocol_attributes_and_new_tensors(tmp_path):
    image = open_image(_pyramid(tmp_path / "p.tif", slide_pixels(300, 410)))
    assert is_lazy_image(image) and not isinstance(image, torch.Tensor)
    assert image.shape == torch.Size((1, 3, 300, 410)) and image.dtype == torch.uint8 and image.ndim == 4
    assert image.device == torch.device("cpu")
    a = image[:, :, 10:70, 100:229]
    assert a.shape == (1, 3, 60, 129) and a.is_contiguous()
    a.fill_(0)
    assert image[:, :, 10:70, 100:229].any()  # the caller's writes do not reach later reads (tile cache)
    with pytest.raises(IndexError, match="image\\[:, :, r0:r1, c0:c1\\]"):
        image[0]  # noqa: B018
    with pytest.raises(IndexError, match="step 1"):
        image[:, :, ::2, :]  # noqa: B018


@pytest.mark.parametrize("k,flip", SYMMETRIES)
def test_oriented_view_equals_transforming_the_whole_image(k, flip):
    x = torch.arange(2 * 3 * 13 * 17, dtype=torch.int32).reshape(2, 3, 13, 17)
    base = RecordingImage(x)
    view = OrientedImage(base, k, flip)
    expected = torch.rot90(x, k, dims=(2, 3))
    expected = expected.flip(3) if flip else expected
    assert view.shape == expected.shape
    rng = np.random.default_rng(k * 2 + flip)
    for _ in range(10):
        h, w = view.shape[2:]
        r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        r1, c1 = int(rng.integers(r0 + 1, h + 1)), int(rng.integers(c0 + 1, w + 1))
        base.reads.clear()
        region = view[:, :, r0:r1, c0:c1]
        assert torch.equal(region, expected[:, :, r0:r1, c0:c1])
        # exactly one read of the base, of exactly the region's size: nothing read (or copied) whole
        assert len(base.reads) == 1
        br0, br1, bc0, bc1 = base.reads[0]
        assert sorted((br1 - br0, bc1 - bc0)) == sorted((r1 - r0, c1 - c0))
    mask = (x[:, :1] % 3 == 0)
    assert torch.equal(view.orient(mask), (torch.rot90(mask, k, dims=(2, 3)).flip(3) if flip
                                           else torch.rot90(mask, k, dims=(2, 3))))


def test_oriented_slide_equals_the_rotated_level(tmp_path):
    img = slide_pixels(200, 290)
    image = open_image(_pyramid(tmp_path / "p.tif", img))
    whole = image.read()
    for k, flip in SYMMETRIES:
        expected = torch.rot90(whole, k, dims=(2, 3))
        expected = expected.flip(3) if flip else expected
        view = OrientedImage(image, k, flip)
        assert torch.equal(view[:, :, 17:150, 33:190], expected[:, :, 17:150, 33:190])


def test_reads_are_thread_safe(tmp_path):
    image = open_image(_pyramid(tmp_path / "p.tif", slide_pixels(600, 700), tile=32), channels=3)
    image.cache_bytes = 64 * 32 * 32 * 3  # a small tile cache, so threads evict each other's tiles
    whole = open_image(tmp_path / "p.tif").read()
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(200):
        r0, c0 = int(rng.integers(0, 550)), int(rng.integers(0, 650))
        boxes.append((r0, r0 + int(rng.integers(1, 50)), c0, c0 + int(rng.integers(1, 50))))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: image[:, :, b[0]:b[1], b[2]:b[3]], boxes))
    for (r0, r1, c0, c1), region in zip(boxes, results):
        assert torch.equal(region, whole[:, :, r0:r1, c0:c1])


def test_pickles_without_open_files(tmp_path):
    image = OrientedImage(open_image(_pyramid(tmp_path / "p.tif", slide_pixels(200, 300)), level=1), 1, True)
    first = image[:, :, 0:40, 0:50]  # opens the file
    copy = pickle.loads(pickle.dumps(image))  # what a DataLoader worker sends to the main process
    assert copy.base._tif is None and torch.equal(copy[:, :, 0:40, 0:50], first)
    assert threading.active_count() >= 1


# ------------------------------------------------------------------------------------------- tissue mask
def test_otsu_threshold_splits_two_modes():
    values = torch.cat([torch.full((300,), 20), torch.full((100,), 200), torch.arange(40, 60)]).to(torch.uint8)
    t = otsu_threshold(values)
    assert 59 <= t < 200


def test_tissue_mask_from_the_lowest_level_only(tmp_path, monkeypatch):
    img, truth = _tissue_slide()
    path = _pyramid(tmp_path / "t.tif", img)
    levels_read = []
    real = TiffImage.read_region

    def record(self, r0, r1, c0, c1):
        levels_read.append(self.level)
        return real(self, r0, r1, c0, c1)

    monkeypatch.setattr(TiffImage, "read_region", record)
    image = open_image(path)
    mask = tissue_mask(image)
    assert levels_read and set(levels_read) == {2}  # level 0 (and 1) never read
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 96, 128)
    expected = torch.from_numpy(truth[::4, ::4])[None, None]
    agree = (mask == expected).float().mean().item()
    assert agree > 0.97, agree
    # the mask of a view is the view of the mask; of a tensor, computed from the tensor
    view = OrientedImage(image, 3, True)
    assert torch.equal(tissue_mask(view), view.orient(mask))
    full = torch.from_numpy(img).permute(2, 0, 1)[None]
    assert (tissue_mask(full, max_size=128) == expected).float().mean() > 0.97


def test_tissue_mask_of_a_single_level_image_reads_bands(tmp_path):
    img, truth = _tissue_slide(seed=3)
    recording = RecordingImage(torch.from_numpy(img).permute(2, 0, 1)[None].contiguous())
    mask = tissue_mask(recording, max_size=64)
    assert mask.shape == (1, 1, 48, 64)
    assert len(recording.reads) >= 1
    blank = tissue_mask(RecordingImage(torch.full((1, 3, 64, 64), 235, dtype=torch.uint8)
                                       + torch.randint(0, 6, (1, 3, 64, 64), dtype=torch.uint8)))
    assert blank.float().mean() < 0.02  # background noise is not tissue (the threshold floor)


# ------------------------------------------------------------------------------------------- DataModule
def test_dataset_yields_lazy_slides_with_oriented_masks(tmp_path):
    img, _ = _tissue_slide(seed=5)
    path = _pyramid(tmp_path / "t.tif", img)
    ds = LargeImageDataset([path] * 12, [1] * 12, augment=True, lazy=True, tissue_masks=True, level=1)
    plain_mask = tissue_mask(open_image(path, level=1))
    level1 = torch.from_numpy(read_image(path, level=1).copy()).permute(2, 0, 1)[None]
    torch.manual_seed(0)
    seen = set()
    for i in range(12):
        batch = collate_images([ds[i]])
        image, mask = batch["image"], batch["mask"]
        assert is_lazy_image(image) and not isinstance(image, torch.Tensor) and image.shape[0] == 1
        k, flip = (image.k, image.flip) if isinstance(image, OrientedImage) else (0, False)
        seen.add((k, flip))
        expected = torch.rot90(level1, k, dims=(2, 3))
        expected = expected.flip(3) if flip else expected
        assert torch.equal(image[:, :, 5:60, 7:90], expected[:, :, 5:60, 7:90])
        oriented = torch.rot90(plain_mask, k, dims=(2, 3))
        assert torch.equal(mask, oriented.flip(3) if flip else oriented)
        assert batch["label"].tolist() == [1]
    assert len(seen) > 2


def test_datamodule_mask_column_and_tissue_masks(tmp_path):
    img, truth = _tissue_slide(seed=6)
    _pyramid(tmp_path / "a.tif", img)
    _pyramid(tmp_path / "b.tif", img[:, ::-1])
    tifffile.imwrite(tmp_path / "a_mask.tif", (truth * 255).astype(np.uint8)[::2, ::2], metadata=None)
    with open(tmp_path / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split", "mask"), ("a.tif", 0, "train", "a_mask.tif"),
                                 ("b.tif", 1, "train", "")])
    data = LargeImageDataModule(csv=str(tmp_path / "data.csv"), num_classes=2, num_workers=0, augment=False,
                                lazy=True, tissue_masks=True)
    data.setup("fit")
    assert data.images_on_host
    batches = {b["path"][0].rsplit("/", 1)[-1]: b for b in data.train_dataloader()}
    assert torch.equal(batches["a.tif"]["mask"], torch.from_numpy(truth[::2, ::2])[None, None])  # from the file
    assert torch.equal(batches["b.tif"]["mask"], tissue_mask(open_image(tmp_path / "b.tif")))  # computed
    assert isinstance(batches["a.tif"]["image"], TiffImage)
    with pytest.raises(ValueError, match="lazy slides are read one per batch: set batch_size: 1"):
        LargeImageDataModule(csv=str(tmp_path / "data.csv"), lazy=True, batch_size=4)
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "mask"), ("a.tif", 0, "missing_mask.tif")])
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: mask file .*missing_mask\.tif not found"):
        LargeImageDataModule(csv=str(tmp_path / "bad.csv"), num_classes=2, num_workers=0).setup("fit")


def test_empty_masks_fall_back_to_the_whole_slide_naming_the_file(tmp_path):
    """A blank slide (no tissue) or an all-zero mask file must not fail mid-epoch without a name (the
    engine refuses a mask that keeps nothing): the item has no mask, with a warning naming the file."""
    blank = np.full((256, 320, 3), 128, np.uint8)
    _pyramid(tmp_path / "blank.tif", blank)
    img, truth = _tissue_slide(seed=6)
    _pyramid(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "zero_mask.tif", np.zeros((40, 50), np.uint8), metadata=None)
    assert not tissue_mask(open_image(tmp_path / "blank.tif")).any()
    ds = LargeImageDataset([tmp_path / "blank.tif", tmp_path / "a.tif"], [0, 1], lazy=True, tissue_masks=True,
                           masks=[None, str(tmp_path / "zero_mask.tif")])
    for index, what in ((0, "tissue mask"), (1, "mask file")):
        with pytest.warns(UserWarning, match=rf"{('blank' if index == 0 else 'a')}\.tif: the {what}.* is empty"):
            assert ds[index]["mask"] is None
    ds = LargeImageDataset([tmp_path / "a.tif"], [1], lazy=True, tissue_masks=True)
    assert ds[0]["mask"] is not None and ds[0]["mask"].any()


def test_lazy_slides_cross_worker_processes(tmp_path):
    _pyramid(tmp_path / "a.tif", slide_pixels(200, 260))
    ds = LargeImageDataset([tmp_path / "a.tif"] * 2, [0, 1], lazy=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_images)
    expected = open_image(tmp_path / "a.tif").read()
    for batch in loader:
        assert torch.equal(batch["image"][:, :, 3:50, 9:70], expected[:, :, 3:50, 9:70])
