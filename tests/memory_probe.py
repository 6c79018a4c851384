"""Subprocess worker for tests/test_budget.py: one streamed train step, its predicted and measured peak.

    python tests/memory_probe.py '{"arch": "resnet18", "size": 1536, "budget": "600MiB"}'

prints one JSON line: ``predicted`` (plan.peak_memory, bytes), ``measured`` (the rise of the process's
peak resident memory, VmHWM, over its resident memory just before the step, bytes), the plan's tiles and
kept graphs. A warm-up step on the same image runs first, so that one-time allocations of the runtime
(oneDNN kernels, thread pools) are not counted, as the budget's semantics say ("beyond what was
allocated before the call"): the steady state of a training loop, whose first step
also fixes glibc's mmap threshold when it tiles under a budget. The high-water mark is reset through /proc/self/clear_refs (Linux)."""
from __future__ import annotations

import ctypes
import json
import os
import sys
from collections import OrderedDict


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main(spec: dict) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import timm
    import torch
    from torch import nn

    from timm_stream.engine import StreamingCNN
    from timm_stream.testing import randomize_

    torch.set_num_threads(int(spec.get("threads", 2)))
    model = timm.create_model(spec.get("arch", "resnet18"))
    names = spec.get("children") or [n for n, _ in model.named_children()][:-2]
    trunk = randomize_(nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names)), seed=0)
    options = dict(pool=spec.get("pool"))
    if spec.get("budget") is not None:
        options["memory_budget"] = spec["budget"]
    if spec.get("tile") is not None:
        options["tile_size"] = spec["tile"]
    net = StreamingCNN(trunk, preprocess=lambda t: t.float().div(255), **options).train()
    size, batch = int(spec["size"]), int(spec.get("batch", 1))
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    plan = net.plan((size, size), torch.uint8, batch=batch)

    def step(x):
        out = net(x)
        loss = out.float().mean() if out.dim() == 2 else out.float().mean(dim=(2, 3)).sum()
        loss.backward()
        for p in trunk.parameters():
            p.grad = None

    step(image)  # warm-up: the runtime's one-time allocations and the engine's allocator setting come first
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    step(image)
    measured = _status("VmHWM") - base
    return {"predicted": plan.peak_memory, "measured": measured, "tiles": plan.num_tiles,
            "kept": list(plan.kept), "untiled": plan.untiled_memory, "relative_time": plan.relative_time,
            "mmap_threshold": getattr(plan, "mmap_threshold", None),
            "plan": str(plan)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
