"""Benchmark one fp32 training step of a timm resnet18 trunk: un-tiled vs streamed (``StreamingCNN``).

What is measured
    Trunk: conv1, bn1, act1, maxpool, layer1..layer4 of ``timm.create_model("resnet18")``, randomized with
    ``timm_stream.testing.randomize_`` (BN frozen in eval by StreamingCNN). Input: a seeded random uint8
    image (1, 3, S, S), converted by ``preprocess=lambda t: t.float().div(255)`` inside StreamingCNN in
    both modes (streamed: per tile; un-tiled: ``streaming = False``, whole image). One train step =
    trunk -> global average pool -> Linear(512, 2) -> cross-entropy (label 1) -> backward -> SGD(lr=1e-3)
    over trunk and head. Every (mode, size) runs in its own subprocess, so that peak RSS
    (``ru_maxrss``, which includes the ~0.3-0.5 GiB of the Python/torch runtime, reported as ``base``)
    belongs to that mode alone. Setup = StreamingCNN construction; step = wall time of the last of
    ``--steps`` steps (the first is a warm-up when there are several).

Reproduce
    python scripts/benchmark.py                      # configs A, B, C (C: streamed only, 1 step)
    python scripts/benchmark.py --json results.json  # ... and save the numbers
    python scripts/benchmark.py --plot sweep.png     # memory / time vs image size at tile 2048
    python scripts/benchmark.py --small              # smoke test, small images (seconds)
    python scripts/benchmark.py --device cuda --configs A,B --steps 3   # on a GPU (image stays on the host)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 2 ** 30
# name: (image, tile, default steps, run un-tiled by default)
CONFIGS = {"A": (2400, 1600, 2, True), "B": (4096, 2048, 2, True), "C": (8192, 2048, 1, False)}
SMALL = {"A": (576, 384, 2, True), "B": (512, 256, 2, True), "C": (768, 256, 1, False)}
C_LIMIT_BYTES = 4e9  # "4 GB": decimal, 3.73 GiB


# ----------------------------------------------------------------------------------------- worker
def worker(mode: str, image: int, tile: int, steps: int, threads: int, device: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import resource
    from collections import OrderedDict

    import timm
    import torch
    from torch import nn

    from timm_stream import StreamingCNN
    from timm_stream.testing import randomize_

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    names = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    trunk = randomize_(nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names)), seed=0)
    head = nn.Linear(512, 2)
    del model
    device = torch.device(device)
    cuda = device.type == "cuda"
    trunk.to(device)
    head.to(device)
    image_u8 = torch.randint(0, 256, (1, 3, image, image), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(1))
    label = torch.tensor([1], device=device)  # the image stays on the host: tiles travel one by one
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    base = maxrss()

    start = time.perf_counter()
    net = StreamingCNN(trunk, tile, preprocess=lambda t: t.float().div(255))
    setup = time.perf_counter() - start
    net.streaming = mode == "streamed"
    net.train()
    result = {"mode": mode, "image": image, "tile": tile, "threads": threads, "setup_s": setup,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    if net.streaming:
        plan = net.plan((image, image), image_u8.dtype)
        result.update(tiles=plan.num_tiles, overlap=plan.overlap, plan=str(plan),
                      grids="+".join(f"{p.grid[0]}x{p.grid[1]}" for p in plan.pieces))
    optimizer = torch.optim.SGD(list(trunk.parameters()) + list(head.parameters()), lr=1e-3)
    if cuda:  # on a GPU the memory that matters is the device's: parameters + activations + gradients
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / GIB
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(net(image_u8).mean(dim=(2, 3))), label)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else maxrss()
    result.update(step_s=times[-1], step_times=times, loss=loss.item(), base_gib=base, peak_gib=peak,
                  host_peak_gib=maxrss())
    return result


# ----------------------------------------------------------------------------------------- parent
def measure(mode: str, image: int, tile: int, steps: int, threads: int, device: str = "cpu") -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--image", str(image),
           "--tile", str(tile), "--steps", str(steps), "--threads", str(threads), "--device", device]
    print(f"  running {mode:8s} image {image}  tile {tile}  steps {steps} ...", flush=True)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:  # e.g. killed for memory (-9): report and go on
        print(f"  !! {mode} worker failed with exit code {proc.returncode}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_configs(names: list[str], configs: dict, args) -> dict:
    results = {}
    for name in names:
        image, tile, default_steps, untiled = configs[name]
        steps = args.steps or default_steps
        print(f"config {name}: image {image}x{image}, tile {tile}")
        runs = {"untiled": measure("untiled", image, tile, steps, args.threads, args.device)
                if untiled or args.untiled_all else None,
                "streamed": measure("streamed", image, tile, steps, args.threads, args.device)}
        results[name] = {"image": image, "tile": tile, "steps": steps, **runs}
    first = next((m for r in results.values() for m in (r["untiled"], r["streamed"]) if m), None)
    print(f"\ndevice: {first['device'] if first else args.device}; peak = "
          + ("GPU memory allocated by torch (max_memory_allocated), base = before the step"
             if args.device.startswith("cuda") else "peak RSS of the process, base = RSS before setup"))
    print(f"{'cfg':3s} {'mode':8s} {'image':>6s} {'tile':>5s} {'setup s':>8s} {'step s':>8s} "
          f"{'peak GiB':>9s} {'base GiB':>9s}  plan")
    for name, r in results.items():
        for mode in ("untiled", "streamed"):
            m = r[mode]
            if m is None:
                print(f"{name:3s} {mode:8s} {r['image']:6d} {r['tile']:5d}  (not run)")
                continue
            plan = (f"{m['tiles']} tiles ({m['grids']}), overlap {m['overlap']:.3f}" if mode == "streamed"
                    else "whole image")
            print(f"{name:3s} {mode:8s} {m['image']:6d} {m['tile']:5d} {m['setup_s']:8.3f} {m['step_s']:8.2f} "
                  f"{m['peak_gib']:9.2f} {m['base_gib']:9.2f}  {plan}")
    print("\nratios streamed / un-tiled (this run) and targets:")
    for name, r in results.items():
        u, s = r["untiled"], r["streamed"]
        if u and s:
            r["time_ratio"], r["mem_ratio"] = s["step_s"] / u["step_s"], s["peak_gib"] / u["peak_gib"]
            print(f"  {name}: step time x{r['time_ratio']:.2f}, peak memory x{r['mem_ratio']:.2f}")
        targets = []
        if name == "A" and s:
            targets.append((f"setup {s['setup_s']:.3f} s <= 0.5 s", s["setup_s"] <= 0.5))
            if u:
                targets.append((f"step x{r['time_ratio']:.2f} <= 1.6", r["time_ratio"] <= 1.6))
        if name == "B" and u and s:
            targets.append((f"peak memory x{r['mem_ratio']:.2f} <= 0.40", r["mem_ratio"] <= 0.40))
            targets.append((f"step x{r['time_ratio']:.2f} <= 1.2", r["time_ratio"] <= 1.2))
        if name == "C" and s:
            peak = s["peak_gib"] * GIB
            targets.append((f"streamed peak {peak / 1e9:.2f} GB <= 4 GB ({C_LIMIT_BYTES / GIB:.2f} GiB)",
                            peak <= C_LIMIT_BYTES))
            if u is None:
                ref = results.get("B", {}).get("untiled")
                if ref:
                    r["untiled_peak_estimate_gib"] = est = ref["peak_gib"] * (r["image"] / ref["image"]) ** 2
                    print(f"  C: un-tiled not run; ESTIMATED peak {est:.1f} GiB (B's un-tiled peak x area), "
                          f"streamed/estimate x{s['peak_gib'] / est:.3f}")
                else:
                    print("  C: un-tiled not run (run config B too for an estimate of its peak)")
        for text, ok in targets:
            print(f"  {name}: {verdict(ok)}  {text}")
        if args.small and targets:
            print("     (small mode: the targets are meant for the full sizes)")
    return results


def run_sweep(args) -> list[dict]:
    sizes = [int(v) for v in args.plot_sizes.split(",")]
    runs = []
    for size in sizes:
        modes = ["untiled", "streamed"] if size <= args.plot_untiled_max else ["streamed"]
        for mode in modes:
            r = measure(mode, size, args.plot_tile, args.steps or 2, args.threads, args.device)
            if r:
                runs.append(r)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("untiled", "o-"), ("streamed", "s-")):
        pts = [r for r in runs if r["mode"] == mode]
        label = "un-tiled" if mode == "untiled" else f"streamed (tile {args.plot_tile})"
        axes[0].plot([r["image"] for r in pts], [r["peak_gib"] for r in pts], style, label=label)
        axes[1].plot([r["image"] for r in pts], [r["step_s"] for r in pts], style, label=label)
    memory = "peak GPU memory (GiB)" if args.device.startswith("cuda") else "peak RSS (GiB)"
    for ax, ylabel, title in ((axes[0], memory, "Peak memory of one train step"),
                              (axes[1], "step time (s)", "Time of one train step")):
        ax.set_xlabel("image size (px, square)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(sizes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    where = runs[0]["device"] if runs and args.device.startswith("cuda") else f"{args.threads} CPU threads"
    fig.suptitle(f"timm resnet18 trunk, fp32, batch 1, {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")
    for r in runs:
        print(f"  {r['mode']:8s} {r['image']:6d}  step {r['step_s']:7.2f} s  peak {r['peak_gib']:6.2f} GiB")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", help="comma-separated config names (A,B,C); default: all, or none with --plot")
    p.add_argument("--steps", type=int, help="train steps per run, the last is timed (default: 2; 1 for C)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads in the workers (default: all cores)")
    p.add_argument("--device", default="cpu", help="where the trunk runs, e.g. cuda (the image stays on the host)")
    p.add_argument("--small", action="store_true", help="smoke test: configs scaled down to <= 768 px")
    p.add_argument("--untiled-all", action="store_true", help="also run C un-tiled (needs ~45 GB)")
    p.add_argument("--json", help="save all results to this JSON file")
    p.add_argument("--plot", help="sweep image sizes and write this PNG (memory and time vs size)")
    p.add_argument("--plot-sizes", default="1024,2048,3072,4096,6144,8192")
    p.add_argument("--plot-tile", type=int, default=2048)
    p.add_argument("--plot-untiled-max", type=int, default=4096, help="largest size run un-tiled in the sweep")
    p.add_argument("--worker", choices=["untiled", "streamed"], help=argparse.SUPPRESS)
    p.add_argument("--image", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.image, args.tile, args.steps or 2, args.threads, args.device)),
              flush=True)
        return
    configs = SMALL if args.small else CONFIGS
    names = [] if args.configs is None and args.plot else (args.configs or ",".join(configs)).split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(configs)}")
    out = {"threads": args.threads, "small": args.small, "device": args.device}
    if names:
        out["configs"] = run_configs(names, configs, args)
    if args.plot:
        out["sweep"] = run_sweep(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
