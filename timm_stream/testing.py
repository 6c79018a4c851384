"""Utilities to check streamed modules against un-tiled ones (used by the tests and scripts).

Exactness checks must randomize *every* parameter and normalization statistic: timm ResNets
zero-initialize the last BN gamma of each block, so residual branches vanish and a too-small halo
looks exact with default initialization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["randomize_", "relative_error", "StreamComparison", "compare_streaming", "assert_several_tiles"]


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and buffer of ``module`` random values that keep activations in range:
    weights ~ N(0, 1/fan_in), per-channel scales (norm weights, layer scale) ~ U(0.5, 1.5), biases and
    running means ~ N(0, 0.2), running variances ~ U(0.5, 2)."""
    generator = torch.Generator().manual_seed(seed)

    def fill(t: Tensor, values: Tensor) -> None:
        t.copy_(values.to(t.dtype))

    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2:
            fan_in = math.prod(p.shape[1:])
            fill(p, torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        elif leaf in ("weight", "gamma", "scale") or "gamma" in leaf:
            fill(p, torch.rand(p.shape, generator=generator) + 0.5)
        else:
            fill(p, torch.randn(p.shape, generator=generator) * 0.2)
    for name, b in module.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_mean":
            fill(b, torch.randn(b.shape, generator=generator) * 0.2)
        elif leaf == "running_var":
            fill(b, torch.rand(b.shape, generator=generator) * 1.5 + 0.5)
    return module


def assert_several_tiles(model: nn.Module, input_size, min_tiles: int = 2):
    """Fail unless streaming ``model`` (a stream model or a ``StreamingCNN``) on an input of
    ``input_size`` (H, W) cuts its first piece into at least ``min_tiles`` tiles: at one tile a piece
    runs plainly, and a test of it would prove nothing about tiling. Returns the plan."""
    plan = model.stream_plan(input_size) if hasattr(model, "stream_plan") else model.plan(input_size)
    tiles = plan.pieces[0].num_tiles
    assert tiles >= min_tiles, (f"an input of {tuple(input_size)} is {tiles} tile(s) at tile_size "
                                f"{plan.pieces[0].tile_size}: use a smaller tile_size or a larger input")
    return plan


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``|actual - expected| / |expected|`` in the 2-norm (0 when both are zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


@dataclass
class StreamComparison:
    output: float
    input_grad: float | None
    param_grads: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        values = [self.output] + list(self.param_grads.values())
        if self.input_grad is not None:
            values.append(self.input_grad)
        return max(values)

    def worst_param(self) -> tuple[str, float]:
        return max(self.param_grads.items(), key=lambda kv: kv[1]) if self.param_grads else ("", 0.0)


def compare_streaming(model: nn.Module, x: Tensor, set_streaming: Callable[[bool], None], *,
                      input_grad: bool = True, seed: int = 0, **forward_kwargs) -> StreamComparison:
    """Run ``model`` streamed and un-tiled on ``x`` (``model(x, **forward_kwargs)``, e.g. ``mask=``)
    with the same random output gradient; return the relative errors of the output, the input
    gradient and every trainable parameter's gradient."""
    results = {}
    for streaming in (False, True):
        set_streaming(streaming)
        model.zero_grad(set_to_none=True)
        inp = x.detach().clone().requires_grad_(input_grad and x.is_floating_point())
        out = model(inp, **forward_kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out.backward(grad.to(out.device, out.dtype))
        results[streaming] = (
            out.detach().clone(),
            inp.grad.clone() if inp.grad is not None else None,
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    (out0, gx0, gp0), (out1, gx1, gp1) = results[False], results[True]
    missing = set(gp0) ^ set(gp1)
    if missing:
        raise AssertionError(f"parameters with a gradient in only one of the runs: {sorted(missing)}")
    return StreamComparison(
        output=relative_error(out1, out0),
        input_grad=relative_error(gx1, gx0) if gx0 is not None else None,
        param_grads={n: relative_error(gp1[n], gp0[n]) for n in gp0},
    )


class RecordingLazyImage:
    """A lazy image (the engine's lazy image protocol) over an in-memory tensor that records every
    region read: ``reads`` lists ``(rows, cols)`` slices, ``threads`` the reading threads' names.
    For tests: whether masked-out regions are read, whether reads are prefetched in the background."""

    def __init__(self, data: Tensor):
        import threading

        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = 4
        self.device = torch.device("cpu")
        self.reads: list[tuple[slice, slice]] = []
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def __getitem__(self, index) -> Tensor:
        import threading

        _, _, rows, cols = index
        with self._lock:
            self.reads.append((rows, cols))
            self.threads.append(threading.current_thread().name)
        return self._data[index].clone(memory_format=torch.contiguous_format)
