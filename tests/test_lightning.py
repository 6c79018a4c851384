"""Lightning layer: fit on tiny generated TIFF/PNG/JPEG images, CLI fit/predict, checkpoints loadable
with weights_only=True, atomic checkpoint writes, up-front data validation, export.

Everything runs offline on the CPU with ``stream_test_resnet`` and small tiles (several tiles per
image, so the streamed path is what runs)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

lightning = pytest.importorskip("lightning")
tifffile = pytest.importorskip("tifffile")
from PIL import Image  # noqa: E402

from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from timm_stream.lightning import (AtomicCheckpointIO, DataValidationError, LargeImageDataModule,  # noqa: E402
                                   LargeImageDataset, StreamingClassifier, collate_images, read_image,
                                   read_image_info, validate_entries)
from timm_stream.lightning.checkpoint import atomic_torch_save  # noqa: E402
from timm_stream.lightning.cli import StreamingCLI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(model_name="stream_test_resnet", num_classes=2, tile_size=64, global_pool="max")
SIZE = 128  # 128x128 images, 64 px tiles: several tiles per image


def _image(rng: np.random.Generator, label: int, size: int = SIZE, channels: int = 3) -> np.ndarray:
    img = rng.integers(60, 120, (size, size, channels), dtype=np.uint8)
    if label:
        img[size // 3: size // 3 + 6, size // 2: size // 2 + 6] = 250
    return img


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float = 0.5) -> None:
    """A tiled, pyramidal TIFF (levels as SubIFDs), with resolution tags."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(32, 32), subifds=2, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp),
                  resolutionunit="CENTIMETER")
        tif.write(image[::2, ::2], tile=(32, 32), subfiletype=1, photometric="rgb")
        tif.write(image[::4, ::4], tile=(16, 16), subfiletype=1, photometric="rgb")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """train: 4 images (2 pyramidal tiled TIFF, 1 PNG, 1 JPEG); val: 2 PNG; test: 1 TIFF + 1 PNG of
    another size; CSV with class names."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i, (split, label, fmt) in enumerate([("train", 0, "tif"), ("train", 1, "tif"), ("train", 0, "png"),
                                             ("train", 1, "jpg"), ("val", 0, "png"), ("val", 1, "png"),
                                             ("test", 1, "tif"), ("test", 0, "png")]):
        size = 160 if split == "test" and fmt == "png" else SIZE
        img = _image(rng, label, size)
        name = f"img{i}.{fmt}"
        if fmt == "tif":
            write_pyramid_tiff(root / name, img)
        else:
            Image.fromarray(img).save(root / name, quality=95) if fmt == "jpg" else Image.fromarray(img).save(root / name)
        rows.append((name, ["negative", "positive"][label], split))
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return root


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
                    default_root_dir=str(tmp_path))
    defaults.update(kwargs)
    return Trainer(**defaults)


# ------------------------------------------------------------------------------------------- readers
def test_pyramid_levels_and_mpp(dataset_dir):
    info = read_image_info(dataset_dir / "img0.tif")
    assert (info.height, info.width, info.channels, info.levels) == (SIZE, SIZE, 3, 3)
    assert read_image_info(dataset_dir / "img0.tif", level=1).height == SIZE // 2
    assert read_image_info(dataset_dir / "img0.tif", level=-1).height == SIZE // 4
    assert read_image_info(dataset_dir / "img0.tif", mpp=2.0).level == 2  # 0.5 um/px * 4
    full = read_image(dataset_dir / "img0.tif")
    half = read_image(dataset_dir / "img0.tif", level=1)
    assert full.dtype == np.uint8 and full.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(half, full[::2, ::2])
    with pytest.raises(ValueError, match="img0.tif.*level 5 does not exist"):
        read_image_info(dataset_dir / "img0.tif", level=5)


def test_gray_broadcast_and_augment_views(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(gray).save(tmp_path / "g.png")
    arr = read_image(tmp_path / "g.png")
    assert arr.shape == (12, 10, 3) and arr.strides[2] == 0  # broadcast, not copied
    ds = LargeImageDataset([tmp_path / "g.png"] * 16, [0] * 16, augment=True)
    torch.manual_seed(0)
    seen = set()
    symmetries = {np.rot90(gray, k)[:, ::f].tobytes() for k in range(4) for f in (1, -1)}
    for i in range(16):
        item = ds[i]
        assert not item["image"].flags.owndata  # a view of the decoded image
        batch = collate_images([item])
        img = batch["image"][0]
        assert img.dtype == torch.uint8 and img.is_contiguous()
        assert torch.equal(img[0], img[2])
        assert img[0].numpy().tobytes() in symmetries
        seen.add(img[0].numpy().tobytes())
    assert len(seen) > 2  # augmentation happens


def test_collate_variable_sizes(dataset_dir):
    ds = LargeImageDataset([dataset_dir / "img6.tif", dataset_dir / "img7.png"], [1, 0])
    batch = collate_images([ds[0], ds[1]])
    assert isinstance(batch["image"], list) and [tuple(x.shape) for x in batch["image"]] == [(1, 3, SIZE, SIZE),
                                                                                              (1, 3, 160, 160)]
    assert batch["label"].tolist() == [1, 0] and batch["path"][1].endswith("img7.png")


# ------------------------------------------------------------------------------------------- fit
def test_fit_few_steps(dataset_dir, tmp_path):
    seed_everything(0)
    model = StreamingClassifier(**MODEL, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = LargeImageDataModule(csv=str(dataset_dir / "data.csv"), num_workers=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[checkpoint], accumulate_grad_batches=2)
    trainer.fit(model, data)
    assert trainer.global_step == 2  # 4 images, 2 per optimizer step
    assert model.label_names == ["negative", "positive"]  # from the CSV's class names
    changed = [k for k, v in model.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert "model.conv1.0.weight" in changed and "model.fc.weight" in changed
    for key in ("train/loss_epoch", "val/loss", "val/acc", "val/auroc"):
        assert key in trainer.callback_metrics, key
    assert model.model.streaming and model.model.stream_plan((SIZE, SIZE)).num_tiles > 1
    # checkpoints load with weights_only=True and carry what export needs
    for path in (checkpoint.best_model_path, checkpoint.last_model_path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        info = ckpt["timm_stream"]
        assert info["model_name"] == "stream_test_resnet" and info["label_names"] == ["negative", "positive"]
        assert tuple(info["model_kwargs"]["tile_size"]) == (64, 64) and "val/acc" in info["metrics"]
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    restored = StreamingClassifier.load_from_checkpoint(checkpoint.last_model_path, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k


def test_fit_bf16_mixed_precision(dataset_dir, tmp_path):
    """Precision is the Trainer's: autocast reaches the tiles (and their recomputation in backward)."""
    seed_everything(0)
    model = StreamingClassifier(**MODEL)
    seen = []
    model.model.layer1.register_forward_hook(lambda m, i, o: None if o.is_meta else seen.append(o.dtype))
    data = LargeImageDataModule(csv=str(dataset_dir / "data.csv"), num_workers=0)
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, data)
    assert trainer.global_step == 1 and seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------------------- validation
def _broken_case(case: str, root: Path, rng) -> tuple[list[tuple[str, object, str]], str, str]:
    """CSV rows (path, label, split) with one bad entry; the bad file's name; a pattern of the message."""
    good = [("good0.png", 0, "train"), ("good1.png", 1, "val")]
    for name, _, _ in good:
        if not (root / name).exists():
            Image.fromarray(_image(rng, 0)).save(root / name)
    if case == "missing":
        return good + [("missing.tif", 0, "train")], "missing.tif", "file not found"
    if case == "unreadable":
        (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        return good + [("corrupt.png", 1, "train")], "corrupt.png", "cannot read"
    if case == "label":
        Image.fromarray(_image(rng, 0)).save(root / "label3.png")
        return good + [("label3.png", 3, "train")], "label3.png", "outside the class range"
    if case == "level":
        write_pyramid_tiff(root / "pyr.tif", _image(rng, 0))  # 3 levels; the PNGs have none: TIFF only
        return [("pyr.tif", 0, "train"), ("pyr.tif", 1, "val")], "pyr.tif", "level 7 does not exist"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "unreadable", "label", "level"])
def test_bad_data_fails_before_training(case, tmp_path):
    rows, bad, pattern = _broken_case(case, tmp_path, np.random.default_rng(1))
    with open(tmp_path / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    model = StreamingClassifier(**MODEL)
    data = LargeImageDataModule(csv=str(tmp_path / "data.csv"), num_workers=0,
                                level=7 if case == "level" else None)
    trainer = _trainer(tmp_path)
    with pytest.raises(DataValidationError) as info:
        trainer.fit(model, data)
    message = str(info.value)
    assert bad in message and pattern in message, message
    assert str(tmp_path / bad) in message
    assert trainer.global_step == 0


def test_min_input_size_is_what_the_model_runs_on(tmp_path):
    """Not the stride: a padded ResNet (stride 32) gives logits for a 16x16 image, so such an image is
    valid; a network without padding has a real minimum, and an image below it is refused."""
    from timm_stream.lightning.input_size import smallest_input_size

    module = StreamingClassifier(**MODEL)
    assert module.model.streamer.geometry.stride == (32, 32)
    assert module.min_input_size == (1, 1)
    assert module(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)).shape == (1, 2)

    valid = nn.Sequential(nn.Conv2d(3, 4, (5, 3)), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3), nn.Flatten())
    minimum = smallest_input_size(valid)
    assert minimum == (10, 8)  # conv 5x3, pool 2, conv 3: (10 - 4) // 2 = 3 rows, (8 - 2) // 2 = 3 columns
    valid(torch.zeros(1, 3, *minimum))
    for smaller in ((minimum[0] - 1, minimum[1]), (minimum[0], minimum[1] - 1)):
        with pytest.raises(RuntimeError):
            valid(torch.zeros(1, 3, *smaller))
    Image.fromarray(_image(np.random.default_rng(0), 0, size=9)).save(tmp_path / "tiny.png")
    with pytest.raises(DataValidationError, match=r"tiny.png: image is 9x9 px, smaller than the smallest input "
                                                  r"the model runs on \(10x8 px\)"):
        validate_entries([(str(tmp_path / "tiny.png"), 0)], num_classes=2, min_size=minimum)


def test_every_problem_of_every_split_in_one_error(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(_image(rng, 0)).save(tmp_path / name)
    (tmp_path / "data.csv").write_text("path,label,split\na.png,5,train\nb.png,0,train\nb.png,0,train\n"
                                       "gone.png,1,val\nc.png,1,val\na.png,0,test\nc.png,1,test\n")
    data = LargeImageDataModule(csv=str(tmp_path / "data.csv"), num_classes=2, num_workers=0)
    with pytest.raises(DataValidationError) as info:
        data.setup("fit")
    message = str(info.value)
    assert "[train]" in message and "label 5 is outside the class range" in message
    assert "[val]" in message and "gone.png" in message  # not hidden by the bad label in train
    assert "b.png: listed more than once in the 'train' split" in message
    assert "[test]" not in message and "'test' split" not in message  # fit sets up train and val only
    with pytest.raises(DataValidationError) as info:
        data.setup(None)  # every split: the leakage shows
    assert "a.png: in both the 'train' and the 'test' split (leakage" in str(info.value)
    assert "c.png: in both the 'val' and the 'test' split" in str(info.value)


def test_csv_encoding_and_header_errors_name_the_csv_and_the_fix(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("path,label\nbild_ü.png,0\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=r"latin1.csv: not UTF-8 .*save the CSV as UTF-8"):
        LargeImageDataModule(csv=str(tmp_path / "latin1.csv")).setup("fit")
    for header in ("file,class", "path,class", "path,label,fold", "image,label"):
        (tmp_path / "h.csv").write_text(f"{header}\nx.png,0\n")
        with pytest.raises(DataValidationError, match=r"h.csv, line 1: the header .* does not name the columns "
                                                      r"path,label\[,split\]\[,mask\]; rename them"):
            LargeImageDataModule(csv=str(tmp_path / "h.csv")).setup("fit")
    from timm_stream.lightning.data import read_csv

    (tmp_path / "noheader.csv").write_text("x.png,0\ny.svs,1\n")  # no header: the first row is an image
    assert [p for p, _ in read_csv(tmp_path / "noheader.csv")["train"]] == [str(tmp_path / "x.png"),
                                                                            str(tmp_path / "y.svs")]
    (tmp_path / "reordered.csv").write_text("split,label,path\ntrain,1,x.png\n")
    assert read_csv(tmp_path / "reordered.csv") == {"train": [(str(tmp_path / "x.png"), 1)]}


def test_hidden_entries_are_never_classes_or_images(tmp_path):
    from timm_stream.lightning.data import read_folder, read_source

    rng = np.random.default_rng(3)
    for path in ("train/cat/a.png", "train/dog/b.png", "train/.ipynb_checkpoints/c.png",
                 "train/cat/.ipynb_checkpoints/a-checkpoint.png", "train/dog/._b.png", "val/.hidden/d.png",
                 "predict/e.png", "predict/.cache/f.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng, 0, size=8)).save(tmp_path / path)
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    splits = read_folder(tmp_path)
    assert sorted((Path(p).name, label) for p, label in splits["train"]) == [("a.png", "cat"), ("b.png", "dog")]
    assert splits.get("val", []) == []
    assert [Path(p).name for p, _ in splits["predict"]] == ["e.png"]
    assert [Path(p).name for p, _ in read_source(tmp_path / "predict")["predict"]] == ["e.png"]


def test_csv_errors_name_the_csv(tmp_path):
    (tmp_path / "a.csv").write_text("path,label,split\nx.png,0,holdout\n")
    with pytest.raises(DataValidationError, match=r"a.csv, line 2: unknown split 'holdout'"):
        LargeImageDataModule(csv=str(tmp_path / "a.csv")).setup("fit")
    (tmp_path / "b.csv").write_text("path,label\nx.png,cat\ny.png,1\n")
    with pytest.raises(DataValidationError, match="mix class indices and class names"):
        LargeImageDataModule(csv=str(tmp_path / "b.csv")).setup("fit")


# ------------------------------------------------------------------------------------------- atomic checkpoints
def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a partial file...
        raise OSError("disk full")  # ...and the process dies while writing

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, target)
    with pytest.raises(OSError):
        atomic_torch_save({"epoch": 3}, tmp_path / "ckpts" / "new.ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file, no partial new.ckpt
    assert torch.load(target, weights_only=True)["epoch"] == 1  # the previous complete checkpoint


# ------------------------------------------------------------------------------------------- CLI, predict, export
@pytest.fixture(scope="module")
def cli_run(dataset_dir, tmp_path_factory):
    """``timm-stream fit`` (LightningCLI) on the tiny data with a YAML config; returns (config, best ckpt)."""
    out = tmp_path_factory.mktemp("cli")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "default_root_dir": str(out),
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(out / "ckpt"), "monitor": "val/acc", "mode": "max"}}]},
        "model": {**MODEL, "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
                  "scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}},
        "data": {"csv": str(dataset_dir / "data.csv"), "num_workers": 1},
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = StreamingCLI(args=["fit", "--config", str(path)])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.global_step == 8  # 2 epochs x 4 images
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and os.path.isfile(best)
    return path, best, out


def test_cli_predict_writes_csv(cli_run, dataset_dir):
    config, best, out = cli_run
    output = out / "predictions.csv"
    StreamingCLI(args=["predict", "--config", str(config), "--ckpt_path", best, "--predictions.output", str(output),
                       "--trainer.logger", "false"])
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "prediction", "prob_negative", "prob_positive"]
    assert [Path(r["path"]).name for r in rows] == ["img6.tif", "img7.png"]  # the test split, two sizes
    for r in rows:
        probs = [float(r["prob_negative"]), float(r["prob_positive"])]
        assert abs(sum(probs) - 1) < 1e-4
        assert r["prediction"] == ["negative", "positive"][int(np.argmax(probs))]


def test_cli_predict_needs_no_training_csv(cli_run, dataset_dir, tmp_path):
    """As the README shows it: a recipe whose data.csv does not exist here, --data.predict a folder."""
    from timm_stream.lightning.cli import main

    config, best, _ = cli_run
    recipe = yaml.safe_load(Path(config).read_text())
    recipe["data"]["csv"] = str(tmp_path / "data" / "images.csv")  # the recipe's training CSV: not here
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    images = tmp_path / "images"
    images.mkdir()
    names = ["b.png", "a.png", "c.tif"]
    for name in names:
        (images / name).symlink_to(dataset_dir / ("img7.png" if name.endswith("png") else "img6.tif"))
    output = tmp_path / "predictions.csv"
    assert main(["predict", "--config", str(path), "--ckpt_path", best, "--data.predict", str(images),
                 "--predictions.output", str(output), "--trainer.logger", "false"]) == 0
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == sorted(names)  # input order (the folder, sorted)


def test_prediction_parts_merge_in_input_order_without_stale_parts(tmp_path):
    from timm_stream.lightning.callbacks import merge_prediction_parts, part_path

    final = str(tmp_path / "predictions.csv")
    header = ["index", "path", "prediction", "prob_0", "prob_1"]
    parts = {0: [[0, "a", 0, 0.9, 0.1], [2, "c", 1, 0.2, 0.8], [0, "a", 0, 0.9, 0.1]],  # padded: 0 again
             1: [[1, "b", 1, 0.3, 0.7], [3, "d", 0, 0.6, 0.4]],
             2: [[9, "stale", 0, 1.0, 0.0]]}  # left by an earlier run on 3 processes
    for rank, rows in parts.items():
        with open(part_path(final, rank), "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    merge_prediction_parts(final, world_size=2)
    with open(final, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == header[1:]
    assert [r[0] for r in rows[1:]] == ["a", "b", "c", "d"]
    assert not os.path.exists(part_path(final, 0)) and not os.path.exists(part_path(final, 1))
    with open(part_path(final, 0), "w", newline="") as f:
        csv.writer(f).writerows([header] + parts[0])
    with pytest.raises(FileNotFoundError, match="rank 1"):  # a part of this run missing: said, not skipped
        merge_prediction_parts(final, world_size=2)


def test_push_to_hub_dry_run(cli_run, tmp_path):
    _, best, _ = cli_run
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "push_to_hub.py"), best, "--dry-run",
                             "--output-dir", str(out), "--license", "apache-2.0"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "val/acc" in card and "apache-2.0" in card
    import timm_stream

    exported = timm_stream.load_pretrained(str(out))
    model = StreamingClassifier.load_from_checkpoint(best, weights_only=True).model.eval()
    x = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), model(x))
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["negative", "positive"] and config["model_args"]["tile_size"] == [64, 64]
    assert "random initialization" in card  # not the pretrained cfg's weights: the run started from scratch


def test_memory_estimate_streamed_below_untiled():
    from timm_stream.lightning import estimate_training_memory

    model = StreamingClassifier(**{**MODEL, "tile_size": 256}).model
    estimate = estimate_training_memory(model, (2048, 2048))
    assert estimate.untiled_activation_bytes > 3 * (estimate.tile_activation_bytes + estimate.stitched_bytes)
    assert estimate.untiled_bytes > estimate.streamed_bytes


def test_wrong_model_name_is_clear():
    with pytest.raises(ValueError, match="did you mean 'stream_test_resnet'"):
        StreamingClassifier(model_name="test_resnet")


# ------------------------------------------------------------------------------------------- recipes, demo
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_recipes_parse(recipe, capsys):
    """Every recipe is a valid config of the CLI (keys, types, importable class paths)."""
    with pytest.raises(SystemExit) as exit_info:
        StreamingCLI(args=["fit", "--config", str(REPO / "recipes" / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name"].startswith("stream_")
    text = (REPO / "recipes" / recipe).read_text()
    assert "memory" in text.lower() and "# Hardware:" in text  # each recipe says what it expects
    # As written, on this machine (no GPU): the Trainer the recipe asks for can be built
    # (was "No supported gpu backend found" with accelerator: gpu).
    trainer = {k: printed["trainer"][k] for k in ("accelerator", "devices", "precision")}
    Trainer(**trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def test_a_recipe_runs_on_the_cpu_as_written():
    recipe = yaml.safe_load((REPO / "recipes" / "cpu_resnet18_2048.yaml").read_text())
    assert recipe["trainer"]["accelerator"] == "cpu" and recipe["trainer"]["precision"] == "32-true"


def test_demo_smoke(tmp_path):
    """The demo end to end at toy size (the real run is minutes; see the README)."""
    from timm_stream.lightning.demo import downsampled_difference, run

    result = run(["--images", "4", "--val-images", "2", "--size", "192", "--epochs", "1", "--tile-size", "96",
                  "--output-dir", str(tmp_path), "--no-progress"])
    assert os.path.isfile(result["checkpoint"])
    # the reported accuracy is the exported (best) model's on the validation images, recomputed here
    import csv

    import timm_stream
    from timm_stream.lightning.data import read_image

    model = timm_stream.load_pretrained(str(tmp_path / "model"))
    rows = [r for r in csv.DictReader(open(tmp_path / "data" / "data.csv")) if r["split"] == "val"]
    assert rows
    correct = 0
    with torch.no_grad():
        for row in rows:
            pixels = torch.from_numpy(read_image(tmp_path / "data" / row["path"]).transpose(2, 0, 1).copy())[None]
            correct += int(model(pixels).argmax(1).item() == ["square", "cross"].index(row["label"]))
    assert result["accuracy"] == pytest.approx(correct / len(rows), abs=1e-6)
    assert result["untiled_estimate"] > result["streamed_estimate"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert downsampled_difference(2048) < 5 < downsampled_difference(256)  # the pattern vanishes at 224 px


def _fit_warnings(tmp_path, dataset_dir, module):
    import warnings

    data = LargeImageDataModule(csv=str(dataset_dir / "data.csv"), num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False).fit(module, data)
    return [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]


def test_eval_mode_notice_silenced_for_our_frozen_norms_only(tmp_path, dataset_dir):
    import warnings

    assert not any("eval mode" in str(f[1].pattern if f[1] else "") for f in warnings.filters)  # no global filter
    module = StreamingClassifier(**MODEL)
    assert _fit_warnings(tmp_path, dataset_dir, module) == []  # our deliberately frozen norms: no notice

    class WithFrozenExtra(StreamingClassifier):  # a user's module with its own eval-mode submodule
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = nn.Dropout(0.5)

        def train(self, mode=True):
            super().train(mode)
            self.extra.eval()
            return self

    import inspect

    from lightning.pytorch.loops import fit_loop

    if "in eval mode at the start of training" not in inspect.getsource(fit_loop):
        pytest.skip("this Lightning version reports no eval-mode modules (lightning 2.4 does not): nothing to silence")
    notices = _fit_warnings(tmp_path / "b", dataset_dir, WithFrozenExtra(**MODEL))
    assert len(notices) == 1  # the user's eval-mode module is still reported


def test_cli_help_lists_demo_and_demo_help_says_where_it_writes(capsys):
    from timm_stream.lightning.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    subcommands = listed[listed.index("Available subcommands"):]
    assert all(f"    {name} " in subcommands for name in ("fit", "validate", "test", "predict", "demo"))
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--output-dir" in help_text and "./timm_stream_demo" in help_text
    ignored = (REPO / ".gitignore").read_text().split()
    assert "timm_stream_demo/" in ignored  # the default output folder of the demo is not committed by accident


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_cli_predict_two_processes_input_order_no_stale_parts(dataset_dir, tmp_path):
    """`timm-stream predict` with DDP on 2 CPU processes: 5 images (the sampler pads to 6), a stale
    part of an earlier 3-process run next to the output; one row per image, in input order."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"{c}.png" for c in "edcba"]
    for name in names:
        (images / name).symlink_to(dataset_dir / "img4.png")
    output = tmp_path / "predictions.csv"
    (tmp_path / "predictions.csv.rank2").write_text("index,path,prediction,prob_0,prob_1\n0,stale.png,0,1,0\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    args = ["predict", "--model.model_name", "stream_test_resnet", "--model.num_classes", "2",
            "--model.tile_size", "64", "--data.predict", str(images), "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--predictions.output", str(output)]
    result = subprocess.run([sys.executable, "-m", "timm_stream.lightning.cli", *args], env=env, cwd=str(REPO),
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # two processes did run
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == sorted(names)
    assert not list(tmp_path.glob("predictions.csv.rank[01]"))  # this run's parts merged and removed


def test_demo_slide_smoke(tmp_path):
    """``timm-stream demo --slide`` end to end at toy size: lazy pyramidal slides, tissue masks from the lowest
    level, pooling while streaming; the tiles it reports as skipped are the ones the engine never reads."""
    from timm_stream.lightning.demo import main
    from timm_stream.lightning.demo_slide import run, tiles_with_tissue
    from timm_stream.testing import RecordingLazyImage

    result = run(["--slide", "--slides", "2", "--val-slides", "2", "--size", "768", "--epochs", "1",
                  "--tile-size", "256", "--output-dir", str(tmp_path), "--no-progress"])
    assert 0 < result["tiles_skipped"] < result["tiles_total"]
    assert 0.0 <= result["accuracy"] <= 1.0 and result["peak_rss"] > 0
    slides = sorted((tmp_path / "data").glob("*.tif"))
    assert len(slides) == 4  # no stale slides from another run are counted

    import timm

    import timm_stream

    slide = timm_stream.open_image(slides[0])
    mask = timm_stream.tissue_mask(slide)
    assert 0.02 < mask.float().mean() < 0.6  # mostly background, some tissue
    model = timm.create_model("stream_test_resnet", stream_stages=4, global_pool="max", tile_size=256,
                              normalize_input=True, num_classes=2)
    assert model.pooling_streamed
    plan = model.stream_plan(tuple(slide.shape[2:]), lazy=True)
    inside, total = tiles_with_tissue(plan, mask)
    assert 0 < inside < total
    recorder = RecordingLazyImage(slide[:, :, :, :])
    with torch.no_grad():
        model(recorder, mask=mask)
    assert len(recorder.reads) == inside  # exactly the tiles with tissue were read
    with pytest.raises(SystemExit):  # `timm-stream demo --slide --help` documents it (and where it writes)
        main(["--slide", "--help"])
