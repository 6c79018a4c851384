"""Prove which timm architectures can be streamed, and how far; write ``architectures.json``.

For every candidate architecture of the families timm_stream can split (see
``timm_stream/models/_families.py``):

1. build the base model (random init, nothing downloaded);
2. find the largest prefix of its four stages whose every operation is local (the tracer refuses
   anything else and names the first non-local module);
3. build ``stream_<arch>`` with that prefix, randomize *every* parameter and BN statistic, and check in
   float64, for each axis on an image cut into several tiles along it (not aligned to the stride), that
   the streamed model's output, input gradient and every parameter gradient equal the un-tiled run
   (relative error ≤ 1e-9), and that its output equals the base model's own ``forward``.

Architectures with at least one local stage that pass are written to
``timm_stream/models/architectures.json`` (with ``--write``); only those are registered.

    python scripts/check_architectures.py                 # check the registered ones
    python scripts/check_architectures.py --discover --write   # check all candidates, rewrite the table
    python scripts/check_architectures.py --only resnet50,convnext_tiny
    python scripts/check_architectures.py --discover --write --report r.json --resume   # go on after a stop
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

import timm_stream  # noqa: E402,F401  (registers stream_<arch>)
from timm_stream.engine import NonLocalModuleError, StreamingCNN  # noqa: E402
from timm_stream.models import architectures, create_stream_model, split_trunk  # noqa: E402
from timm_stream.models._families import family_of  # noqa: E402
from timm_stream.testing import compare_streaming, randomize_, relative_error  # noqa: E402

TABLE = Path(__file__).resolve().parents[1] / "timm_stream" / "models" / "architectures.json"
# The families timm_stream targets (fnmatch patterns on timm names). Variants whose layers are not local
# anyway are left out up front: tf_* (padding computed from the input size) and the SE/ECA/attention
# variants of the resnet module; giant models are left out to keep the check within an hour or two.
CANDIDATES = ("test_*", "resnet[0-9]*", "resnext*", "wide_resnet*", "resnetaa*", "resnetblur*", "res2net*",
              "res2next*", "resnetv2_*", "convnext_*", "regnetx_*", "vgg*", "densenet*", "dla*", "cspresnet*",
              "cspresnext*", "cspdarknet*", "darknet*", "cs3*", "xception*", "legacy_xception",
              "efficientnet_lite*", "efficientnetv2_*", "mobilenetv3_*", "mobilenetv4_conv_*")
EXCLUDED = ("resnext101_32x32d", "resnext101_32x48d", "resnetv2_152x4*", "resnetv2_101x3*", "resnetv2_152x2*",
            "convnext_xxlarge*", "vgg*_bn_*")
TOLERANCE = 1e-9


def candidates() -> list[str]:
    names = set()
    for pattern in CANDIDATES:
        names.update(timm.list_models(pattern, exclude_filters=EXCLUDED))
    return sorted(names)


def local_prefix(model: torch.nn.Module) -> tuple[int, str]:
    """Largest number of stages whose streamed part traces as local, and why the next one is not."""
    split = split_trunk(model)
    reason = ""
    for stages in range(len(split.stages), -1, -1):
        try:
            StreamingCNN(split.streamed(stages), 1 << 16, stitch="none")
            return stages, reason
        except NonLocalModuleError as exc:
            reason = str(exc)
    return -1, reason


def check(base: str, seed: int = 0, device: str = "cpu") -> dict:
    start = time.perf_counter()
    model = timm.create_model(base).eval()
    family = family_of(model)
    stages, reason = local_prefix(model)
    result = {"family": family, "local_stages": stages, "first_non_local": reason}
    if stages < 1:
        result.update(ok=False, error="no local stage")
        return result
    # Tiles of about 1.5 times the minimum. Each axis is checked on its own image, long along that axis
    # (two or three tiles) and narrow along the other: large receptive fields (res2net, densenet)
    # would otherwise need square float64 images of tens of GB.
    probe = StreamingCNN(split_trunk(model).streamed(stages), 1 << 16)
    minimum = probe.plan((1 << 15, 1 << 15)).pieces[0].min_tile_size
    multiple = probe.geometry.size_multiple  # e.g. DLA only runs on multiples of its stride
    stride = probe.plan((1 << 15, 1 << 15)).pieces[0].stride
    # a few outputs per tile; at least 96 px, or a first piece that is only a stem gets tiny tiles
    tile = (max(minimum[0] * 3 // 2 + stride[0], 96), max(minimum[1] * 3 // 2 + 2 * stride[1], 112))
    streamed = create_stream_model(base, local_stages=stages, tile_size=tile)
    randomize_(streamed, seed)
    streamed.double().to(device)
    model.load_state_dict(streamed.state_dict())
    model.double().to(device).eval()
    worst, base_error, grids, images, worst_param = 0.0, 0.0, [], [], ("", 0.0)
    for axis in range(2):
        narrow = -(-max(128, 6 * probe.geometry.stride[1 - axis]) // multiple[1 - axis]) * multiple[1 - axis]
        long = max(int(tile[axis] * 1.4), narrow)  # the whole network must still fit (tiny first pieces)
        long = -(-long // multiple[axis]) * multiple[axis] + (3 if multiple[axis] == 1 else 0)
        size = (long, narrow) if axis == 0 else (narrow, long)
        x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(seed + axis), dtype=torch.float64)
        x = x.to(device)
        plan = streamed.stream_plan(size)
        streamed.train()
        comparison = compare_streaming(streamed, x, lambda on: setattr(streamed, "streaming", on))
        streamed.eval()
        with torch.no_grad():
            base_error = max(base_error, relative_error(streamed(x), model(x)))
        if comparison.worst >= worst:
            worst, worst_param = comparison.worst, comparison.worst_param()
        grids.append(plan.pieces[0].grid[axis])
        images.append(list(size))
    result.update(
        stream_stages=stages, images=images, tile=list(tile), first_piece_tiles=grids, worst_error=worst,
        worst_param=worst_param[0], vs_base_error=base_error, seconds=round(time.perf_counter() - start, 1),
    )
    result["ok"] = max(worst, base_error) <= TOLERANCE and min(grids) > 1
    return result


def check_safely(base: str, device: str = "cpu") -> dict:
    try:
        return check(base, device=device)
    except Exception as exc:  # a family we cannot split, a model that fails to build...
        if os.environ.get("CHECK_DEBUG"):
            traceback.print_exc()
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def check_isolated(base: str, timeout: float, device: str = "cpu", threads: int = 0) -> dict:
    """One architecture per process: a model too large for memory only fails its own check."""
    try:
        command = [sys.executable, __file__, "--one", base, "--device", device, "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"ok": False, "error": f"check process ended with code {done.returncode} (out of memory?)"}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--discover", action="store_true", help="check every candidate, not just the registered")
    parser.add_argument("--only", help="comma-separated base architectures")
    parser.add_argument("--write", action="store_true", help="rewrite architectures.json from the results")
    parser.add_argument("--report", help="write all results as JSON here (updated after each architecture)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the results already in --report and check only the others")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one architecture, print JSON
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per architecture (default 1800)")
    parser.add_argument("--locality-only", action="store_true",
                        help="only find each candidate's local prefix (fast; no exactness check, no --write)")
    parser.add_argument("--device", default="cpu", help="where the float64 checks run (e.g. cuda)")
    parser.add_argument("--jobs", type=int, default=1, help="architectures checked at the same time")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)  # the cores, shared by the jobs
    torch.set_num_threads(threads)
    registered = architectures()
    if args.only:
        names = args.only.split(",")
    elif args.discover:
        names = candidates()
    else:
        names = sorted(registered)
    if args.locality_only:
        for base in names:
            try:
                stages, reason = local_prefix(timm.create_model(base))
                print(f"{stages} {base} {reason[:160]}", flush=True)
            except Exception as exc:
                print(f"? {base} {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
        return 0
    if args.one:
        print(json.dumps(check_safely(args.one, args.device), default=str))
        return 0
    if args.resume and not args.report:
        parser.error("--resume needs --report")
    previous = json.loads(Path(args.report).read_text()) if args.resume and Path(args.report).exists() else {}
    results = {base: previous[base] for base in names if base in previous}
    todo = [base for base in names if base not in previous]
    with ThreadPoolExecutor(args.jobs) as pool:  # each check runs in its own process
        running = {pool.submit(check_isolated, base, args.timeout, args.device, threads): base for base in todo}
        for future in as_completed(running):
            base = running[future]
            results[base] = result = future.result()
            if args.report:  # a long run that is interrupted keeps what it found (see --resume)
                partial = Path(args.report + ".partial")
                partial.write_text(json.dumps({**previous, **results}, indent=1, default=str))
                partial.replace(args.report)
            skipped = result.get("local_stages", 1) < 1 or "is not a model family" in result.get("error", "")
            status = "ok  " if result["ok"] else "SKIP" if skipped else "FAIL"
            detail = (f"stages={result['stream_stages']} tiles/axis={result['first_piece_tiles']} "
                      f"err={result['worst_error']:.1e} vs-base={result['vs_base_error']:.1e} "
                      f"({result['seconds']}s)") if "stream_stages" in result \
                else result.get("error", "")
            print(f"[{len(results)}/{len(names)}] {status} {base}: {detail}", flush=True)
    failures = [base for base in names if base in registered and not results[base]["ok"]]
    passed = {b: r for b, r in results.items() if r["ok"]}
    print(f"\n{len(passed)} of {len(results)} architectures stream exactly; "
          f"{len(failures)} registered ones failed: {failures}")
    if args.write:
        table = {} if args.discover else json.loads(TABLE.read_text())["architectures"]
        for base in results:
            table.pop(base, None)
        for base, r in passed.items():
            table[base] = {"local_stages": r["local_stages"], "family": r["family"],
                           **({"first_non_local": r["first_non_local"]} if r["first_non_local"] else {})}
        TABLE.write_text(json.dumps({"generated_by": "scripts/check_architectures.py",
                                     "architectures": dict(sorted(table.items()))}, indent=1) + "\n")
        print(f"wrote {len(table)} architectures to {TABLE}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
