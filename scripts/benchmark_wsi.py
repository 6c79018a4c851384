"""Whole-slide benchmark: memory flat in image size, time linear in pixels, background skipped.

What is measured
    One fp32 train step of ``timm.create_model("stream_resnet18", stream_stages=4, global_pool="avg",
    normalize_input=True, num_classes=2)`` (randomized with ``timm_stream.testing.randomize_``): the whole
    trunk and the average pooling run streamed, so no feature map of the image's size ever exists. The image is
    a tiled, uncompressed pyramidal TIFF written by this script (random texture, 512 px tiles) and opened lazily
    with ``timm_stream.open_image``: only tile regions (halo included) are read. Each (size, mask) runs in its own
    subprocess; peak = ``ru_maxrss`` of that process (the Python/torch runtime included; ``base`` = RSS before
    the step). The masked run uses a mask whose True region covers 30% of the slide (a block of rows), so tiles
    whose outputs lie outside it are neither read nor computed.

Targets (issue 11, this 2-core machine)
    peak RSS at the largest size within 15% of the peak at the smallest; time per pixel within 15%; the 30% mask
    costs <= 40% of the unmasked step at the smallest size.

Reproduce
    python scripts/benchmark_wsi.py                       # 4096 and 16384 px, tile 2048 (~30+ min on 2 cores)
    python scripts/benchmark_wsi.py --sizes 4096,8192     # a quicker pair
    python scripts/benchmark_wsi.py --small               # smoke test (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

GIB = 2 ** 30


def write_slide(path: str, size: int, tile: int = 512) -> None:
    """A tiled RGB TIFF of ``size``² pixels written tile by tile (never whole in memory)."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8)

    def tiles():
        for i in range(-(-size // tile)):
            for j in range(-(-size // tile)):
                yield np.roll(block, (i * 37 + j * 11) % tile, axis=(i + j) % 2)

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression=None)


def worker(path: str, size: int, tile: int, masked: float, threads: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import resource

    import timm
    import torch

    import timm_stream
    from timm_stream.testing import randomize_

    torch.set_num_threads(threads)
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # noqa: E731
    model = timm.create_model("stream_resnet18", stream_stages=4, global_pool="avg", tile_size=tile,
                              normalize_input=True, num_classes=2)
    randomize_(model, seed=0)
    model.train()
    slide = timm_stream.open_image(path)
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 100, 100, dtype=torch.bool)
        mask[:, :, : round(100 * masked)] = True
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    label = torch.tensor([1])
    base = maxrss()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(slide, mask=mask), label)
    loss.backward()
    optimizer.step()
    step = time.perf_counter() - start
    plan = model.stream_plan((size, size), lazy=True)
    computed = plan.num_tiles
    if mask is not None:
        from timm_stream.lightning.demo_slide import tiles_with_tissue

        inside, tiles = tiles_with_tissue(plan, mask)
        computed = plan.num_tiles - tiles + inside
    return {"size": size, "tile": tile, "masked": masked, "step_s": step, "peak_gib": maxrss(), "base_gib": base,
            "loss": loss.item(), "tiles": plan.num_tiles, "computed": computed, "pieces": len(plan.pieces),
            "pooling_streamed": model.pooling_streamed, "plan": str(plan)}


def measure(path: str, size: int, tile: int, masked: float, threads: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--size", str(size), "--tile", str(tile),
           "--masked", str(masked), "--threads", str(threads)]
    print(f"  running size {size}, tile {tile}, mask {masked or 'none'} ...", flush=True)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        print(f"  !! worker failed with exit code {proc.returncode}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4096,16384", help="comma-separated slide sizes (px, square)")
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--mask-fraction", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--small", action="store_true", help="smoke test: sizes 512,1024, tile 256")
    p.add_argument("--json", help="save the results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--masked", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.tile, args.masked, args.threads)), flush=True)
        return
    sizes = [512, 1024] if args.small else [int(s) for s in args.sizes.split(",")]
    tile = 256 if args.small else args.tile
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = os.path.join(tmp, f"slide_{size}.tif")
            write_slide(path, size)
            runs.append(measure(path, size, tile, 0.0, args.threads))
            if size == sizes[0]:
                runs.append(measure(path, size, tile, args.mask_fraction, args.threads))
            os.remove(path)
    print(f"\n{'size':>6s} {'tile':>5s} {'mask':>5s} {'tiles':>6s} {'computed':>8s} {'step s':>8s} {'s/Mpx':>7s} "
          f"{'peak GiB':>9s} {'base GiB':>9s}  pieces")
    for r in runs:
        if r:
            print(f"{r['size']:6d} {r['tile']:5d} {r['masked'] or '-':>5} {r['tiles']:6d} {r['computed']:8d} "
                  f"{r['step_s']:8.2f} {r['step_s'] / r['size'] ** 2 * 1e6:7.3f} {r['peak_gib']:9.2f} "
                  f"{r['base_gib']:9.2f}  {r['pieces']} (pooling streamed: {r['pooling_streamed']})")
    full = [r for r in runs if r and not r["masked"]]
    small, large = (full[0], full[-1]) if len(full) >= 2 else (None, None)
    masked = next((r for r in runs if r and r["masked"]), None)
    print("\ntargets:")
    if small and large:
        mem = large["peak_gib"] / small["peak_gib"]
        per_px = (large["step_s"] / large["size"] ** 2) / (small["step_s"] / small["size"] ** 2)
        print(f"  {'PASS' if mem <= 1.15 else 'FAIL'}  peak RSS {large['size']}² / {small['size']}² = x{mem:.3f} "
              "(<= 1.15)")
        print(f"  {'PASS' if abs(per_px - 1) <= 0.15 else 'FAIL'}  time per pixel {large['size']}² / "
              f"{small['size']}² = x{per_px:.3f} (within 15%)")
    if small and masked:
        ratio = masked["step_s"] / small["step_s"]
        print(f"  {'PASS' if ratio <= 0.40 else 'FAIL'}  {masked['masked']:.0%} mask: step x{ratio:.3f} of the "
              "unmasked one (<= 0.40)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
