"""The one mechanism: an autograd Function that runs a module tile by tile.

``StreamFunction.apply(runner, x, *params)`` returns the stitched output of ``runner.module`` over the
tiles of ``runner.plan``; its backward recomputes each tile with autograd on and pulls that tile's
slice of the output gradient through it.

Invariants (see :mod:`.geometry` for why they make the result exact):

* Forward keeps no activations except the graphs of the last ``keep_tiles`` tiles, which backward
  consumes first, in reverse (those tiles are never recomputed). Peak memory is about one tile's
  activations plus the kept graphs, the stitched output and its gradient (the cost model of
  :mod:`.budget`).
* Each tile's graph is freed right after its backward. The gradients of all tiles are summed inside
  backward and returned once: every parameter (and the input) receives exactly one gradient per
  backward, so ``AccumulateGrad`` hooks (DistributedDataParallel, gradient accumulation) fire once.
* Tiles are recomputed under the autocast state that was active in forward, with the same
  parameters; nothing random runs in a streamed module (the tracer refuses it), so the recomputation
  reproduces the forward exactly.
* The input may live on another device and dtype than the module (a uint8 slide in host memory):
  each tile is moved to the module's device and passed through ``preprocess`` there; the input
  gradient is accumulated on the input's device.
* Where the tiles' outputs go is the runner's *sink*: :class:`StitchSink` (the default) writes each
  tile's owned crop into the stitched output map; :class:`ReduceSink` feeds it to a streamed pooling
  (:mod:`.reducers`), so the Function returns the pooling's statistics ``S`` instead of a map and its
  backward receives ``dL/dS``. Either way a tile's outputs are the positions it *owns* (disjoint over
  tiles) and backward pulls exactly that tile's share of the output gradient through it.
* A sink may skip tiles (a mask that excludes all of a tile's owned outputs): a skipped tile is neither
  read nor computed, in forward or backward.
* The input may be a lazy image (``is_lazy_image``): only tile regions are read (the next one in a
  background thread while the current tile computes), and it gets no gradient.
* On a CUDA module with a host input, the next tile's copy to the device (through pinned memory, on a
  side stream) overlaps the current tile's compute (:mod:`.transfer`); nothing synchronizes per tile.
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

from .lazy import prefetch_regions
from .transfer import TileFeed, staged
from .plan import Tile, TilePlan
from .reducers import Reducer

__all__ = ["TileRunner", "StreamFunction", "StitchSink", "ReduceSink"]


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

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
# glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks from this size on
# are mapped on allocation and unmapped on free; the cost model (memory.host_cost) assumes it on the CPU
HOST_MMAP_THRESHOLD = 32 * 2**20
# the alternative for tight budgets: every activation block mapped and returned on free (no heap fragments)
SMALL_MMAP_THRESHOLD = 256 * 2**10
_mmap_threshold_fixed: int | None = None


def use_fixed_mmap_threshold(threshold: int = HOST_MMAP_THRESHOLD) -> None:
    """Fix glibc's mmap threshold at ``threshold`` bytes for the process (a no-op elsewhere than glibc on
    Linux, and when it is already that).

    glibc starts at 128 KiB and raises the threshold to the size of each mapped block freed, up to 32 MiB,
    so which blocks are mapped (resident only while alive, but zero-filled by page faults on every
    allocation) and which come from the heap (reused, but resident until trimmed, and fragmented) depends
    on the history of the process. Fixed, it is the same from the first step, as the planner's allocator
    model assumes (``memory.host_cost``): ``HOST_MMAP_THRESHOLD`` keeps big tiles' blocks fast,
    ``SMALL_MMAP_THRESHOLD`` keeps resident memory at the live bytes (at 256 KiB a tiled resnet18 step at
    4096² took 1.40x longer, ``scripts/benchmark.py --compare``); the planner picks per plan."""
    global _mmap_threshold_fixed
    threshold = int(threshold)
    if _mmap_threshold_fixed == threshold or not sys.platform.startswith("linux"):
        return
    _mmap_threshold_fixed = threshold
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        # glibc's own rule for the trim threshold (twice the mmap threshold): memory freed at the top of
        # the heap stays for the next tile, malloc_trim(0) before each tile returns the rest
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
    except (OSError, AttributeError, ctypes.ArgumentError):  # not glibc
        pass


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but progress is optional
        return items
    return tqdm(items, desc=desc, leave=False)


class StitchSink:
    """Stitch each tile's owned crop into one output map ``(N, C, *plan.output_size)`` (one output)."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.out: Tensor | None = None

    def wants(self, tile: Tile) -> bool:
        return True

    def add(self, y: Tensor, tile: Tile) -> None:
        if self.out is None:
            n, c = y.shape[:2]
            self.out = y.new_empty((n, c) + tuple(self.plan.output_size))
        rows, cols = tile.output_region
        self.out[:, :, rows, cols] = y

    def outputs(self) -> tuple[Tensor, ...]:
        assert self.out is not None
        # handed over, not kept: the runner lives as long as the autograd graph, and the map must be
        # freed as soon as the next piece's backward no longer needs it
        out, self.out = self.out, None
        return (out,)

    def backward_pair(self, y: Tensor, tile: Tile, grads: Sequence[Tensor]):
        rows, cols = tile.output_region
        return (y,), (grads[0][:, :, rows, cols],)


class ReduceSink:
    """Feed each tile's owned crop to ``reducer``; the outputs are its statistics ``S``.

    ``mask``: bool ``(N, 1, *plan.output_size)`` or None; tiles whose owned outputs are all masked out
    are skipped. ``state`` holds the non-differentiable rest (counts, the softmax shift, argmax
    positions) for ``reducer.finalize``."""

    def __init__(self, plan: TilePlan, reducer: Reducer, mask: Tensor | None):
        self.plan, self.reducer, self.mask = plan, reducer, mask
        # which tiles to run is decided on the host: one device-to-host copy, not one sync per tile
        self._host_mask = mask.cpu() if mask is not None else None
        self.state: dict | None = None
        self.dtype: torch.dtype | None = None

    def _mask(self, tile: Tile, device: torch.device) -> Tensor | None:
        if self.mask is None:
            return None
        rows, cols = tile.output_region
        return self.mask[:, :, rows, cols].to(device)

    def wants(self, tile: Tile) -> bool:
        if self._host_mask is None:
            return True
        rows, cols = tile.output_region
        return bool(self._host_mask[:, :, rows, cols].any())

    def _where(self, tile: Tile) -> tuple[tuple[int, int], tuple[int, int]]:
        rows, cols = tile.output_region
        return (rows.start, cols.start), tuple(self.plan.output_size)

    def add(self, y: Tensor, tile: Tile) -> None:
        if self.state is None:
            self.state = self.reducer.start(y)
            self.dtype = y.dtype  # of the final map: the pooled features are returned in it
        self.reducer.accumulate(self.state, y, self._mask(tile, y.device), *self._where(tile))

    def outputs(self) -> tuple[Tensor, ...]:
        if self.state is None:
            raise ValueError("the mask excludes every tile of the image: nothing to pool; pass a mask with "
                             "at least one True position (or mask=None)")
        return tuple(self.reducer.statistics(self.state))

    def backward_pair(self, y: Tensor, tile: Tile, grads: Sequence[Tensor]):
        stats = self.reducer.tile_statistics(y, self._mask(tile, y.device), *self._where(tile), self.state)
        return tuple(stats), tuple(g.to(s.device, s.dtype) for g, s in zip(grads, stats))


class TileRunner:
    """Runs ``module`` on the tiles of ``plan``: the forward pass into ``sink`` (default: stitching)
    and the backward recomputation.

    ``params`` are the trainable parameters the module (and the sink's reducer) use; the Function
    returns their gradients. ``keep_tiles``: how many tiles (the last ones) keep their graphs from
    forward to backward instead of being recomputed. ``watched``: ``(path, tensor)`` of every parameter and buffer the tiles are
    recomputed from; the Function refuses a backward after any of them was changed in place since forward.
    """

    def __init__(self, module: nn.Module, plan: TilePlan, params: Sequence[Tensor], device: torch.device,
                 preprocess: Callable[[Tensor], Tensor] | None = None, progress: bool = False,
                 keep_tiles: int = 1, sink: StitchSink | ReduceSink | None = None,
                 watched: Sequence[tuple[str, Tensor]] = ()):
        self.module = module
        self.plan = plan
        self.sink = sink if sink is not None else StitchSink(plan)
        self.tiles = [tile for tile in plan.tiles if self.sink.wants(tile)]
        self.params = list(params)
        self.device = device
        self.preprocess = preprocess
        self.progress = progress
        self.keep_tiles = int(keep_tiles)
        self.watched = list(watched)

    def _load(self, region: Tensor, requires_grad: bool) -> tuple[Tensor, Tensor]:
        """The tile's raw pixels on the module's device (a leaf if its gradient is wanted) and the
        module's input made from them."""
        raw = region.detach().to(self.device, non_blocking=True)
        if requires_grad:
            raw.requires_grad_(True)
        return raw, (self.preprocess(raw) if self.preprocess is not None else raw)

    def _run(self, region: Tensor, tile: Tile, requires_grad: bool) -> tuple[Tensor, Tensor]:
        if self.device.type == "cpu":
            _release_host_memory()
        raw, inp = self._load(region, requires_grad)
        rows, cols = tile.crop
        out = self.module(inp)[:, :, rows, cols]
        return raw, out

    def _regions(self, x, indices: Sequence[int]):
        regions = prefetch_regions(x, [self.tiles[i].input_region for i in indices])
        if self.device.type == "cuda" and getattr(x, "device", torch.device("cpu")).type == "cpu":
            return staged(regions, TileFeed(self.device))
        return regions

    def forward(self, x, keep: bool) -> tuple[tuple[Tensor, ...], dict[int, tuple[Tensor, Tensor]]]:
        """The sink's outputs; with ``keep`` (grad mode is then enabled for those tiles only) also the
        (raw input leaf, output) with its graph of each of the last ``keep_tiles`` tiles, by index."""
        kept: dict[int, tuple[Tensor, Tensor]] = {}
        first_kept = len(self.tiles) - (self.keep_tiles if keep else 0)
        indices = list(range(len(self.tiles)))
        regions = self._regions(x, indices)
        for index in _progress(indices, self.progress, "streaming forward"):
            tile = self.tiles[index]
            keep_this = index >= first_kept
            region = next(regions)
            with torch.enable_grad() if keep_this else torch.no_grad():
                raw, y = self._run(region, tile, requires_grad=keep_this and _requires_grad(x))
            del region
            with torch.no_grad():
                self.sink.add(y.detach(), tile)
            if keep_this:
                kept[index] = (raw, y)
            del raw, y
        return self.sink.outputs(), kept

    def backward(self, x, grad_outputs: Sequence[Tensor], kept: dict[int, tuple[Tensor, Tensor]],
                 input_grad: bool, autocast: AutocastState) -> tuple[Tensor | None, list[Tensor | None]]:
        grad_x = torch.zeros_like(x) if input_grad else None
        grads: list[Tensor | None] = [None] * len(self.params)
        order = list(range(len(self.tiles)))[::-1]  # the kept (last) tiles first, to free them early
        regions = self._regions(x, [i for i in order if i not in kept])
        for index in _progress(order, self.progress, "streaming backward"):
            tile = self.tiles[index]
            if index in kept:
                raw, y = kept.pop(index)
                with torch.enable_grad(), autocast():
                    outputs, out_grads = self.sink.backward_pair(y, tile, grad_outputs)
            else:
                region = next(regions)
                with torch.enable_grad(), autocast():
                    raw, y = self._run(region, tile, requires_grad=input_grad)
                    outputs, out_grads = self.sink.backward_pair(y, tile, grad_outputs)
                del region
            inputs = ([raw] if input_grad else []) + self.params
            tile_grads = torch.autograd.grad(outputs, inputs, out_grads, allow_unused=True)
            del y, outputs
            if input_grad:
                in_rows, in_cols = tile.input_region
                grad_x[:, :, in_rows, in_cols] += tile_grads[0].to(grad_x.device, grad_x.dtype)
                tile_grads = tile_grads[1:]
            for i, g in enumerate(tile_grads):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
        return grad_x, grads


def _requires_grad(x) -> bool:
    return isinstance(x, Tensor) and x.requires_grad


class StreamFunction(torch.autograd.Function):
    """``apply(runner, x, *params) -> outputs of runner.sink`` (one tensor for the stitching sink, the
    statistics tuple for a reducing sink); ``x`` may be a tensor or a lazy image. See the module
    docstring for the invariants."""

    @staticmethod
    def forward(ctx, runner: TileRunner, x, *params: Tensor):
        ctx.runner = runner
        ctx.autocast = AutocastState.capture(runner.device.type)
        outputs, ctx.kept = runner.forward(x, keep=True)
        # Backward recomputes every tile from these tensors: remember their version counters (what
        # autograd does for the tensors it saves) to refuse gradients of a function never evaluated.
        ctx.versions = [(name, t, t._version) for name, t in runner.watched]
        ctx.plain_input = None
        if not isinstance(x, Tensor):  # a lazy image: read again by region in backward, never differentiated
            ctx.plain_input = x
        elif x.is_inference():
            # An inference tensor (made under torch.inference_mode) cannot be saved for backward, and
            # cannot be changed in place outside inference mode either: keep a plain reference, as
            # un-tiled autograd needs none for an input that is converted before its first operation.
            ctx.plain_input = x
        else:
            ctx.save_for_backward(x)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(..., create_graph=True)
            raise RuntimeError(
                "double backward (create_graph=True, e.g. a gradient penalty) is not supported through a "
                "streamed module: streaming recomputes each tile in backward and returns the summed tile "
                "gradients as constants, so their own gradient would be wrong. Compute such a loss with "
                "streaming switched off (model.streaming = False, un-tiled) or only on the layers after "
                "the streamed part")
        return StreamFunction._backward(ctx, *grad_outputs)

    @staticmethod
    @once_differentiable
    def _backward(ctx, *grad_outputs: Tensor):
        for name, tensor, version in ctx.versions:
            if tensor._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: '{name}' ({tensor.dtype}{list(tensor.shape)}) is at version "
                    f"{tensor._version}; expected version {version} instead. Streaming recomputes tiles in "
                    f"backward from the current parameters and buffers, so changing them between forward "
                    f"and backward (optimizer.step(), in-place updates, loading weights) would give the "
                    f"gradient of a function that was never evaluated: run the forward again after the change")
        x = ctx.saved_tensors[0] if ctx.plain_input is None else ctx.plain_input
        kept, ctx.kept = ctx.kept, {}
        input_grad = ctx.needs_input_grad[1] and isinstance(x, Tensor)
        grad_x, grads = ctx.runner.backward(x, grad_outputs, kept, input_grad, ctx.autocast)
        return (None, grad_x, *grads)
