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

Mode comparison (``--compare``; issue 12): one image size (default 4096², tile 2048 = config B), every mode
in its own process, side by side:
    untiled      the trunk un-tiled (``StreamingCNN.streaming = False``)
    checkpoint   un-tiled with timm's own gradient checkpointing: the full timm resnet18 (same randomized
                 modules), ``model.set_grad_checkpointing(True)``, trunk = ``model.forward_features``
    lightstream  lightstream 1.0.7 (``pip install --no-deps lightstream==1.0.7``; skipped when absent):
                 its ``StreamingConstructor`` around the same trunk at the same tile, input normalized per
                 tile by lightstream (mean 0, std 1: the same /255), its manual streamed backward
    default      timm_stream ``StreamingCNN`` at the config's tile (as ``streamed`` above)
    budget40, budget100   ``StreamingCNN(trunk, memory_budget=f * the un-tiled run's measured peak)``:
                 the un-tiled run always goes first and its peak is handed to these workers
In every mode the BN layers are in eval with their affine parameters frozen (lightstream corrects only
convolution gradients, so its recipe freezes norms; the others do the same so that the work, and the
loss after the steps, are the same everywhere). Memory: peak RSS of the worker beyond its RSS right
before the first step (measured after setup, ``gc.collect()`` and ``malloc_trim(0)``; the high-water
mark is reset through ``/proc/self/clear_refs`` so that setup, e.g. lightstream's full-tile statistics
pass, does not count); the peak covers every step, the first (untimed) one included; no warm-up run.
Every worker runs with glibc's default allocator settings, as a user's process does; timm_stream's engine
fixes glibc's mmap threshold itself under a memory budget (at the one the chosen plan was costed for:
32 MiB, glibc's largest dynamic value, or 256 KiB; ``--malloc-fixed``: ``MALLOC_MMAP_THRESHOLD_=33554432``
in every worker, so that the same blocks are mapped, and fault in fresh pages, in every mode).
On CUDA: ``max_memory_allocated`` beyond ``memory_allocated`` before the first step. Time: the fastest of
steps 2..``--steps`` (default 3; step 1 is a warm-up whose memory counts; step-to-step noise on a shared
CPU is several percent). The timm_stream modes also print the planner's prediction
(``plan.peak_memory``, ``plan.relative_time``; un-tiled: ``plan.untiled_memory``) next to the measurement.
    python scripts/benchmark.py --compare --plot-modes modes.png --json modes.json   # ~10+ min on 2 cores
    python scripts/benchmark.py --compare --small          # 512², tile 256: a smoke test (about a minute)
    python scripts/benchmark.py --compare --modes untiled,default,budget40
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

GIB = 2 ** 30
# name: (image, tile, default steps, run un-tiled by default)
CONFIGS = {"A": (2400, 1600, 2, True), "B": (4096, 2048, 2, True), "C": (8192, 2048, 1, False)}
SMALL = {"A": (576, 384, 2, True), "B": (512, 256, 2, True), "C": (768, 256, 1, False)}
C_LIMIT_BYTES = 4e9  # "4 GB": decimal, 3.73 GiB
# the mode comparison: (image, tile) full and --small
COMPARE, COMPARE_SMALL = (4096, 2048), (512, 256)
MODES = ("untiled", "checkpoint", "lightstream", "default", "budget40", "budget100")
BUDGET_FRACTIONS = {"budget40": 0.40, "budget100": 1.00}
# --malloc-fixed: every mode's worker runs with glibc's mmap threshold fixed at the value timm_stream's
# engine sets when it tiles under a budget on the CPU (engine/function.py, HOST_MMAP_THRESHOLD), so that
# which blocks are mapped (page faults) and which come from the heap is the same in every mode.
COMPARE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20)}
LIGHTSTREAM_MAX_TILES = 64  # beyond this its backward would run for hours on a CPU: skipped


# ----------------------------------------------------------------------------------------- worker
def _resnet18_setup(threads: int, image: int):
    """What every worker starts from: timm's resnet18, its trunk (conv1..layer4, the model's own modules,
    randomized with seed 0), a Linear(512, 2) head, and the seeded uint8 image (1, 3, image, image) on the
    host."""
    from collections import OrderedDict

    import timm
    import torch
    from torch import nn

    from timm_stream.testing import randomize_

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    names = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    trunk = randomize_(nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names)), seed=0)
    head = nn.Linear(512, 2)
    image_u8 = torch.randint(0, 256, (1, 3, image, image), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(1))
    return model, trunk, head, image_u8


def worker(mode: str, image: int, tile: int, steps: int, threads: int, device: str) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import resource

    import torch
    from torch import nn

    from timm_stream import StreamingCNN

    model, trunk, head, image_u8 = _resnet18_setup(threads, image)
    del model
    device = torch.device(device)
    cuda = device.type == "cuda"
    trunk.to(device)
    head.to(device)
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


# ----------------------------------------------------------------------------------------- mode worker
def to_float(t):
    """The preprocessing of every mode: uint8 pixels to float in [0, 1] (module level: picklable)."""
    return t.float().div(255)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak resident memory (bytes) since the process start or the last :func:`_reset_host_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the mode comparison measures memory on Linux only")


def _reset_host_peak() -> tuple[int, bool]:
    """Return freed heap memory to the OS, then restart the peak-RSS high-water mark at the current RSS.

    Returns (RSS in bytes, whether the mark was reset). Without the trim, memory that setup freed but
    glibc kept would be reused by the step without raising the RSS, and the step's peak would look smaller
    in a mode with a heavy setup (lightstream's full-tile statistics pass) than in the others.
    """
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM (and ru_maxrss) restart at the current RSS
        reset = True
    except OSError:
        reset = False
    return _rss_bytes(), reset


def _freeze_norms(module) -> None:
    """Norm layers in eval with frozen affine parameters: lightstream's recipe, applied in every mode."""
    from timm_stream.engine import is_norm_layer

    for m in module.modules():
        if is_norm_layer(m):
            m.eval()
            m.requires_grad_(False)


def _build_lightstream(trunk, tile: int, device):
    """lightstream 1.0.7's streaming wrapper around ``trunk`` (its ``StreamingConstructor``, as its
    ``StreamingResNet`` builds it: BatchNorm2d kept, norms frozen). The constructor only knows CUDA: with
    ``statistics_on_cpu=True`` it moves the module to CUDA after the statistics pass, with ``False`` it
    moves the module to CUDA in ``__init__``. We build with ``True`` and switch the flag off before
    ``prepare_streaming_model()``, so the statistics run and the module stays on ``device``."""
    import contextlib

    import torch
    from lightstream.core.constructor import StreamingConstructor

    with contextlib.redirect_stdout(sys.stderr):  # its progress prints must not mix with our JSON line
        constructor = StreamingConstructor(trunk, tile, verbose=False, copy_to_gpu=False, statistics_on_cpu=True,
                                           normalize_on_gpu=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                           add_keep_modules=[torch.nn.BatchNorm2d])
        if device.type == "cpu":
            constructor.statistics_on_cpu = False
        scnn = constructor.prepare_streaming_model()
    scnn.device = device
    scnn.mean, scnn.std = scnn.mean.to(device), scnn.std.to(device)
    return scnn


def mode_worker(mode: str, image: int, tile: int, steps: int, threads: int, device: str,
                budget: int | None) -> dict:
    """One mode of the comparison in this process: setup, ``steps`` train steps, time and memory."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import inspect

    import torch
    from torch import nn

    from timm_stream import StreamingCNN
    from timm_stream import engine

    # the trunk holds the full model's modules (so the same randomized weights): checkpoint runs the model
    model, trunk, head, image_u8 = _resnet18_setup(threads, image)
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.to(device)
    head.to(device)
    _freeze_norms(model)
    label = torch.tensor([1], device=device)  # the image stays on the host (tiles travel one by one)
    result = {"mode": mode, "image": image, "tile": tile, "threads": threads, "budget_bytes": budget,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    budget_error = getattr(engine, "MemoryBudgetError", None) or ValueError

    start = time.perf_counter()
    net = scnn = None
    if mode == "checkpoint":
        model.set_grad_checkpointing(True)  # timm's own: checkpoint_seq over the blocks of layer1..layer4
        model.train()
        _freeze_norms(model)
        forward = lambda x: model.forward_features(to_float(x.to(device)))  # noqa: E731
    elif mode == "lightstream":
        scnn = _build_lightstream(trunk, tile, device)
        _freeze_norms(scnn.stream_module)
        trunk = scnn.stream_module  # its convolutions were replaced: optimize the modules it runs
        # its backward steps by the tile minus the input-gradient border it measured, in multiples of the
        # output stride: a tile not much larger than twice that border means (very) many backward tiles
        lost, stride = scnn.tile_gradient_lost, int(scnn.output_stride[1])
        valid = int(tile - lost.top - lost.bottom) // stride * stride
        if valid <= 0:
            return {**result, "error": f"lightstream cannot run tile {tile}: its input-gradient border is "
                    f"{int(lost.top)}+{int(lost.bottom)} px; use a larger --compare-tile"}
        result["tiles"] = math.ceil((image - lost.top - lost.bottom) / valid) ** 2 if image > tile else 1
        if result["tiles"] > LIGHTSTREAM_MAX_TILES:  # e.g. tile 1024 on resnet18: a 32 px stride, 1156 tiles at 2048²
            return {**result, "error": f"lightstream would recompute {result['tiles']} tiles of {tile}² in "
                    f"backward (its input-gradient border of {int(lost.top)}+{int(lost.bottom)} px leaves a "
                    f"{valid} px stride); use a larger --compare-tile"}
    else:
        if mode in BUDGET_FRACTIONS:
            if "memory_budget" not in inspect.signature(StreamingCNN).parameters:
                return {**result, "skipped": "this timm_stream has no StreamingCNN(memory_budget=) (issue 12)"}
            try:
                net = StreamingCNN(trunk, preprocess=to_float, memory_budget=budget)
            except budget_error as e:
                return {**result, "error": str(e), "minimum_bytes": getattr(e, "minimum", None)}
        else:
            net = StreamingCNN(trunk, tile, preprocess=to_float)
        net.streaming = mode != "untiled"
        net.train()
        forward = net
    result["setup_s"] = time.perf_counter() - start
    if net is not None:
        try:
            plan = net.plan((image, image), image_u8.dtype)
        except budget_error as e:
            return {**result, "error": str(e), "minimum_bytes": getattr(e, "minimum", None)}
        result.update(plan=str(plan), tiles=plan.num_tiles,
                      grids="+".join(f"{p.grid[0]}x{p.grid[1]}" for p in plan.pieces))
        if hasattr(plan, "peak_memory"):  # the planner of issue 12
            result.update(predicted_bytes=plan.untiled_memory if mode == "untiled" else plan.peak_memory,
                          predicted_time_ratio=1.0 if mode == "untiled" else plan.relative_time,
                          kept=list(plan.kept), fits_untiled=plan.fits_untiled)
    params = [p for p in list(trunk.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if scnn is not None:  # lightstream's manual backward (its LightningStreamingModule does the same)
            fmap = scnn(image_u8)  # no autograd graph: forward runs under no_grad
            fmap.requires_grad_(True)
            loss = nn.functional.cross_entropy(head(fmap.mean(dim=(2, 3))), label)
            loss.backward()
            scnn.backward(image_u8, fmap.grad)
        else:
            loss = nn.functional.cross_entropy(head(forward(image_u8).mean(dim=(2, 3))), label)
            loss.backward()
        optimizer.step()
        return loss.item()

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base, reset = torch.cuda.memory_allocated(device), True
    else:
        base, reset = _reset_host_peak()
    times, losses = [], []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            loss = step()
            losses.append(loss)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except budget_error as e:
        return {**result, "error": str(e), "minimum_bytes": getattr(e, "minimum", None)}
    except RuntimeError as e:
        if scnn is None:
            raise
        # lightstream fails inside its backward for some image/tile sizes (e.g. 1024² at tile 512 on
        # resnet18: a convolution-gradient input one pixel short); report it as its column's result
        return {**result, "error": f"lightstream failed: {str(e).splitlines()[0]}"}
    peak = torch.cuda.max_memory_allocated(device) if cuda else _hwm_bytes()
    # the fastest step after the first (a warm-up): step-to-step noise on a shared CPU is several percent
    # (the same un-tiled step measured 34.5 s and 39.2 s as the last of 2 in two runs)
    result.update(step_s=min(times[1:] or times), step_times=times, loss=loss, losses=losses, base_bytes=base,
                  peak_bytes=peak - base,
                  total_peak_bytes=peak, peak_reset=reset)
    return result


# ----------------------------------------------------------------------------------------- parent
def _spawn(cmd: list[str], label: str, env: dict | None = None) -> dict | None:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *cmd], check=False, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if proc.returncode != 0:  # e.g. killed for memory (-9): report and go on
        print(f"  !! {label} worker failed with exit code {proc.returncode}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(mode: str, image: int, tile: int, steps: int, threads: int, device: str = "cpu") -> dict | None:
    print(f"  running {mode:8s} image {image}  tile {tile}  steps {steps} ...", flush=True)
    return _spawn(["--worker", mode, "--image", str(image), "--tile", str(tile), "--steps", str(steps),
                   "--threads", str(threads), "--device", device], mode)


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


def measure_mode(mode: str, image: int, tile: int, steps: int, threads: int, device: str,
                 budget: int | None, env: dict | None = None) -> dict:
    where = f"budget {budget / GIB:.3f} GiB" if budget is not None else f"tile {tile}"
    print(f"  running {mode:11s} image {image}  {where}  steps {steps} ...", flush=True)
    cmd = ["--mode-worker", mode, "--image", str(image), "--tile", str(tile), "--steps", str(steps),
           "--threads", str(threads), "--device", device]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    return _spawn(cmd, mode, env) or {"mode": mode, "failed": True}


def _gib(value) -> str:
    return f"{value / GIB:.3f}" if value is not None else "-"


def run_compare(args) -> dict:
    """The mode comparison of issue 12 (see the module docstring): one image size, a process per mode."""
    image, tile = COMPARE_SMALL if args.small else COMPARE
    image, tile = args.compare_image or image, args.compare_tile or tile
    steps = args.steps or 3
    modes = [m for m in MODES if m in args.modes.split(",")]  # fixed order: un-tiled first (budgets need it)
    print(f"mode comparison: image {image}x{image}, tile {tile} (default and lightstream), {steps} steps, "
          f"{args.threads} threads, {args.device}, glibc mmap threshold "
          + ("glibc's default (the engine fixes it under a budget)" if not getattr(args, "malloc_fixed", False)
             else f"{COMPARE_ENV['MALLOC_MMAP_THRESHOLD_']} bytes in every mode"))
    runs: dict[str, dict] = {}
    for mode in modes:
        budget = None
        if mode == "lightstream" and importlib.util.find_spec("lightstream") is None:
            note = "lightstream is not installed (pip install --no-deps lightstream==1.0.7)"
            print(f"  skipping lightstream: {note}")
            runs[mode] = {"mode": mode, "skipped": note}
            continue
        if mode in BUDGET_FRACTIONS:
            untiled = runs.get("untiled", {})
            if "peak_bytes" not in untiled:
                note = "needs the un-tiled run's measured peak, which is missing"
                print(f"  skipping {mode}: {note}")
                runs[mode] = {"mode": mode, "skipped": note}
                continue
            budget = int(BUDGET_FRACTIONS[mode] * untiled["peak_bytes"])
        runs[mode] = measure_mode(mode, image, tile, steps, args.threads, args.device, budget,
                                  COMPARE_ENV if getattr(args, "malloc_fixed", False) else None)
    ref = runs.get("untiled", {})
    done = {m: r for m, r in runs.items() if "step_s" in r}
    for r in done.values():
        if "step_s" in ref:
            r["time_ratio"] = r["step_s"] / ref["step_s"]
            r["mem_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
        if r.get("predicted_bytes"):
            r["prediction_ratio"] = r["predicted_bytes"] / r["peak_bytes"]

    memory = ("GPU memory: max_memory_allocated beyond memory_allocated before the first step"
              if args.device.startswith("cuda") else
              "peak RSS beyond the RSS right before the first step (all steps, the first included)")
    timing = f"the fastest of steps 2..{steps} (step 1 is a warm-up)" if steps > 1 else "the one step"
    print(f"\ndevice: {next(iter(done.values()))['device'] if done else args.device}; step = {timing}; "
          f"peak = {memory}; pred = the planner's plan.peak_memory (un-tiled: plan.untiled_memory) and "
          "plan.relative_time")
    print(f"{'mode':11s} {'step s':>8s} {'time x':>7s} {'peak GiB':>9s} {'mem x':>6s} {'pred GiB':>9s} "
          f"{'pred/meas':>9s} {'pred time x':>11s} {'setup s':>8s} {'loss':>10s}  plan")
    for mode, r in runs.items():
        if "step_s" not in r:
            why = r.get("skipped") or r.get("error") or "worker failed"
            print(f"{mode:11s} (not measured: {why})")
            continue
        plan = f"{r['tiles']} tiles ({r.get('grids', '-')})" if r.get("tiles") and mode != "untiled" else ""
        if r.get("kept"):
            plan += f", kept {'+'.join(map(str, r['kept']))}"
        if r.get("budget_bytes") is not None:
            plan += f", budget {_gib(r['budget_bytes'])} GiB"
        if mode == "untiled":
            plan = "whole image"
        if mode == "checkpoint":
            plan = "timm set_grad_checkpointing(True)"
        if mode == "lightstream":
            plan = f"lightstream 1.0.7, tile {r['tile']}, {r.get('tiles', '?')} backward tiles"
        ratio = lambda key, fmt: format(r[key], fmt) if key in r else format("-", ">" + fmt[:-3])  # noqa: E731
        pred_time = format(r["predicted_time_ratio"], ".3f") if r.get("predicted_time_ratio") else "-"
        print(f"{mode:11s} {r['step_s']:8.2f} {ratio('time_ratio', '7.3f')} {_gib(r['peak_bytes']):>9s} "
              f"{ratio('mem_ratio', '6.3f')} {_gib(r.get('predicted_bytes')):>9s} "
              f"{ratio('prediction_ratio', '9.3f')} {pred_time:>11s} {r['setup_s']:8.3f} {r['loss']:10.6f}  {plan}")
        if not r.get("peak_reset", True):
            print(f"{'':11s} (!! the peak-RSS mark could not be reset: setup is included in this peak)")
    if "untiled" in done and len(done) > 1:
        def spread(i):
            ref = done["untiled"]["losses"][i]
            return max(abs(r["losses"][i] - ref) for r in done.values()) / max(abs(ref), 1e-12)
        first, last = spread(0), spread(-1)
        print(f"loss of step 1 (the forward) and of step {steps} (after {steps - 1} updates): largest relative "
              f"difference to un-tiled {first:.1e} and {last:.1e}"
              + ("" if max(first, last) <= 1e-4 else "  (!! the modes do not compute the same: check them)"))
    if "default" in done and "lightstream" in done:
        d, ls = done["default"], done["lightstream"]
        print(f"timm_stream default / lightstream (same tile): time x{d['step_s'] / ls['step_s']:.3f}, "
              f"memory x{d['peak_bytes'] / ls['peak_bytes']:.3f}, setup {d['setup_s']:.3f} s vs "
              f"{ls['setup_s']:.3f} s")

    targets = compare_targets(runs)
    print("\ntargets (issue 12: 2-core CPU, 4096², resnet18 trunk):")
    for text, ok in targets:
        print(f"  {verdict(ok)}  {text}")
    if not targets:
        print("  (none measurable in this run)")
    if args.small or image != COMPARE[0]:
        print(f"     (image {image}²: the targets are meant for {COMPARE[0]}²)")
    result = {"image": image, "tile": tile, "steps": steps, "runs": runs,
              "targets": [{"target": t, "ok": ok} for t, ok in targets]}
    if args.plot_modes:
        plot_modes(result, args)
    return result


def compare_targets(runs: dict[str, dict]) -> list[tuple[str, bool]]:
    """Issue 12's targets for the measured modes, as (text, passed): budget40 <= 1.10x and budget100 <=
    1.03x the un-tiled step; every budget mode below checkpoint's memory at no more time (a budget at or
    above checkpoint's peak: no more time than checkpoint, as memory cannot be less); measured peak <=
    1.1x the budget; the planner's prediction within 20% of the measured peak. Expects the ratios that
    run_compare adds (time_ratio, prediction_ratio)."""
    done = {m: r for m, r in runs.items() if "step_s" in r}
    targets = []
    for mode, limit in (("budget40", 1.10), ("budget100", 1.03)):
        if mode in done and "time_ratio" in done[mode]:
            targets.append((f"{mode}: step x{done[mode]['time_ratio']:.3f} of un-tiled <= {limit:.2f}",
                            done[mode]["time_ratio"] <= limit))
    ckpt = done.get("checkpoint")
    for mode in BUDGET_FRACTIONS:
        r = done.get(mode)
        if r is None:
            if mode in runs and "error" in runs[mode]:
                targets.append((f"{mode}: refused: {runs[mode]['error'].splitlines()[0]}", False))
            continue
        if ckpt and r["budget_bytes"] < ckpt["peak_bytes"]:
            targets.append((f"{mode}: less memory than checkpoint ({_gib(r['peak_bytes'])} < "
                            f"{_gib(ckpt['peak_bytes'])} GiB) at no more time ({r['step_s']:.2f} <= "
                            f"{ckpt['step_s']:.2f} s)",
                            r["peak_bytes"] < ckpt["peak_bytes"] and r["step_s"] <= ckpt["step_s"]))
        elif ckpt:  # a budget above checkpoint's peak cannot use less memory: it must then be the faster one
            targets.append((f"{mode}: budget {_gib(r['budget_bytes'])} GiB >= checkpoint's peak "
                            f"{_gib(ckpt['peak_bytes'])} GiB, so no more time than checkpoint ({r['step_s']:.2f} <= "
                            f"{ckpt['step_s']:.2f} s)", r["step_s"] <= ckpt["step_s"]))
        targets.append((f"{mode}: measured peak {_gib(r['peak_bytes'])} GiB <= 1.1 x budget "
                         f"{_gib(r['budget_bytes'])} GiB", r["peak_bytes"] <= 1.1 * r["budget_bytes"]))
    for mode, r in done.items():
        if "prediction_ratio" in r:
            targets.append((f"{mode}: predicted peak {_gib(r['predicted_bytes'])} GiB within 20% of measured "
                            f"{_gib(r['peak_bytes'])} GiB (x{r['prediction_ratio']:.3f})",
                            abs(r["prediction_ratio"] - 1) <= 0.20))
    return targets


def plot_modes(compare: dict, args) -> None:
    """Step time (y) against peak memory beyond the base (x), one labelled point per measured mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in compare["runs"].values() if "step_s" in r), key=lambda r: r["peak_bytes"])
    untiled = compare["runs"].get("untiled", {}).get("step_s")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    predicted = False
    for r in runs:
        streamed = r["mode"] in ("default", *BUDGET_FRACTIONS)
        x, y = r["peak_bytes"] / GIB, r["step_s"]
        ax.plot(x, y, "o" if streamed else "s", markersize=8,
                color="C0" if streamed else "C1" if r["mode"] == "lightstream" else "C7")
        # points at about the same memory (un-tiled and budget100): the lower one's label goes below it
        below = any(abs(o["peak_bytes"] - r["peak_bytes"]) < 0.03 * runs[-1]["peak_bytes"] and o["step_s"] > y
                    for o in runs if o is not r)
        ax.annotate(r["mode"], (x, y), textcoords="offset points", xytext=(6, -14 if below else 6))
        if r.get("budget_bytes") is not None:
            ax.axvline(r["budget_bytes"] / GIB, color="C0", linestyle=":", linewidth=1)
        if streamed and r.get("predicted_bytes") and r.get("predicted_time_ratio") and untiled:
            px, py = r["predicted_bytes"] / GIB, r["predicted_time_ratio"] * untiled
            ax.plot([px, x], [py, y], "-", color="C0", linewidth=0.6, alpha=0.6)
            ax.plot(px, py, "o", markersize=8, markerfacecolor="none", color="C0",
                    label=None if predicted else "planner's prediction (x un-tiled time)")
            predicted = True
    if predicted:
        ax.legend(loc="upper right", fontsize=8)
    memory = "peak GPU memory beyond the base (GiB)" if args.device.startswith("cuda") else \
        "peak RSS beyond the base (GiB)"
    ax.set_xlabel(memory)
    ax.set_ylabel("step time (s)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    where = runs[0]["device"] if runs and args.device.startswith("cuda") else f"{args.threads} CPU threads"
    ax.set_title(f"One train step, timm resnet18 trunk, {compare['image']}², fp32, {where}\n"
                 "dotted: the memory budgets", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot_modes, dpi=120)
    print(f"wrote {args.plot_modes}")


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
    p.add_argument("--compare", action="store_true",
                   help="the mode comparison (untiled, checkpoint, lightstream, default, budget40, budget100)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes for --compare (default: all)")
    p.add_argument("--compare-image", type=int, help=f"image size for --compare (default {COMPARE[0]}; "
                   f"--small: {COMPARE_SMALL[0]})")
    p.add_argument("--compare-tile", type=int, help=f"tile of default and lightstream (default {COMPARE[1]}; "
                   f"--small: {COMPARE_SMALL[1]})")
    p.add_argument("--malloc-fixed", action="store_true",
                   help="--compare: fix glibc's mmap threshold at 32 MiB in every worker (default: glibc's "
                        "dynamic threshold, as in a user's process; the engine fixes it under a memory budget)")
    p.add_argument("--plot-modes", help="with --compare (implied): write step time vs peak memory to this PNG")
    p.add_argument("--worker", choices=["untiled", "streamed"], help=argparse.SUPPRESS)
    p.add_argument("--mode-worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    p.add_argument("--image", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.image, args.tile, args.steps or 2, args.threads, args.device)),
              flush=True)
        return
    if args.mode_worker:
        print(json.dumps(mode_worker(args.mode_worker, args.image, args.tile, args.steps or 2, args.threads,
                                     args.device, args.budget)), flush=True)
        return
    compare = args.compare or args.plot_modes is not None
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {','.join(MODES)}")
    configs = SMALL if args.small else CONFIGS
    names = ([] if args.configs is None and (args.plot or compare)
             else (args.configs or ",".join(configs)).split(","))
    unknown = [n for n in names if n not in configs]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(configs)}")
    out = {"threads": args.threads, "small": args.small, "device": args.device}
    if names:
        out["configs"] = run_configs(names, configs, args)
    if compare:
        out["compare"] = run_compare(args)
    if args.plot:
        out["sweep"] = run_sweep(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
