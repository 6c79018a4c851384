"""The data part of recipes/camelyon16_slide.yaml on a miniature CAMELYON16 layout: the DataModule built
from the recipe's ``data:`` section finds the level by mpp, yields lazy slides with tissue masks, batch 1.
(The model part, attention pooling over a streamed trunk, needs the whole-slide engine and is not run here.)"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

tifffile = pytest.importorskip("tifffile")

from timm_stream.io import is_lazy_image, open_image  # noqa: E402
from timm_stream.lightning import LargeImageDataModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _camelyon_like(path: Path, seed: int) -> None:
    """A JPEG-tiled pyramid, 0.25 um/px at level 0, levels halving (as CAMELYON16's TIFFs), mostly background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(228, 240, (768, 1024, 1), dtype=np.uint8).repeat(3, 2)
    img[200:500, 300:700] = rng.integers(60, 200, (300, 400, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for k in range(4):
            step = 2 ** k
            tif.write(np.ascontiguousarray(img[::step, ::step]), tile=(128, 128), photometric="rgb",
                      compression="jpeg", subfiletype=1 if k else 0, resolution=(1e4 / (0.25 * step),) * 2,
                      resolutionunit="CENTIMETER", metadata=None)


def test_camelyon16_recipe_data_part(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / "camelyon16_slide.yaml").read_text())
    assert recipe["model"]["global_pool"] == "attention" and recipe["model"]["stream_stages"] == 4
    rows = [("path", "label", "split")]
    for i, (folder, label, split) in enumerate([("training/normal", "normal", "train"),
                                                ("training/tumor", "tumor", "train"),
                                                ("training/tumor", "tumor", "val"),
                                                ("testing/images", "normal", "test")]):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        _camelyon_like(tmp_path / folder / f"slide_{i:03d}.tif", i)
        rows.append((f"{folder}/slide_{i:03d}.tif", label, split))
    with open(tmp_path / "slides.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    config = dict(recipe["data"], csv=str(tmp_path / "slides.csv"), num_workers=0)
    data = LargeImageDataModule(**config, label_names=recipe["model"]["label_names"],
                                num_classes=recipe["model"]["num_classes"])
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    image, mask = batch["image"], batch["mask"]
    assert is_lazy_image(image) and not isinstance(image, torch.Tensor)
    assert sorted(image.shape[2:]) == [192, 256]  # level 2: 1.0 um/px, possibly rotated
    assert open_image(batch["path"][0], mpp=1.0).level == 2
    assert mask.dtype == torch.bool and mask.shape[:2] == (1, 1) and 0.05 < mask.float().mean() < 0.5
    assert batch["label"].shape == (1,)
