"""``timm-stream demo --slide``: whole-slide training on the CPU, offline: lazy pyramidal slides, tissue masks,
pooling while streaming.

The task: each generated slide is mostly bright background with a few stained "tissue" regions (purple, textured);
inside the tissue lie tiny (3x3 px) bright patterns, all *squares* (label 0) or all *crosses* (label 1) of the
same summed intensity, invisible once the slide is shrunk. The slides are pyramidal TIFFs (level 0 plus two
reduced levels, tifffile SubIFDs). Training reads them lazily (:func:`timm_stream.open_image`, nothing whole in
memory), takes the tissue mask from the lowest level (:func:`timm_stream.tissue_mask`), and runs the whole
trunk streamed with the global pooling computed while streaming: tiles none of whose outputs lie in the tissue
are neither read nor computed.

What it prints: validation accuracy, wall time, the process's peak RSS, and the fraction of tiles skipped
because they hold no tissue.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .demo import LABELS, PATTERN, _gib, _pattern, _peak_rss, calibrate_batchnorm, one_cycle_adamw

__all__ = ["main", "run", "make_slide", "generate_slides", "tiles_with_tissue"]

BACKGROUND = (236, 234, 238)  # bright, unsaturated glass
TISSUE = (130, 70, 150)  # hematoxylin-stained tissue: purple, saturated


def make_slide(rng: np.random.Generator, size: int, label: int, patterns: int, regions: int = 3) -> np.ndarray:
    """One RGB uint8 slide ``(size, size, 3)``: background with ``regions`` elliptic tissue regions (soft
    borders, a smooth stain texture) holding ``patterns`` squares (label 0) or crosses (label 1) each."""
    from .demo import _texture

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    alpha = np.zeros((size, size), np.float32)
    centers = []
    for _ in range(regions):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.08, 0.16, 2) * size
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        # a soft border (over 30% of the radius): sharp tissue edges would outshine the tiny patterns
        alpha = np.maximum(alpha, np.clip((1.0 - r) / 0.3, 0.0, 1.0))
        centers.append((cy, cx, ry, rx))
    stain = _texture(rng, size) - 90  # the plain demo's smooth texture and pixel noise, around 0
    image = np.empty((size, size, 3), np.float32)
    for ch in range(3):
        image[..., ch] = alpha * (TISSUE[ch] + stain) + (1 - alpha) * BACKGROUND[ch]
    pattern = _pattern(label, 80.0)
    for cy, cx, ry, rx in centers:
        for _ in range(patterns):
            a, r = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.45))
            y, x = int(cy + r * ry * np.sin(a)), int(cx + r * rx * np.cos(a))
            y, x = min(max(y, 0), size - PATTERN), min(max(x, 0), size - PATTERN)
            image[y:y + PATTERN, x:x + PATTERN, :] += pattern[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pyramid(path: Path, image: np.ndarray) -> None:
    """Level 0 and two levels reduced 4x and 16x, as tifffile SubIFDs (how OME-TIFF and libvips store pyramids)."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        options = dict(photometric="rgb", compression="zlib", compressionargs={"level": 1})
        tif.write(image, tile=(256, 256), subifds=2, **options)
        for factor in (4, 16):
            level = image[::factor, ::factor]
            tile = 256 if min(level.shape[:2]) >= 256 else 16 * max(1, min(level.shape[:2]) // 16)
            tif.write(level, tile=(tile, tile), subfiletype=1, **options)


def generate_slides(directory: Path, *, slides: int, val_slides: int, size: int, seed: int, patterns: int) -> Path:
    """``slides`` + ``val_slides`` pyramidal TIFF slides and ``data.csv`` (path,label,split)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("train_*.tif"), *directory.glob("val_*.tif")]:  # an earlier run's slides
        stale.unlink()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(slides + val_slides):
        split = "train" if i < slides else "val"
        label = i % 2
        name = f"{split}_{i:03d}_{LABELS[label]}.tif"
        write_pyramid(directory / name, make_slide(rng, size, label, patterns))
        rows.append((name, LABELS[label], split))
    path = directory / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def tiles_with_tissue(plan, mask) -> tuple[int, int]:
    """(tiles of the pooled (last) piece with at least one output inside ``mask``, all its tiles): the others
    are neither read nor computed (the engine's rule, :func:`timm_stream.engine.final_mask`)."""
    from timm_stream.engine import final_mask

    piece = plan.pieces[-1]
    kept = final_mask(mask, 1, piece.output_size, mask.device)
    inside = sum(1 for tile in piece.tiles if bool(kept[:, :, tile.output_region[0], tile.output_region[1]].any()))
    return inside, piece.num_tiles


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="timm-stream demo --slide", description=__doc__.split("\n\n")[0],
        epilog="Defaults take a few minutes on 2 CPU cores. Everything is written under --output-dir "
               "(default ./timm_stream_demo_slide).")
    parser.add_argument("--slide", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slides", type=int, default=16, help="training slides (default 16)")
    parser.add_argument("--val-slides", type=int, default=8, help="validation slides (default 8)")
    parser.add_argument("--size", type=int, default=2048, help="slide side at level 0 in px (default 2048)")
    parser.add_argument("--patterns", type=int, default=12, help="patterns per tissue region (default 12)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--tile-size", type=int, default=512, help="tile side in px (default 512)")
    parser.add_argument("--pool", default="max", choices=("max", "avg", "avgmax", "attention"),
                        help="global pooling, computed while streaming (default max: 'is a pattern anywhere?')")
    parser.add_argument("--model", default="stream_test_resnet", help="streaming architecture")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (one-cycle schedule)")
    parser.add_argument("--output-dir", default="timm_stream_demo_slide", help="slides, logs, checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry (``timm-stream demo --slide``): runs :func:`run`, exit status 0."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict:
    """The whole-slide demo; returns its numbers (accuracy, times, memory, tiles skipped)."""
    args = parse_args(argv)
    start = time.perf_counter()
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    import timm_stream

    from .checkpoint import AtomicCheckpointIO
    from .data import LargeImageDataModule
    from .module import StreamingClassifier

    out = Path(args.output_dir)
    seed_everything(args.seed, workers=True, verbose=False)
    print(f"timm-stream demo --slide: {args.slides} training + {args.val_slides} validation slides of "
          f"{args.size}x{args.size} px (pyramidal TIFF, mostly background), {PATTERN}x{PATTERN}-px squares vs "
          "crosses inside the tissue")
    csv_path = generate_slides(out / "data", slides=args.slides, val_slides=args.val_slides, size=args.size,
                               seed=args.seed, patterns=args.patterns)

    optimizer, scheduler = one_cycle_adamw(args.lr, args.epochs * args.slides)

    module = StreamingClassifier(args.model, num_classes=2, tile_size=args.tile_size, pretrained=False,
                                 global_pool=args.pool, stream_stages=4, label_names=LABELS, optimizer=optimizer,
                                 scheduler=scheduler, scheduler_interval="step")
    # BatchNorm statistics from a few un-tiled tissue crops (random init leaves them at (0, 1); streaming
    # keeps norms frozen).
    train_files = sorted((out / "data").glob("train_*.tif"))[:6]
    crops = []
    for path in train_files:
        slide = timm_stream.open_image(path)
        mask = timm_stream.tissue_mask(slide)[0, 0]
        i, j = (int(v) for v in mask.nonzero()[len(mask.nonzero()) // 2])
        r = min(max(0, i * slide.shape[2] // mask.shape[0] - 128), slide.shape[2] - 256)
        c = min(max(0, j * slide.shape[3] // mask.shape[1] - 128), slide.shape[3] - 256)
        crops.append(slide[:, :, r:r + 256, c:c + 256])
    calibrate_batchnorm(module.model, crops)

    skipped, total_tiles = 0, 0
    for path in sorted((out / "data").glob("*.tif")):
        slide = timm_stream.open_image(path)
        plan = module.model.stream_plan(tuple(slide.shape[2:]), lazy=True)
        kept, tiles = tiles_with_tissue(plan, timm_stream.tissue_mask(slide))
        total_tiles += tiles
        skipped += tiles - kept
    print(f"model: {args.model}, whole trunk streamed, global_pool={args.pool!r} pooled while streaming "
          f"({'yes' if module.model.pooling_streamed else 'NO'}); tile {args.tile_size} px, "
          f"{plan.pieces[-1].num_tiles} tiles per slide in the pooled piece; tiles without tissue skipped: "
          f"{skipped}/{total_tiles} ({skipped / max(total_tiles, 1):.0%})")

    data = LargeImageDataModule(csv=str(csv_path), num_workers=0, batch_size=1, augment=True, lazy=True,
                                tissue_masks=True)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=CSVLogger(out, name="logs"),
                      plugins=[AtomicCheckpointIO()], log_every_n_steps=5, num_sanity_val_steps=0,
                      enable_model_summary=False, enable_progress_bar=not args.no_progress, default_root_dir=out,
                      enable_checkpointing=False)
    train_start = time.perf_counter()
    trainer.fit(module, data)
    train_time = time.perf_counter() - train_start
    results = trainer.validate(module, data, verbose=False)
    accuracy = float(results[0]["val/acc"])
    auroc = float(results[0].get("val/auroc", float("nan")))
    peak = _peak_rss()
    total = time.perf_counter() - start
    print("\n" + "=" * 78)
    print(f"validation accuracy: {accuracy:.3f} (AUROC {auroc:.3f}; chance 0.50) on {args.val_slides} slides of "
          f"{args.size}x{args.size}")
    print(f"time: {train_time:.0f} s training ({args.epochs} epochs x {args.slides} slides), {total:.0f} s in all, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"peak memory (process peak RSS, runtime included): {_gib(peak)}")
    print(f"tiles skipped (no tissue in their outputs): {skipped}/{total_tiles} = {skipped / max(total_tiles, 1):.0%}")
    print("=" * 78)
    return {"accuracy": accuracy, "auroc": auroc, "train_time_s": train_time, "total_time_s": total,
            "peak_rss": peak, "tiles_skipped": skipped, "tiles_total": total_tiles}
