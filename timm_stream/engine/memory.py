"""What a module allocates and computes on one input size, from shapes alone (nothing is allocated).

Method: the module runs once, forward and backward, on torch's shape-only ``meta`` device through
``torch.func.functional_call`` (its parameters and buffers replaced by meta stand-ins, so the module's own
tensors are untouched) under two dispatch modes:

* :class:`LiveBytes` follows every storage an operation creates until the last tensor using it is freed
  (weak references to the storages, the method of ``torch.distributed._tools.mem_tracker``), so its
  ``peak`` is the most bytes alive at once: what a caching or plain allocator must hold;
* ``torch.utils.flop_counter.FlopCounterMode`` counts the forward FLOPs (convolutions and matmuls).

:class:`LiveBytes` also records the allocation trace (every block's size, in order of allocation and
free). :func:`host_cost` replays a trace through a model of the allocator: a caching allocator on CUDA
(live bytes), glibc's malloc on the CPU (mapped blocks and a heap, resident bytes and fresh pages whose
page faults cost time). :class:`TraceCost` interpolates traces between two tile sizes, block by block.

The simulation does not see the allocator's own overhead beyond that model: cuDNN workspaces on CUDA, and
on the CPU the heap's fragments (the engine keeps them small under a budget through the mmap threshold,
see ``function.use_fixed_mmap_threshold``). Measured against RSS on the CPU it agrees within 20%
(``tests/test_budget.py``).
"""
from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["parse_memory", "format_bytes", "LiveBytes", "StepCost", "StepTrace", "HEAP_FRAGMENTS", "host_cost",
           "simulate_step", "simulate_trace", "TraceCost", "LinearCost"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: Any) -> int:
    """Bytes from ``value``: an int or float number of bytes, or a string ``"<number> <unit>"`` with a
    decimal (kB, MB, GB, TB: powers of 1000) or binary (KiB, MiB, GiB, TiB: powers of 1024) unit, case
    and spaces ignored: ``"6GiB"``, ``"512 MiB"``, ``"20GB"``, ``"1.5e9"``. Raises ``ValueError`` for
    anything else, or for a value that is not positive."""
    number = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes or a string such as '6GiB', "
                         f"'512 MiB' or '20GB', got {value!r}")
    return int(number)


def format_bytes(n: int | float) -> str:
    """``n`` bytes in binary units, e.g. ``'1.50 GiB'``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


class LiveBytes(TorchDispatchMode):
    """Dispatch mode that counts the bytes of the storages created by operations run under it while they
    are alive (``live``) and their maximum (``peak``), and records the allocation trace: block ``k``'s
    bytes in ``sizes[k]``, ``events`` holding ``k`` at its allocation and ``~k`` at its free (what
    :func:`host_cost` replays). Tensors created before the mode (parameters, the caller's inputs) are
    not counted; views share their storage's count."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, weakref.ref] = {}
        self.paused = False  # while True, new storages are not counted
        self.sizes: list[int] = []
        self.events: list[int] = []

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        block = len(self.sizes)
        self.sizes.append(nbytes)
        self.events.append(block)

        def freed(_ref, key=key, nbytes=nbytes, block=block) -> None:
            self.live -= nbytes
            self.events.append(~block)
            self._storages.pop(key, None)

        self._storages[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for index, result in enumerate(outputs):
            # an output that aliases an input (a view, an in-place or out= result) allocates nothing
            if index < len(returns) and returns[index].alias_info is not None:
                continue
            for t in tree_flatten(result)[0]:
                if isinstance(t, Tensor) and t.layout == torch.strided:
                    self._track(t)
        return out


@dataclass(frozen=True)
class StepCost:
    """Cost of one forward + backward of a module on one input, in bytes and FLOPs.

    ``graph``: bytes alive after a forward with autograd on (its saved tensors and output: what keeping
    the graph from forward to backward costs); ``peak``: most bytes alive during that forward and the
    backward that follows (parameter and input gradients included); ``forward_peak``: most bytes alive
    during a forward without autograd; ``flops``: FLOPs of the forward (backward is counted as 2x);
    ``fresh``, ``forward_fresh``: bytes of fresh host pages that the forward + backward, and the forward
    without autograd, fault in (see :func:`host_cost`: 0 for a caching allocator, whose two peaks are
    live bytes; resident bytes for a host allocator).
    """

    graph: int
    peak: int
    forward_peak: int
    flops: int
    fresh: int = 0
    forward_fresh: int = 0


def _meta_state(module: nn.Module) -> tuple[dict[str, Tensor], list[Tensor]]:
    state, params = {}, []
    for name, p in module.named_parameters():
        state[name] = torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
        if p.requires_grad:
            params.append(state[name])
    for name, b in module.named_buffers():
        state[name] = torch.empty_like(b, device="meta")
    return state, params


def simulate_step(module: nn.Module, input_shape: Sequence[int], input_dtype: torch.dtype, *,
                  preprocess: Callable[[Tensor], Tensor] | None = None, input_grad: bool = False,
                  count_input: bool = False, mmap_threshold: int | None = None) -> StepCost:
    """Simulate ``module(preprocess(x))`` and its backward (see :func:`simulate_trace`), costed for a host
    allocator with ``mmap_threshold`` (``None``: a caching allocator such as CUDA's)."""
    return simulate_trace(module, input_shape, input_dtype, preprocess=preprocess, input_grad=input_grad,
                          count_input=count_input).cost(mmap_threshold)


def simulate_trace(module: nn.Module, input_shape: Sequence[int], input_dtype: torch.dtype, *,
                   preprocess: Callable[[Tensor], Tensor] | None = None, input_grad: bool = False,
                   count_input: bool = False) -> "StepTrace":
    """Simulate ``module(preprocess(x))`` and its backward for ``x`` of ``input_shape`` (N, C, H, W) and
    ``input_dtype`` on the meta device (see the module docstring). ``count_input``: the input is a new
    tensor (a tile read from a lazy image, or copied to another device) rather than a view of memory
    that exists anyway. Raises what the module raises on meta tensors (the caller decides then)."""
    state, params = _meta_state(module)
    shape = tuple(int(v) for v in input_shape)

    def make_input() -> Tensor:
        return torch.empty(shape, dtype=input_dtype, device="meta")

    def run(x: Tensor) -> Tensor:
        return functional_call(module, state, (preprocess(x) if preprocess is not None else x,))

    x = None if count_input else make_input()  # made outside the counter: not counted
    with torch.no_grad(), LiveBytes() as counter:
        y = run(make_input() if count_input else x)
        del y
    forward = (tuple(counter.sizes), tuple(counter.events))
    x = None if count_input else make_input()
    with torch.enable_grad(), LiveBytes() as counter:
        if x is None:
            x = make_input()
        inputs = list(params)
        if input_grad and x.is_floating_point():
            x.requires_grad_(True)
            inputs = [x] + inputs
        with FlopCounterMode(display=False) as flop_counter:
            y = run(x)
        mark = len(counter.events)  # the end of the forward: what is alive then is the graph
        if y.requires_grad and inputs:
            # the output's gradient is the caller's (the model of the whole step counts it once)
            counter.paused = True
            grad_y = torch.ones_like(y)
            counter.paused = False
            torch.autograd.grad(y, inputs, grad_y, allow_unused=True)  # freed at once: the peak is what counts
            del grad_y
        del y, x
    return StepTrace(forward, (tuple(counter.sizes), tuple(counter.events)), mark,
                     int(flop_counter.get_total_flops()))


# Fragments of glibc's heap beyond its high-water mark of live blocks, as a fraction of it: the trace
# model reuses freed heap memory perfectly, glibc does not. Measured with the engine's threshold at 32 MiB
# (scripts/benchmark.py --compare, resnet18 at 4096², a 2.8 GiB budget): 2% over the model in all. Small
# plans see tens of MiB of fragments (+40% at 130 MiB), which is why the planner runs those with every
# block mapped (streaming.HEAP_PLAN_MIN_BYTES).
HEAP_FRAGMENTS = 0.1


def host_cost(sizes: Sequence[int], events: Sequence[int], mmap_threshold: int | None,
              mark: int = -1) -> tuple[int, int, int]:
    """Replay an allocation trace (:class:`LiveBytes`) through a model of the allocator: returns (bytes
    alive at event ``mark``, peak bytes, fresh bytes).

    ``mmap_threshold=None``: a caching allocator (CUDA's): the peak is the live bytes' peak and nothing
    is fresh. With a threshold (bytes), glibc's malloc on the CPU (``mallopt(3)``): a block of at least
    the threshold is mapped on allocation and unmapped on free, resident while alive and every byte a
    fresh page; smaller blocks come from the heap, which reuses freed memory and keeps it resident
    (the engine returns it with ``malloc_trim`` before each tile: the trace starts empty), so its
    resident size is its high-water mark, plus ``HEAP_FRAGMENTS`` of it, and each byte of growth is a
    fresh page. The peak is then the most of mapped-live + heap resident at once. Fresh pages are zero-filled by page faults: the
    time they cost is counted by the planner (measured ~30% of an un-tiled resnet18 step at 4096² on
    2 CPU cores: 36.1 s with glibc's defaults, 25.5 s with every block from the heap)."""
    live = peak = fresh = mapped = heap = high = resident = at_mark = 0
    for i, e in enumerate(events):
        if i == mark:
            at_mark = live
        n = sizes[e if e >= 0 else ~e]
        big = mmap_threshold is not None and n >= mmap_threshold
        if e < 0:
            live -= n
            if big:
                mapped -= n
            else:
                heap -= n
            continue
        live += n
        peak = max(peak, live)
        if mmap_threshold is None:
            continue
        if big:
            mapped += n
            fresh += n
        else:
            heap += n
            if heap > high:
                fresh += heap - high
                high = heap
        resident = max(resident, mapped + int(high * (1 + HEAP_FRAGMENTS)))
    if mark >= len(events):
        at_mark = live
    return at_mark, peak if mmap_threshold is None else resident, fresh


@dataclass(frozen=True)
class StepTrace:
    """The allocation traces (``(sizes, events)``, see :class:`LiveBytes`) of one simulated forward
    without autograd and one forward + backward (its forward ends at event ``mark``), and the forward's
    FLOPs: enough to cost the step for any host allocator (:meth:`cost`)."""

    forward: tuple[tuple[int, ...], tuple[int, ...]]
    step: tuple[tuple[int, ...], tuple[int, ...]]
    mark: int
    flops: int

    def cost(self, mmap_threshold: int | None = None) -> StepCost:
        _, forward_peak, forward_fresh = host_cost(*self.forward, mmap_threshold)
        graph, peak, fresh = host_cost(*self.step, mmap_threshold, self.mark)
        return StepCost(graph=graph, peak=peak, forward_peak=forward_peak, flops=self.flops, fresh=fresh,
                        forward_fresh=forward_fresh)

    def same_ops(self, other: "StepTrace") -> bool:
        """Whether ``other`` allocates and frees its blocks in the same order (only sizes differ)."""
        return (self.forward[1] == other.forward[1] and self.step[1] == other.step[1]
                and self.mark == other.mark)


class TraceCost:
    """A module's :class:`StepCost` for any input tile ``(h, w)``, from the traces of two simulated tiles
    whose operations allocate and free the same blocks in the same order: each block's bytes are
    linear in the tile's area (every activation of a convolutional network is, up to rounding at its
    borders; parameter gradients are constant), so the trace of any tile is interpolated block by block
    and replayed through the allocator model (:func:`host_cost`). Exact at the two samples; costs per
    size are cached."""

    def __init__(self, small: tuple[tuple[int, int], StepTrace], large: tuple[tuple[int, int], StepTrace],
                 mmap_threshold: int | None) -> None:
        (s_size, s), (l_size, l) = small, large
        if not s.same_ops(l):
            raise ValueError("the two traces do not run the same operations")
        self.mmap_threshold = mmap_threshold
        self._areas = (s_size[0] * s_size[1], l_size[0] * l_size[1])
        self._samples = (s, l)
        self._cache: dict[int, StepCost] = {}

    def _sizes(self, a: Sequence[int], b: Sequence[int], area: int) -> list[int]:
        a0, a1 = self._areas
        t = (area - a0) / (a1 - a0)
        return [max(int(round(x + (y - x) * t)), 0) for x, y in zip(a, b)]

    def __call__(self, size: Sequence[int]) -> StepCost:
        area = int(size[0]) * int(size[1])
        cost = self._cache.get(area)
        if cost is None:
            s, l = self._samples
            forward = (self._sizes(s.forward[0], l.forward[0], area), s.forward[1])
            step = (self._sizes(s.step[0], l.step[0], area), s.step[1])
            flops = self._sizes((s.flops,), (l.flops,), area)[0]
            cost = StepTrace(forward, step, s.mark, flops).cost(self.mmap_threshold)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[area] = cost
        return cost

    def flops(self, tiles: int, area: float) -> float:
        """Forward FLOPs of ``tiles`` tiles of ``area`` input pixels in all (linear in the area)."""
        (a0, a1), (s, l) = self._areas, self._samples
        slope = (l.flops - s.flops) / (a1 - a0)
        return tiles * max(s.flops - slope * a0, 0.0) + slope * area


_FIELDS = ("graph", "peak", "forward_peak", "flops", "fresh", "forward_fresh")


@dataclass(frozen=True)
class LinearCost:
    """A module's :class:`StepCost` for an input tile ``(h, w)`` as the largest of a few lines
    ``fixed + per_pixel * h * w``, each fitted through two simulations. Every activation of a
    convolutional network is proportional to the tile's area (up to rounding at its borders); the peak
    is the largest of such sums taken at different moments (parameter gradients dominate tiny tiles,
    activations large ones), so one line per regime, and their maximum, follows it."""

    lines: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]  # (fixed, per_pixel) per field of _FIELDS

    @staticmethod
    def fit(*pairs: tuple[tuple[tuple[int, int], StepCost], tuple[tuple[int, int], StepCost]]) -> "LinearCost":
        """One line through each pair of ``(tile size, simulated cost)`` samples."""
        lines = []
        for (s_size, s), (l_size, l) in pairs:
            a_s, a_l = s_size[0] * s_size[1], l_size[0] * l_size[1]
            vs = [getattr(s, f) for f in _FIELDS]
            vl = [getattr(l, f) for f in _FIELDS]
            slopes = tuple(max((b - a) / (a_l - a_s), 0.0) for a, b in zip(vs, vl))
            fixed = tuple(max(b - k * a_l, 0.0) for b, k in zip(vl, slopes))
            lines.append((fixed, slopes))
        return LinearCost(tuple(lines))

    def __call__(self, size: Sequence[int]) -> StepCost:
        area = size[0] * size[1]
        values = [max(fixed[i] + slopes[i] * area for fixed, slopes in self.lines) for i in range(len(_FIELDS))]
        return StepCost(*(int(math.ceil(v)) for v in values))

    def flops(self, tiles: int, area: float) -> float:
        """Forward FLOPs of ``tiles`` tiles of ``area`` input pixels in all (FLOPs are linear in the area:
        the first line's)."""
        fixed, slopes = self.lines[0]
        i = _FIELDS.index("flops")
        return tiles * fixed[i] + slopes[i] * area
