"""The one mechanism: an autograd Function that runs a module tile by tile.

``StreamFunction.apply(runner, x, *params)`` returns the stitched output of ``runner.module`` over the
tiles of ``runner.plan``; its backward recomputes each tile with autograd on and pulls that tile's
slice of the output gradient through it.

Invariants (see :mod:`.geometry` for why they make the result exact):

* Forward keeps no activations except, optionally, the graph of the *last* tile, which backward
  consumes first (that tile is then never recomputed). Peak memory is about one tile's activations
  plus the stitched output and its gradient.
* Each tile's graph is freed right after its backward. The gradients of all tiles are summed inside
  backward and returned once: every parameter (and the input) receives exactly one gradient per
  backward, so ``AccumulateGrad`` hooks (DistributedDataParallel, gradient accumulation) fire once.
* Tiles are recomputed under the autocast state that was active in forward, with the same
  parameters; nothing random runs in a streamed module (the tracer refuses it), so the recomputation
  reproduces the forward exactly.
* The input may live on another device and dtype than the module (a uint8 slide in host memory):
  each tile is moved to the module's device and passed through ``preprocess`` there; the input
  gradient is accumulated on the input's device.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .plan import Tile, TilePlan

__all__ = ["TileRunner", "StreamFunction"]


@dataclass(frozen=True)
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype | None
    cache_enabled: bool

    @staticmethod
    def capture(device_type: str) -> "AutocastState":
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if enabled else None
        return AutocastState(device_type, enabled, dtype, torch.is_autocast_cache_enabled())

    def __call__(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)


def _load_malloc_trim() -> Callable[[], None]:
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# glibc keeps freed mid-sized blocks resident, so on the CPU each tile's freed activations would stay
# in the process as if they were live; handing them back between tiles keeps peak memory at one tile.
_release_host_memory = _load_malloc_trim()


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but progress is optional
        return items
    return tqdm(items, desc=desc, leave=False)


class TileRunner:
    """Runs ``module`` on the tiles of ``plan``: the forward stitching and the backward recomputation.

    ``params`` are the trainable parameters the module uses; the Function returns their gradients.
    ``watched``: ``(path, tensor)`` of every parameter and buffer the tiles are recomputed from; the
    Function refuses a backward after any of them was changed in place since forward.
    """

    def __init__(self, module: nn.Module, plan: TilePlan, params: Sequence[Tensor], device: torch.device,
                 preprocess: Callable[[Tensor], Tensor] | None = None, progress: bool = False,
                 keep_last_tile: bool = True, watched: Sequence[tuple[str, Tensor]] = ()):
        self.module = module
        self.plan = plan
        self.tiles = plan.tiles
        self.params = list(params)
        self.device = device
        self.preprocess = preprocess
        self.progress = progress
        self.keep_last_tile = keep_last_tile
        self.watched = list(watched)

    def _load(self, x: Tensor, tile: Tile, requires_grad: bool) -> tuple[Tensor, Tensor]:
        """The tile's raw pixels on the module's device (a leaf if its gradient is wanted) and the
        module's input made from them."""
        rows, cols = tile.input_region
        raw = x[:, :, rows, cols].detach().to(self.device, non_blocking=True)
        if requires_grad:
            raw.requires_grad_(True)
        return raw, (self.preprocess(raw) if self.preprocess is not None else raw)

    def _run(self, x: Tensor, tile: Tile, requires_grad: bool) -> tuple[Tensor, Tensor]:
        if self.device.type == "cpu":
            _release_host_memory()
        raw, inp = self._load(x, tile, requires_grad)
        rows, cols = tile.crop
        out = self.module(inp)[:, :, rows, cols]
        return raw, out

    def forward(self, x: Tensor, keep_last: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Stitched output; with ``keep_last`` (grad mode is then enabled for that tile only) also the
        last tile's (raw input leaf, output) with its graph."""
        out: Tensor | None = None
        kept = None
        last = len(self.tiles) - 1
        for index, tile in enumerate(_progress(self.tiles, self.progress, "streaming forward")):
            keep = keep_last and self.keep_last_tile and index == last
            with torch.enable_grad() if keep else torch.no_grad():
                raw, y = self._run(x, tile, requires_grad=keep and x.requires_grad)
            if out is None:
                n, c = y.shape[:2]
                out = y.new_empty((n, c) + tuple(self.plan.output_size))
            rows, cols = tile.output_region
            out[:, :, rows, cols] = y.detach()
            if keep:
                kept = (raw, y)
        assert out is not None
        return out, kept

    def backward(self, x: Tensor, grad_out: Tensor, kept: tuple[Tensor, Tensor] | None,
                 input_grad: bool, autocast: AutocastState) -> tuple[Tensor | None, list[Tensor | None]]:
        grad_x = torch.zeros_like(x) if input_grad else None
        grads: list[Tensor | None] = [None] * len(self.params)
        order = list(range(len(self.tiles)))[::-1]  # the kept (last) tile first, to free it early
        for index in _progress(order, self.progress, "streaming backward"):
            tile = self.tiles[index]
            if kept is not None and index == order[0]:
                (raw, y), kept = kept, None
            else:
                with torch.enable_grad(), autocast():
                    raw, y = self._run(x, tile, requires_grad=input_grad)
            rows, cols = tile.output_region
            inputs = ([raw] if input_grad else []) + self.params
            tile_grads = torch.autograd.grad(y, inputs, grad_out[:, :, rows, cols], allow_unused=True)
            del y
            if input_grad:
                in_rows, in_cols = tile.input_region
                grad_x[:, :, in_rows, in_cols] += tile_grads[0].to(grad_x.device, grad_x.dtype)
                tile_grads = tile_grads[1:]
            for i, g in enumerate(tile_grads):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
        return grad_x, grads


class StreamFunction(torch.autograd.Function):
    """``apply(runner, x, *params) -> output``; see the module docstring for the invariants."""

    @staticmethod
    def forward(ctx, runner: TileRunner, x: Tensor, *params: Tensor) -> Tensor:
        ctx.runner = runner
        ctx.autocast = AutocastState.capture(runner.device.type)
        out, ctx.kept = runner.forward(x, keep_last=True)
        # Backward recomputes every tile from these tensors: remember their version counters (what
        # autograd does for the tensors it saves) to refuse gradients of a function never evaluated.
        ctx.versions = [(name, t, t._version) for name, t in runner.watched]
        if x.is_inference():
            # An inference tensor (made under torch.inference_mode) cannot be saved for backward, and
            # cannot be changed in place outside inference mode either: keep a plain reference, as
            # un-tiled autograd needs none for an input that is converted before its first operation.
            ctx.inference_input = x
        else:
            ctx.inference_input = None
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(..., create_graph=True)
            raise RuntimeError(
                "double backward (create_graph=True, e.g. a gradient penalty) is not supported through a "
                "streamed module: streaming recomputes each tile in backward and returns the summed tile "
                "gradients as constants, so their own gradient would be wrong. Compute such a loss with "
                "streaming switched off (model.streaming = False, un-tiled) or only on the layers after "
                "the streamed part")
        return StreamFunction._backward(ctx, grad_out)

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_out: Tensor):
        for name, tensor, version in ctx.versions:
            if tensor._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: '{name}' ({tensor.dtype}{list(tensor.shape)}) is at version "
                    f"{tensor._version}; expected version {version} instead. Streaming recomputes tiles in "
                    f"backward from the current parameters and buffers, so changing them between forward "
                    f"and backward (optimizer.step(), in-place updates, loading weights) would give the "
                    f"gradient of a function that was never evaluated: run the forward again after the change")
        (x,) = ctx.saved_tensors if ctx.inference_input is None else (ctx.inference_input,)
        kept, ctx.kept = ctx.kept, None
        grad_x, grads = ctx.runner.backward(x, grad_out, kept, ctx.needs_input_grad[1], ctx.autocast)
        return (None, grad_x, *grads)
