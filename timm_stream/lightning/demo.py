"""``timm-stream demo``: fine-tune a streaming CNN on synthetic large images on the CPU, offline.

The task: every image is textured noise with a few tiny (3x3 px) patterns, all *squares* (9 px at
+c*5/9) or all *crosses* (5 px at +c): the same summed intensity, so once an image is shrunk to
224x224 (a 3x3 pattern becomes a fraction of a pixel) both classes look alike -- the demo prints
how alike. At full resolution a CNN tells them apart. The network sees the whole image, tile by
tile (exact gradients), with ``global_pool="max"`` ("is the pattern anywhere?").

What it prints: the validation accuracy reached, the wall time, the process's peak memory (peak RSS,
``getrusage``) and what the same training step would need un-tiled -- estimated from the engine's
plan (activation element counts of the whole image, see :mod:`timm_stream.lightning.memory`), or
measured with ``--measure-untiled`` (one un-tiled training step in a subprocess, its peak RSS).

Nothing is downloaded: the model starts from random weights (BatchNorm statistics calibrated on a
few crops, since streaming keeps norms frozen) unless its pretrained weights are already in the
local Hugging Face cache.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["main", "run", "make_image", "generate_dataset", "calibrate_batchnorm"]

LABELS = ["square", "cross"]
PATTERN = 3  # px


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image

    coarse = rng.normal(0, 1, (size // 32 + 1, size // 32 + 1)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    return 90 + 20 * smooth + rng.normal(0, 5, (size, size)).astype(np.float32)


def _pattern(label: int, contrast: float) -> np.ndarray:
    if label == 1:  # cross: 5 px at +contrast
        pattern = np.zeros((PATTERN, PATTERN), np.float32)
        pattern[PATTERN // 2, :] = contrast
        pattern[:, PATTERN // 2] = contrast
        return pattern
    return np.full((PATTERN, PATTERN), contrast * 5 / 9, np.float32)  # square: 9 px, same sum


def make_image(rng: np.random.Generator, size: int, label: int, patterns: int = 16,
               contrast: float = 100.0) -> np.ndarray:
    """One grayscale uint8 image (size x size): textured noise plus ``patterns`` squares (label 0) or
    crosses (label 1) of equal summed intensity at random places."""
    image = _texture(rng, size)
    pattern = _pattern(label, contrast)
    for _ in range(patterns):
        r, c = rng.integers(0, size - PATTERN, 2)
        image[r:r + PATTERN, c:c + PATTERN] += pattern
    return np.clip(image, 0, 255).astype(np.uint8)


def downsampled_difference(size: int, contrast: float = 100.0, target: int = 224) -> float:
    """Largest gray-level difference between a square and a cross (same place, flat background) once
    the image is resized to ``target`` with area averaging: what is left of the pattern's shape."""
    from PIL import Image

    out = []
    for label in (0, 1):
        image = np.full((size, size), 90.0, np.float32)
        r = c = size // 2
        image[r:r + PATTERN, c:c + PATTERN] += _pattern(label, contrast)
        out.append(np.asarray(Image.fromarray(image).resize((target, target), Image.BOX)))
    return float(np.abs(out[0] - out[1]).max())


def generate_dataset(directory: Path, *, images: int, val_images: int, size: int, seed: int,
                     patterns: int) -> Path:
    """Training images as tiled TIFF, validation images as PNG (grayscale; the reader broadcasts them
    to RGB without copying), and ``data.csv`` (path,label,split). Returns the CSV path."""
    import tifffile
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images + val_images):
        split = "train" if i < images else "val"
        label = i % 2
        image = make_image(rng, size, label, patterns)
        if split == "train":
            name = f"{split}_{i:03d}_{LABELS[label]}.tif"
            tifffile.imwrite(directory / name, image, tile=(256, 256) if size >= 256 else None,
                             photometric="minisblack")
        else:
            name = f"{split}_{i:03d}_{LABELS[label]}.png"
            Image.fromarray(image).save(directory / name, compress_level=1)
        rows.append((name, LABELS[label], split))
    path = directory / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def calibrate_batchnorm(model, crops) -> None:
    """Random init leaves BatchNorm running statistics at (0, 1), and streaming keeps norms frozen:
    set them from a few un-tiled crops instead (what pretrained weights would bring)."""
    import torch
    from torch import nn

    from timm_stream.models import StreamingModelMixin

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    with torch.no_grad():
        for crop in crops:
            # the base model's own (un-tiled) forward_features, so that the norms are not re-frozen
            super(StreamingModelMixin, model).forward_features(model.streamer.preprocess(crop))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(model.training)  # freezes the norms again


def one_cycle_adamw(lr: float, steps: int):
    """The demos' ``(optimizer, scheduler)`` factories for :class:`StreamingClassifier`: AdamW (weight decay
    1e-4) with a one-cycle learning rate peaking at ``lr`` over ``steps`` optimizer steps."""
    import torch

    def optimizer(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def scheduler(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)

    return optimizer, scheduler


def _peak_rss() -> int:
    """Peak resident memory of this process (bytes): Linux's VmHWM (``getrusage``'s ru_maxrss would
    carry a parent's peak over ``exec`` into a subprocess), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _untiled_worker(model_name: str, size: int, tile: int) -> None:
    """One un-tiled training step (AdamW) on a uint8 image; prints peak RSS and the runtime's baseline."""
    import torch
    import timm

    import timm_stream  # noqa: F401

    base = _peak_rss()
    model = timm.create_model(model_name, pretrained=False, num_classes=2, tile_size=tile, global_pool="max",
                              normalize_input=True)
    model.streaming = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters())
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    loss = torch.nn.functional.cross_entropy(model(image), torch.tensor([1]))
    loss.backward()
    optimizer.step()
    print(json.dumps({"peak_rss": _peak_rss(), "baseline_rss": base}))


def measure_untiled(model_name: str, size: int, tile: int) -> dict:
    code = (f"from timm_stream.lightning.demo import _untiled_worker; "
            f"_untiled_worker({model_name!r}, {size}, {tile})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"the un-tiled measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="timm-stream demo", description=__doc__.split("\n\n")[0],
        epilog="Writes everything (generated images, logs, checkpoints, the exported model) under --output-dir, "
               "by default ./timm_stream_demo in the current folder (git-ignored in a checkout); delete it "
               "afterwards. Defaults take a few minutes on 2 CPU cores.")
    parser.add_argument("--images", type=int, default=32, help="training images (default 32)")
    parser.add_argument("--val-images", type=int, default=16, help="validation images (default 16)")
    parser.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    parser.add_argument("--patterns", type=int, default=16, help="patterns per image (default 16)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument("--tile-size", type=int, default=384, help="tile side in px (default 384)")
    parser.add_argument("--model", default="stream_test_resnet",
                        help="streaming architecture (default stream_test_resnet; e.g. stream_resnet18)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (one-cycle schedule)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--output-dir", default="timm_stream_demo",
                        help="where the demo writes its images, logs, checkpoints and exported model "
                             "(default: ./timm_stream_demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrained", choices=("auto", "never"), default="auto",
                        help="auto: use pretrained weights if they are in the local HF cache (default)")
    parser.add_argument("--measure-untiled", action="store_true",
                        help="also measure one un-tiled training step's peak RSS in a subprocess")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--slide", action="store_true",
                        help="the whole-slide demo instead: lazy pyramidal slides, tissue masks, pooling while "
                             "streaming (timm-stream demo --slide --help)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry (``timm-stream demo``): runs :func:`run` (with ``--slide``: the whole-slide demo,
    :mod:`.demo_slide`), exit status 0."""
    if "--slide" in (argv if argv is not None else sys.argv[1:]):
        from .demo_slide import main as slide_main

        return slide_main(argv)
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict:
    """The demo; returns its numbers (accuracy, times, memory, checkpoint)."""
    args = parse_args(argv)
    start = time.perf_counter()
    import torch
    from huggingface_hub import constants as hf_constants
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .checkpoint import AtomicCheckpointIO
    from .data import LargeImageDataModule, read_image
    from .memory import estimate_training_memory
    from .module import StreamingClassifier, pretrained_weights_cached

    out = Path(args.output_dir)
    if (out / "checkpoints").is_dir():  # a previous run's: the best checkpoint must be this run's
        import shutil

        shutil.rmtree(out / "checkpoints")
    seed_everything(args.seed, workers=True, verbose=False)
    print(f"timm-stream demo: {args.images} training + {args.val_images} validation images of "
          f"{args.size}x{args.size} px, squares vs crosses of {PATTERN}x{PATTERN} px ({LABELS[0]}: 9 px, "
          f"{LABELS[1]}: 5 px, same summed intensity)")
    csv_path = generate_dataset(out / "data", images=args.images, val_images=args.val_images, size=args.size,
                                seed=args.seed, patterns=args.patterns)
    difference = downsampled_difference(args.size)
    verdict = ("the label is invisible there" if difference < 5 else
               "still visible at this size: use --size 1024 or more for the point of the demo")
    print(f"data: {csv_path} (train: tiled TIFF, val: PNG). Shrunk to 224x224, a square and a cross differ by "
          f"at most {difference:.2f} gray levels (of 255) against ~5 of pixel noise: {verdict}.")

    use_pretrained = args.pretrained == "auto" and pretrained_weights_cached(args.model)
    steps = args.epochs * math.ceil(args.images)
    optimizer, scheduler = one_cycle_adamw(args.lr, steps)

    previous_offline = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True  # cached weights or none: never reach the network
    try:
        module = StreamingClassifier(args.model, num_classes=2, tile_size=args.tile_size, pretrained=use_pretrained,
                                     global_pool="max", label_names=LABELS, optimizer=optimizer,
                                     scheduler=scheduler, scheduler_interval="step")
    finally:
        hf_constants.HF_HUB_OFFLINE = previous_offline
    if use_pretrained:
        print(f"model: {args.model}, pretrained weights from the local Hugging Face cache")
    else:
        train_files = sorted((out / "data").glob("train_*.tif"))[:8]
        crops = [torch.from_numpy(np.ascontiguousarray(read_image(p)[:256, :256].transpose(2, 0, 1)))[None]
                 for p in train_files]
        calibrate_batchnorm(module.model, crops)
        print(f"model: {args.model}, random init (no pretrained weights in the local cache; BatchNorm statistics "
              f"calibrated on {len(crops)} crops)")
    plan = module.model.stream_plan((args.size, args.size))
    print(f"streaming: tile {args.tile_size} px, {plan.num_tiles} tiles per image, overlap {plan.overlap:.2f}")

    data = LargeImageDataModule(csv=str(csv_path), num_workers=args.workers, batch_size=1, augment=True)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/acc", mode="max",
                                 save_last=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, callbacks=[checkpoint],
                      logger=CSVLogger(out, name="logs"), plugins=[AtomicCheckpointIO()], log_every_n_steps=5,
                      num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=not args.no_progress,
                      default_root_dir=out)
    train_start = time.perf_counter()
    trainer.fit(module, data)
    train_time = time.perf_counter() - train_start
    results = trainer.validate(module, data, ckpt_path=checkpoint.best_model_path or None, verbose=False)
    accuracy = float(results[0]["val/acc"])
    auroc = float(results[0].get("val/auroc", float("nan")))
    peak = _peak_rss()

    exported = None
    try:
        from .export import export_checkpoint

        if checkpoint.best_model_path:
            exported = export_checkpoint(checkpoint.best_model_path, out / "model",
                                         card={"training_data": "timm-stream demo: synthetic squares vs crosses"})
    except ImportError:
        pass

    estimate = estimate_training_memory(module.model, (args.size, args.size))
    total = time.perf_counter() - start
    chance = 0.5
    print("\n" + "=" * 78)
    print(f"validation accuracy: {accuracy:.3f} (AUROC {auroc:.3f}; chance {chance:.2f}) on {args.val_images} images "
          f"of {args.size}x{args.size}")
    print(f"time: {train_time:.0f} s training ({args.epochs} epochs x {args.images} images), {total:.0f} s in all, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"peak memory (process peak RSS, runtime included): {_gib(peak)}")
    print(f"one training step, streamed (estimate from the plan): {_gib(estimate.streamed_bytes)}; "
          f"un-tiled (estimate from the plan's activation counts): {_gib(estimate.untiled_bytes)} "
          f"(activations {_gib(estimate.untiled_activation_bytes)}), i.e. "
          f"{estimate.untiled_bytes / max(estimate.streamed_bytes, 1):.1f}x")
    measured = None
    if args.measure_untiled:
        measured = measure_untiled(args.model, args.size, args.tile_size)
        print(f"un-tiled training step, measured in a subprocess: peak RSS {_gib(measured['peak_rss'])} "
              f"(runtime baseline {_gib(measured['baseline_rss'])})")
    print(f"best checkpoint: {checkpoint.best_model_path}")
    if exported is not None:
        print(f"Hub-format model: {exported}  (python scripts/push_to_hub.py {exported} --repo-id <user>/<name>)")
    print("=" * 78)
    return {"accuracy": accuracy, "auroc": auroc, "train_time_s": train_time, "total_time_s": total,
            "peak_rss": peak, "streamed_estimate": estimate.streamed_bytes, "untiled_estimate": estimate.untiled_bytes,
            "untiled_measured": measured, "checkpoint": checkpoint.best_model_path}


if __name__ == "__main__":
    sys.exit(main())
