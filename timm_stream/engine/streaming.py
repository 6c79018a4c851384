"""``StreamingCNN``: an ``nn.Module`` that runs a local CNN trunk tile by tile, exactly.

A trunk given as an ``nn.Sequential`` may be streamed in several *pieces*: the stitched output of one
piece is the input of the next, and each piece is tiled with only its own receptive-field halo. Deep
stages have large halos but small feature maps, so stitching after them removes most recomputation
(the stitched maps are kept, which is why ``stitch="auto"`` keeps them at most twice the input's size).
Pieces compose exactly because each is exact; autograd chains them.

With streamed pooling (``pool=``, a :class:`~.reducers.Reducer`) the last piece feeds a reducer
instead of stitching: the final map never exists, and ``mask=`` excludes final-map positions (tiles
whose outputs are all excluded are neither read nor computed). A lazy image input is streamed as one
piece when the tile allows it, so that no stitched intermediate map grows with the image.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .budget import PieceCost, allocate_kept, peak_memory, step_time
from .errors import MemoryBudgetError, StreamingError, TileTooSmallError, TraceError
from .function import (HOST_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD, ReduceSink, StreamFunction, TileRunner,
                       use_fixed_mmap_threshold)
from .memory import LinearCost, StepCost, TraceCost, format_bytes, parse_memory, simulate_trace
from .geometry import AxisGeometry, PerAxisGeometry, lcm
from .lazy import is_lazy_image, read_whole
from .plan import TilePlan, make_plan, normalize_tile_size
from .reducers import Reducer, make_reducer
from .trace import Trace, check_size_independent, trace

__all__ = ["StreamingCNN", "StreamGeometry", "StreamPlan", "is_norm_layer", "freeze_norm_layers", "final_mask"]


# FLOPs that one byte of fresh host pages costs in time on the CPU (the page faults that zero-fill it, see
# memory.host_cost). Calibrated on 2 CPU cores with an un-tiled resnet18 step at 4096² (the benchmark's
# setup): 25.5 s with every block reused from glibc's heap (mallopt M_MMAP_MAX=0), 36.1 s with glibc's
# defaults; the simulation counts 3.64e12 FLOPs (forward x 3) and 19.3e9 fresh bytes, so 10.6 s of page
# faults is 78.5 FLOPs a byte. It checks against the tiled plans measured the same day: 3x3 tiles
# recomputing every one 37.7 s (predicted 1.16x the un-tiled), 2x2 keeping one 42.5 s (1.21x).
CPU_FRESH_FLOPS = 78.5

# The smallest plan that may run with glibc's heap (mmap threshold HOST_MMAP_THRESHOLD) under a budget:
# the heap's fragments are tens of MiB whatever the plan (measured +40% over the model at 130 MiB, +2% at
# 2.6 GiB), so smaller plans map every block (SMALL_MMAP_THRESHOLD) and stay at their live bytes.
HEAP_PLAN_MIN_BYTES = 2**30

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is itself a normalization layer: torch's norms (BatchNorm, InstanceNorm and
    SyncBatchNorm via ``_NormBase``, GroupNorm, LayerNorm, LocalResponseNorm, and their subclasses
    such as timm's norm-act layers), or any module that is a norm by structure: it owns both
    ``running_mean`` and ``running_var`` buffers (e.g. a frozen BatchNorm). Decided by type and
    buffers, never by class name, so a container whose name contains "Norm" (a classifier head
    holding a norm and a dropout) is not one."""
    if isinstance(module, _NORM_TYPES):
        return True
    own = module._buffers  # its own buffers, not those of its children
    return "running_mean" in own and "running_var" in own


def freeze_norm_layers(module: nn.Module) -> None:
    """Put every normalization layer under ``module`` in eval mode (running statistics stop changing).

    Only the norm layers themselves: their children (a norm-act layer's activation or dropout) and
    their containers keep the mode ``train()`` gave them.
    """
    for m in module.modules():
        if m.training and is_norm_layer(m):
            m.training = False  # not .train(False): that would recurse into the layer's children


def _infer_in_channels(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _module_dtype(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _compose(outer: AxisGeometry, inner: AxisGeometry) -> AxisGeometry:
    """Geometry of ``inner`` applied to the output of ``outer`` (a chain, so exact)."""
    return AxisGeometry(outer.stride * inner.stride, outer.lo + inner.lo * outer.stride,
                        outer.hi + inner.hi * outer.stride)


@dataclass(frozen=True)
class StreamGeometry(PerAxisGeometry):
    """Size-independent geometry of a streamed module (or of one piece of it).

    ``axes``: receptive field of the output per axis (output ``j`` reads input pixels
    ``[j*stride + lo, j*stride + hi]``); ``align``: tile origins are multiples of it; ``size_multiple``:
    input sizes the module accepts are multiples of it (1 for most networks).
    """

    axes: tuple[AxisGeometry, AxisGeometry]
    align: tuple[int, int]
    size_multiple: tuple[int, int]

    @staticmethod
    def of_chain(traces: Sequence[Trace], size_multiple: bool) -> "StreamGeometry":
        axes = [AxisGeometry(), AxisGeometry()]
        aligns = [[], []]
        for t in traces:
            for i in range(2):
                aligns[i].append(t.align[i] * axes[i].stride)  # the child's grid, in input pixels
                axes[i] = _compose(axes[i], t.axes[i])
        align = (lcm(aligns[0]), lcm(aligns[1]))
        return StreamGeometry((axes[0], axes[1]), align, align if size_multiple else (1, 1))


@dataclass(frozen=True)
class StreamPlan(PerAxisGeometry):
    """What streaming an input of ``input_size`` will do: one :class:`TilePlan` per piece.

    ``overlap``: activations computed over those of an un-tiled run (1.0: nothing recomputed twice,
    backward recomputation not counted); ``num_tiles``: tiles of all pieces together.
    """

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    geometry: StreamGeometry
    pieces: tuple[TilePlan, ...]
    piece_names: tuple[str, ...]
    work: tuple[float, ...]  # activation elements of each piece for this input (un-tiled)
    # (C, H, W) and bytes per image of each piece's stitched output map: kept from forward to backward
    # (the final one is the output itself), and backward holds a gradient of the same size for each.
    maps: tuple[tuple[int, ...], ...] = ()
    map_bytes: tuple[int, ...] = ()
    note: str = ""  # why these pieces (streamed pooling / lazy input), shown by str()
    # which children each piece runs ([start, stop) indices), and tile graphs kept from forward to
    # backward per piece (the last ones in forward order; a single-tile piece runs plainly and keeps its one)
    bounds: tuple[tuple[int, int], ...] = ()
    kept: tuple[int, ...] = ()
    # The cost model's predictions (None when not estimated), see timm_stream.engine.budget. peak_memory:
    # bytes one forward + backward of the streamed part allocates beyond what was allocated before (the
    # weights and the input not counted); relative_time: its time over the un-tiled run's (FLOPs, and on
    # the CPU fresh pages: budget.py); untiled_memory: the same peak for the un-tiled run; memory_budget:
    # the budget planned for (bytes).
    peak_memory: int | None = None
    relative_time: float | None = None
    untiled_memory: int | None = None
    memory_budget: int | None = None
    mmap_threshold: int | None = None  # the host allocator's mmap threshold the costs assume (bytes)
    batch: int = 1

    @property
    def fits_untiled(self) -> bool:
        """Whether the un-tiled run is predicted to fit in the memory budget (False without one)."""
        return (self.memory_budget is not None and self.untiled_memory is not None
                and self.untiled_memory <= self.memory_budget)

    @property
    def stitched_bytes(self) -> int:
        """Bytes per image of the stitched maps between pieces (the final output not counted); backward
        adds a gradient of the same size for each."""
        return sum(self.map_bytes[:-1])

    @property
    def axes(self) -> tuple[AxisGeometry, AxisGeometry]:  # the per-axis properties are the geometry's
        return self.geometry.axes

    @property
    def align(self) -> tuple[int, int]:
        return self.geometry.align

    @property
    def size_multiple(self) -> tuple[int, int]:
        return self.geometry.size_multiple

    @property
    def num_tiles(self) -> int:
        return sum(p.num_tiles for p in self.pieces)

    @property
    def tiles(self):
        return self.pieces[0].tiles

    @property
    def overlap(self) -> float:
        total = sum(self.work)
        if total == 0:
            return self.pieces[0].overlap
        return sum(w * p.overlap for w, p in zip(self.work, self.pieces)) / total

    def __str__(self) -> str:
        (h, w), (oh, ow) = self.input_size, self.output_size
        lines = [f"StreamPlan({h}x{w} -> {oh}x{ow}, stride {self.stride}, receptive field "
                 f"{self.receptive_field}, {self.num_tiles} tiles, overlap {self.overlap:.3f})"]
        for index, (name, piece) in enumerate(zip(self.piece_names, self.pieces)):
            line = f"  [{name}] {piece}"
            if index < len(self.map_bytes):
                c, mh, mw = self.maps[index]
                line += f" -> stitched map {c}x{mh}x{mw}, {self.map_bytes[index] / 2**20:.1f} MiB per image"
            lines.append(line)
        if len(self.map_bytes) > 1:
            lines.append(f"  stitched maps between pieces: {self.stitched_bytes / 2**20:.1f} MiB per image, "
                         "kept from forward to backward (plus a gradient of the same size in backward)")
        if any(k for k, p in zip(self.kept, self.pieces) if p.num_tiles > 1):
            lines.append("  tile graphs kept from forward to backward (not recomputed): "
                         + ", ".join(f"{k} of {p.num_tiles}" for k, p in zip(self.kept, self.pieces)))
        if self.peak_memory is not None:
            line = (f"  predicted for batch {self.batch}: peak memory {format_bytes(self.peak_memory)}, time "
                    f"{self.relative_time:.2f}x the un-tiled run (which needs {format_bytes(self.untiled_memory)})")
            if self.memory_budget is not None:
                line += (f"; budget {format_bytes(self.memory_budget)}, un-tiled "
                         + ("fits" if self.fits_untiled else "does not fit"))
            lines.append(line)
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


def _map_bytes(chain: Sequence[Trace], bounds) -> tuple[int, ...]:
    """Bytes per image of each piece's output map (pieces ``[a, b)`` of the traced chain)."""
    return tuple(math.prod(chain[b - 1].output_shape[1:]) * chain[b - 1].output_dtype.itemsize for _, b in bounds)


@dataclass(frozen=True)
class _Request:
    """What a plan is for: input size (pixels), dtype and channels, lazy or tensor, pooled, batch, and
    whether the input needs a gradient."""

    height: int
    width: int
    dtype: torch.dtype
    channels: int
    lazy: bool
    pooled: bool
    batch: int
    input_grad: bool
    # the host allocator's mmap threshold the costs assume (bytes; None: a caching allocator, CUDA's)
    mmap_threshold: int | None = None


class _Piece:
    """Consecutive children streamed as one unit. Holds references only (never registered as a
    submodule, so parameters keep their one place in the module tree)."""

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module]):
        self.names = list(names)
        self.modules = list(modules)
        self.module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        self.label = self.names[0] if len(self.names) == 1 else f"{self.names[0]}..{self.names[-1]}"


class StreamingCNN(nn.Module):
    """Run ``module`` (a local CNN trunk) tile by tile; same output and gradients as running it whole.

    Args:
        module: the trunk, or its consecutive parts as ``(name, module)`` pairs. Every operation in it
            must be local (convolutions, pooling, eval-mode norms, activations, residual additions,
            channel concatenation...); anything else is refused at construction with an error naming
            the module.
        tile_size: largest tile, in input pixels: int or (height, width). Later pieces (see
            ``stitch``) get tiles of the same activation memory. Optional with ``memory_budget``, where
            it caps the tiles the planner may choose.
        memory_budget: bytes (int, float, or a string such as ``"6GiB"``, ``"512 MiB"``, ``"20GB"``)
            that one forward + backward of this module may allocate beyond what was allocated before
            the call (activations, kept tile graphs, stitched maps and their gradients, parameter
            gradients; not the weights or the input), on the module's device (on the CPU: resident
            memory). For each input size the planner then picks, from a shape-only simulation
            (:mod:`.memory`, :mod:`.budget`), the pieces, the tile size and how many tile graphs to
            keep from forward to backward (those tiles are not recomputed) that take the least time
            within the budget: a budget that holds the un-tiled run runs un-tiled. On the CPU (glibc)
            each call fixes the process's mmap threshold (``mallopt``) at the one the chosen plan was
            costed for (32 MiB or 256 KiB, see ``_host_thresholds``). ``plan(size)``
            shows the choice with ``peak_memory`` and ``relative_time``; a budget too small for any
            tiling raises :class:`MemoryBudgetError` naming the smallest that works.
        preprocess: applied to each tile on the module's device before the module (e.g. uint8 to
            normalized float), so that a huge input never has to be converted as a whole.
        in_channels: channels of the input (default: those of the first ``Conv2d``).
        stitch: for an ``nn.Sequential`` (or named parts), after which children to stitch the feature map and stream
            the rest as a new piece: ``"auto"`` (late children first, while the stitched maps hold
            at most twice the input's elements; it cuts the recomputation that large receptive
            fields cause), ``"none"``, or names.
        progress: show a progress bar over tiles.
        outputs: children whose stitched output maps :meth:`forward_pieces` must yield (multi-scale
            features): each ends a piece whatever ``stitch`` says. A child not named here is stitched
            only where ``stitch`` puts a cut. Each such map costs its size (plus its gradient in
            backward); ``plan(size)`` lists them.
        keep_last_tile: without ``memory_budget``, keep the last tile's graph from forward to backward
            instead of recomputing it (final piece only, so that memory stays about one tile).
        resolve: maps a part's name to the module that runs it *now* (e.g. ``owner.get_submodule`` of
            the model that owns named parts). Without it the parts are looked up in ``self.module``.
            Either way every call runs the modules in the tree at that moment: replacing a part
            (``SyncBatchNorm.convert_sync_batchnorm``, model surgery, fusing) re-derives the geometry.
        pool: streamed global pooling of the final map: a :class:`~.reducers.Reducer` or a name
            (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``; ``"attention"`` needs a Reducer
            built with the channels). The module then returns ``(N, features)`` pooled features and the
            final feature map is never stitched. A Reducer with parameters becomes a submodule.

    ``forward(x, mask=None)``: ``x`` a tensor ``(N, C, H, W)`` or a lazy image (``is_lazy_image``);
    ``mask`` bool ``(N, 1, h, w)`` (any resolution covering the image; needs ``pool``), see
    :func:`final_mask` for which final-map positions it keeps.

    Refused with a clear error: an input that is not floating point without ``preprocess`` (integer
    pixels cannot enter a convolution), a floating input whose dtype differs from the parameters' outside
    autocast, parameters or buffers changed in place between forward and backward (a ``RuntimeError``
    like autograd's), double backward (``create_graph=True``), ``torch.jit.script`` and ``torch.fx``.

    ``streaming = False`` runs the same module un-tiled. Norm layers inside stay in eval mode whatever
    ``train()`` says. ``plan(size)`` shows the tiling for an input size before anything runs.
    """

    def __init__(self, module: nn.Module | Sequence[tuple[str, nn.Module]],
                 tile_size: int | Sequence[int] | None = None, *,
                 preprocess: Callable[[Tensor], Tensor] | None = None, in_channels: int | None = None,
                 stitch: str | Sequence[str] = "auto", progress: bool = False, keep_last_tile: bool = True,
                 resolve: Callable[[str], nn.Module] | None = None, outputs: Sequence[str] = (),
                 pool: Reducer | str | None = None, memory_budget: int | float | str | None = None):
        super().__init__()
        if tile_size is None and memory_budget is None:
            raise ValueError("StreamingCNN needs tile_size= (the largest tile, in input pixels) or memory_budget= "
                             "(bytes, e.g. '6GiB': the tile is then chosen per input size)")
        self.memory_budget = None if memory_budget is None else parse_memory(memory_budget)
        # How the parts are found at each call (see _current_children): by name through `resolve`, by
        # position in self.module ("parts"), as self.module's children ("sequential"), or self.module.
        self._resolve = resolve
        if isinstance(module, (list, tuple)):  # named consecutive parts: names are used in messages
            self._children = [(str(name), part) for name, part in module]
            module = nn.Sequential(*[part for _, part in self._children])
            self._layout = "parts"
        elif isinstance(module, nn.Sequential) and len(module) > 0:
            self._children = list(module.named_children())
            self._layout = "sequential"
        else:
            self._children = [("", module)]
            self._layout = "module"
        self._names = [name for name, _ in self._children]
        self._stitch = stitch
        self.module = module
        self.tile_size = None if tile_size is None else normalize_tile_size(tile_size)
        self.preprocess = preprocess
        self.in_channels = in_channels if in_channels is not None else _infer_in_channels(module)
        if self.in_channels is None:
            raise StreamingError("cannot infer the input channels (no Conv2d found): pass in_channels=")
        self.progress = progress
        self.keep_last_tile = keep_last_tile
        self.outputs = tuple(outputs)
        self.streaming = True
        self.pool = make_reducer(pool) if isinstance(pool, str) else pool
        self._chains: dict[tuple, list[Trace]] = {}
        self._plans: dict[tuple, StreamPlan] = {}
        self._costs: dict[tuple, LinearCost] = {}
        self._fingerprint: tuple | None = None
        self._sync()

    # ------------------------------------------------------------------ the modules in the tree now
    def _current_children(self) -> list[tuple[str, nn.Module]]:
        if self._resolve is not None:
            return [(name, self._resolve(name)) for name in self._names]
        if self._layout == "sequential":
            return list(self.module.named_children())
        if self._layout == "parts":
            return [(name, part) for name, part in zip(self._names, self.module)]
        return [("", self.module)]

    def _sync(self) -> None:
        """Re-derive geometry and pieces when any module of the streamed tree was replaced since the
        last call (the identity of every module, so nested replacements count too): the engine must
        never run, or plan for, modules that are no longer in the tree. The fingerprint holds the
        modules themselves (compared by identity), so a replaced one cannot be confused with a new
        one that reuses its memory."""
        children = self._current_children()
        fingerprint = tuple((name, tuple(child.modules())) for name, child in children)
        if fingerprint == self._fingerprint:
            return
        if self._resolve is not None and any(a is not b for (_, a), b in zip(children, self.module)):
            self.module = nn.Sequential(*[child for _, child in children])
        self._children = children
        self._chains, self._plans, self._costs = {}, {}, {}
        freeze_norm_layers(self.module)
        self._derive_geometry()
        self._make_pieces(self._stitch, self.outputs)
        self._fingerprint = fingerprint

    def __getstate__(self) -> dict:
        # Pickles (ddp_spawn, torch.save(model)) carry modules and settings, not traces: the geometry is
        # re-derived from the unpickled modules at the first call.
        state = dict(self.__dict__)
        state.update(_chains={}, _plans={}, _costs={}, _reference=None, _fingerprint=None)
        return state

    def __prepare_scriptable__(self):
        raise StreamingError(
            "StreamingCNN cannot be scripted with torch.jit.script: it runs its module tile by tile in a "
            "Python loop whose tiles depend on the input size, inside a custom autograd Function. Script "
            "or export the module it streams (`.module`) instead; it computes the same function un-tiled")

    # ------------------------------------------------------------------ geometry
    def _trace_chain(self, height: int, width: int, dtype: torch.dtype | None = None,
                     channels: int | None = None) -> list[Trace]:
        """Trace child by child (the output shape of one is the input of the next)."""
        traces = []
        dtype = dtype or _module_dtype(self.module)
        shape: tuple[int, ...] = (1, channels or self.in_channels, height, width)
        for index, (name, child) in enumerate(self._children):
            fn = child
            if index == 0 and self.preprocess is not None:
                fn = lambda x, child=child: child(self.preprocess(x))  # noqa: E731
            t = trace(fn, shape, dtype=dtype, modules=child, path_prefix=name)
            traces.append(t)
            shape, dtype = t.output_shape, t.output_dtype
        return traces

    def _derive_geometry(self) -> None:
        """Trace at two sizes of different parity: the geometry, and proof that the module computes
        the same operations whatever the input size."""
        size, reference, error = 2048, None, None
        while reference is None and size <= 32768:
            try:
                reference = self._trace_chain(size, size)
            except TraceError as exc:  # too small for the network: try a larger (free) meta input
                error, size = exc, size * 4
        if reference is None:
            raise error  # type: ignore[misc]
        needs_multiple = False
        try:
            other = self._trace_chain(size + 1, size + 2)
        except TraceError:
            # e.g. DLA only runs on sizes divisible by its stride: tiles are rounded up to it
            align = StreamGeometry.of_chain(reference, False).align
            other = self._trace_chain(size + align[0], size + 2 * align[1])
            needs_multiple = True
        for a, b in zip(reference, other):
            check_size_independent(a, b)
        self._reference = reference
        self._needs_multiple = needs_multiple
        self.geometry = StreamGeometry.of_chain(reference, needs_multiple)

    def _make_pieces(self, stitch: str | Sequence[str], outputs: Sequence[str] = ()) -> None:
        names = [name for name, _ in self._children]
        ref = self._reference
        if stitch == "auto":
            # From the end (late maps are small, and late stages have the largest halos): stitch while
            # all stitched maps together hold at most twice as many elements as the input.
            budget = 2 * math.prod(ref[0].input_shape)
            cuts = set()
            for i in range(len(ref) - 2, -1, -1):
                elements = math.prod(ref[i].output_shape)
                if elements <= budget:
                    cuts.add(i)
                    budget -= elements
        elif stitch in ("none", None):
            cuts = set()
        else:
            unknown = [s for s in stitch if s not in names]
            if unknown:
                raise StreamingError(f"stitch names {unknown} are not children of the module; children: {names}")
            cuts = {names.index(s) for s in stitch if names.index(s) < len(names) - 1}
        unknown = [s for s in outputs if s not in names]
        if unknown:
            raise StreamingError(f"outputs {unknown} are not children of the module; children: {names}")
        cuts |= {names.index(s) for s in outputs}
        bounds, start = [], 0
        for i in range(len(ref)):
            if i in cuts or i == len(ref) - 1:
                bounds.append((start, i + 1))
                start = i + 1
        self._pieces, self._bounds, self._piece_geometry = self._pieces_for(bounds)
        self._layouts = {tuple(self._bounds): (self._pieces, self._bounds, self._piece_geometry)}
        # One piece for inputs whose stitched intermediate maps would be the only thing growing with the
        # image (a lazy image under streamed pooling), when the tile holds the whole receptive field; the
        # memory-budget planner weighs it against the stitched pieces.
        self._one_piece = self._whole = None
        if stitch == "auto" and len(bounds) > 1 and not outputs:
            self._whole = self._pieces_for([(0, len(ref))])
            self._layouts[((0, len(ref)),)] = self._whole
            if self.tile_size is None or all(self.tile_size[i] >= self._whole[2][0].min_tile_size[i]
                                             for i in range(2)):
                self._one_piece = self._whole
        first = self._piece_geometry[0]
        if self.tile_size is not None and any(self.tile_size[i] < first.min_tile_size[i] for i in range(2)):
            (mh, mw), (rh, rw) = first.min_tile_size, first.receptive_field
            raise TileTooSmallError(
                f"tile_size {self.tile_size} is too small for this network: the receptive field of "
                f"'{self._pieces[0].label}' is {rh}x{rw} px at stride {first.stride}; use tile_size of "
                f"at least ({mh}, {mw})", min_tile_size=(mh, mw))

    def _pieces_for(self, bounds):
        names = [name for name, _ in self._children]
        pieces = [_Piece(names[a:b], [m for _, m in self._children[a:b]]) for a, b in bounds]
        geometry = [StreamGeometry.of_chain(self._reference[a:b], self._needs_multiple) for a, b in bounds]
        return pieces, list(bounds), geometry

    def _choose_layout(self, pooled: bool, lazy: bool):
        """(pieces, bounds, geometries, note) for an input: see the class docstring."""
        default = (self._pieces, self._bounds, self._piece_geometry)
        if not (pooled and lazy):
            note = ""
            if pooled and len(self._bounds) > 1:
                note = ("pooling streamed; stitched maps between pieces (at most twice the input's elements) "
                        "cut the halo recomputation: the tensor input is in memory anyway")
            return default + (note,)
        if len(self._bounds) == 1:
            return default + ("pooling streamed, lazy input: one piece, memory flat in the image size",)
        if self._one_piece is not None:
            return self._one_piece + (
                "pooling streamed, lazy input: one piece (no stitched map grows with the image; the price "
                "is the whole network's halo recomputed on every tile, see overlap)",)
        return default + ("pooling streamed, lazy input, but the tile is smaller than the whole network's "
                          "receptive field needs for one piece: stitched maps between pieces grow with the "
                          "image, and a mask skips tiles of the last piece only; raise tile_size to keep "
                          "memory flat",)

    def _mode_key(self) -> tuple:
        return tuple(m.training for m in self.module.modules()) + (_module_device(self.module).type,)

    def _host_thresholds(self) -> tuple[int | None, ...]:
        """The allocators a plan may run under on the module's device: on the CPU glibc's heap with its
        mmap threshold fixed at ``HOST_MMAP_THRESHOLD`` (blocks below it reused from the heap: few page
        faults, fragments allowed for by ``memory.HEAP_FRAGMENTS``) or at ``SMALL_MMAP_THRESHOLD`` (every
        activation block mapped and returned: resident memory as predicted, more page faults); a
        caching allocator (``None``) elsewhere. Each plan is costed under each; the engine sets the
        chosen plan's threshold."""
        if _module_device(self.module).type != "cpu":
            return (None,)
        return (HOST_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD)

    def _chain_for(self, height: int, width: int, dtype: torch.dtype, channels: int) -> list[Trace]:
        key = (height, width, dtype, channels, self._mode_key())
        chain = self._chains.get(key)
        if chain is None:
            multiple = self.geometry.size_multiple
            if height % multiple[0] or width % multiple[1]:
                raise StreamingError(
                    f"this network only runs on input sizes divisible by {multiple}; got {height}x{width}: "
                    "pad or crop the image")
            chain = self._trace_chain(height, width, dtype, channels)
            for a, b in zip(self._reference, chain):
                check_size_independent(a, b)
            if len(self._chains) > 64:
                self._chains.clear()
            self._chains[key] = chain
        return chain

    def plan(self, input_size: Sequence[int], dtype: torch.dtype | None = None,
             channels: int | None = None, *, lazy: bool = False, pooled: bool | None = None, batch: int = 1,
             input_grad: bool = False) -> StreamPlan:
        """What streaming an input of ``input_size`` (H, W) does: tiles per piece, number of tiles,
        overlap, output size, stride and halo, kept tile graphs, and the cost model's predicted
        ``peak_memory`` (bytes) and ``relative_time`` (over the un-tiled run) for ``batch`` images.
        Runs nothing but shape-only (meta) traces and simulations; the image is never allocated.

        ``lazy``: plan for a lazy image input; ``pooled``: with streamed pooling (default: whether the
        module has a ``pool``). Together they choose one piece (memory flat in the image size, more halo
        recomputation) over stitched pieces; ``note`` says which and why. ``input_grad``: the input
        needs a gradient (its bytes are then counted). Raises :class:`MemoryBudgetError` when the
        module's ``memory_budget`` is too small for any tiling of this input."""
        self._sync()
        pooled = self.pool is not None if pooled is None else pooled
        return self._plan(int(input_size[0]), int(input_size[1]), dtype or _module_dtype(self.module),
                          channels or self.in_channels, lazy, pooled, int(batch), bool(input_grad), estimate=True)

    def _plan(self, height: int, width: int, dtype: torch.dtype, channels: int, lazy: bool, pooled: bool,
              batch: int, input_grad: bool, estimate: bool) -> StreamPlan:
        estimate = estimate or self.memory_budget is not None
        key = (height, width, dtype, channels, lazy, pooled, batch, input_grad, estimate, self.memory_budget,
               self._mode_key())
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        chain = self._chain_for(height, width, dtype, channels)
        request = _Request(height, width, dtype, channels, lazy, pooled, batch, input_grad,
                           self._host_thresholds()[0])
        if self.memory_budget is None:
            _, bounds, geometries, note = self._choose_layout(pooled, lazy)
            plan = self._layout_plan(chain, bounds, geometries, note, self.tile_size, request, estimate)
        else:
            plan = self._budget_plan(chain, request)
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _tile_plans(self, chain: list[Trace], bounds, geometries, tile: tuple[int, int]) -> list[TilePlan]:
        height, width = chain[0].input_shape[2:]
        work = [float(sum(t.activation_elements for t in chain[a:b])) for a, b in bounds]
        pieces: list[TilePlan] = []
        for index, ((a, b), geometry) in enumerate(zip(bounds, geometries)):
            size_in, size_out = chain[a].input_shape[2:], chain[b - 1].output_shape[2:]
            if index > 0:
                # No more activation memory than the whole module would need on the first piece's
                # largest tile: a small late map runs as one tile (nothing recomputed), a large one is
                # tiled to stay within that budget.
                largest = pieces[0].largest_tile
                budget = sum(work) / (height * width) * largest[0] * largest[1]
                density = work[index] / math.prod(size_in)
                scale = math.sqrt(budget / (density * largest[0] * largest[1])) if density > 0 else float(max(size_in))
                tile = tuple(max(int(largest[i] * scale), geometry.min_tile_size[i]) for i in range(2))
            pieces.append(make_plan(size_in, size_out, tile, geometry.axes, geometry.align, geometry.size_multiple))
        return pieces

    def _layout_plan(self, chain: list[Trace], bounds, geometries, note: str, tile, request: "_Request",
                     estimate: bool, kept: Sequence[int] | None = None) -> StreamPlan:
        """The plan of one layout (pieces) and first-piece tile; with ``estimate`` the cost model's
        predictions. ``kept`` defaults to the ``keep_last_tile`` rule."""
        tile = tile if tile is not None else tuple(chain[0].input_shape[2:])
        pieces = self._tile_plans(chain, bounds, geometries, tile)
        if kept is None:  # the last piece keeps its last tile; a single-tile piece runs plainly
            kept = [1 if p.num_tiles == 1 else int(self.keep_last_tile and i == len(pieces) - 1)
                    for i, p in enumerate(pieces)]
        work = tuple(float(sum(t.activation_elements for t in chain[a:b])) for a, b in bounds)
        maps = tuple(tuple(chain[b - 1].output_shape[1:]) for _, b in bounds)
        map_bytes = _map_bytes(chain, bounds)
        names = tuple(p.label for p in self._layouts[tuple(bounds)][0])
        costs: dict = {}
        if estimate:
            costs = self._estimate(chain, bounds, geometries, pieces, map_bytes, request, kept)
        return StreamPlan((request.height, request.width), tuple(chain[-1].output_shape[2:]), self.geometry,
                          tuple(pieces), names, work, maps=maps, map_bytes=map_bytes, note=note,
                          bounds=tuple(tuple(b) for b in bounds), kept=tuple(kept), batch=request.batch,
                          memory_budget=self.memory_budget, mmap_threshold=request.mmap_threshold, **costs)

    # ------------------------------------------------------------------ the cost model
    def _simulate(self, what: str, simulate: Callable[[], object]):
        try:
            return simulate()
        except Exception as exc:  # a module that cannot run backward on meta tensors
            raise StreamingError(
                f"cannot predict the memory of {what} from a shape-only (meta) simulation: {exc}. Pass "
                "tile_size= instead of memory_budget=") from exc

    def _piece_cost(self, bounds, index: int, geometry: StreamGeometry, request: "_Request",
                    chain: list[Trace]) -> LinearCost:
        """Per-tile cost of piece ``index`` of the layout ``bounds``: two simulations, fitted linearly in
        the tile's area (cached)."""
        a, b = bounds[index]
        first = index == 0
        in_dtype = request.dtype if first else chain[a - 1].output_dtype
        channels = request.channels if first else chain[a - 1].output_shape[1]
        input_grad = request.input_grad if first else True
        count_input = request.lazy and first  # a tile of a tensor on the module's device is a view
        key = (a, b, in_dtype, channels, request.batch, input_grad, count_input, request.mmap_threshold,
               self._mode_key())
        cost = self._costs.get(key)
        if cost is None:
            piece = self._layouts[tuple(bounds)][0][index]
            preprocess = self.preprocess if first else None

            def sample(size: int):
                tile = tuple(-(-max(size, v) // m) * m for v, m in zip(geometry.min_tile_size, geometry.size_multiple))
                def run(grad: bool):
                    return simulate_trace(piece.module, (request.batch, channels) + tile, in_dtype,
                                          preprocess=preprocess, input_grad=grad, count_input=count_input)

                def run_any():
                    try:
                        return run(input_grad)
                    except RuntimeError:
                        if not input_grad:
                            raise
                        # a piece that starts with an in-place op cannot take a leaf input that needs a
                        # gradient; it then runs as one tile, where the input-gradient term does not apply
                        return run(False)

                return tile, self._simulate(f"'{piece.label}'", run_any)

            threshold = request.mmap_threshold
            low = max(geometry.min_tile_size)
            small, large = sample(2 * low), sample(max(8 * low, 2048))
            try:  # every block's bytes linear in the tile's area: any tile's trace by interpolation
                cost = TraceCost(small, large, threshold)
            except ValueError:  # operations that change with the size: lines through costed samples, in
                # two regimes (see LinearCost): tiles near the smallest, and large tiles
                costed = lambda sampled: (sampled[0], sampled[1].cost(threshold))  # noqa: E731
                cost = LinearCost.fit((costed(sample(low)), costed(small)),
                                      (costed(sample(max(4 * low, 1024))), costed(large)))
            self._costs[key] = cost
        return cost

    def _untiled_cost(self, request: "_Request") -> StepCost:
        key = ("untiled", request, self._mode_key())
        cost = self._costs.get(key)
        if cost is None:
            whole = nn.Sequential(*[m for _, m in self._children])
            cost = self._costs[key] = self._simulate("the un-tiled module", lambda: simulate_trace(
                whole, (request.batch, request.channels, request.height, request.width), request.dtype,
                preprocess=self.preprocess, input_grad=request.input_grad,
                count_input=request.lazy).cost(request.mmap_threshold))
        return cost

    def _piece_costs(self, chain, bounds, geometries, pieces: Sequence[TilePlan], map_bytes, request) -> list[PieceCost]:
        costs = []
        for index, (piece, geometry) in enumerate(zip(pieces, geometries)):
            last = index == len(pieces) - 1
            modules = self._layouts[tuple(bounds)][0][index].modules
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            if last and request.pooled and self.pool is not None:
                params += [p for p in self.pool.parameters() if p.requires_grad]
            if index > 0:
                input_bytes = request.batch * map_bytes[index - 1]
            elif request.input_grad:
                input_bytes = request.batch * request.channels * request.height * request.width * request.dtype.itemsize
            else:
                input_bytes = 0
            costs.append(PieceCost(
                rows=tuple(r.length for r in piece.rows), cols=tuple(c.length for c in piece.cols),
                cost=self._piece_cost(bounds, index, geometry, request, chain),
                map_bytes=0 if last and request.pooled else request.batch * map_bytes[index],
                input_map_bytes=input_bytes,
                param_bytes=sum(p.numel() * p.element_size() for p in params)))
        return costs

    def _estimate(self, chain, bounds, geometries, pieces, map_bytes, request, kept) -> dict:
        if self.memory_budget is None:  # predictions are informative only: a module the simulation
            try:                        # cannot run still streams
                return self._estimate_raising(chain, bounds, geometries, pieces, map_bytes, request, kept)
            except StreamingError:
                return {}
        return self._estimate_raising(chain, bounds, geometries, pieces, map_bytes, request, kept)

    def _estimate_raising(self, chain, bounds, geometries, pieces, map_bytes, request, kept) -> dict:
        untiled = self._untiled_cost(request)
        reference = self._reference_time(request)
        if all(p.num_tiles == 1 for p in pieces):  # every piece runs plainly: the un-tiled run
            return dict(peak_memory=untiled.peak, untiled_memory=untiled.peak,
                        relative_time=self._untiled_time(untiled, request) / reference)
        costs = self._piece_costs(chain, bounds, geometries, pieces, map_bytes, request)
        # untiled_memory under the plan's own allocator: fits_untiled then agrees with the planner
        return dict(peak_memory=peak_memory(costs, kept), untiled_memory=untiled.peak,
                    relative_time=step_time(costs, kept, self._fresh_flops(request)) / reference)

    def _fresh_flops(self, request: "_Request") -> float:
        return 0.0 if request.mmap_threshold is None else CPU_FRESH_FLOPS

    def _untiled_time(self, untiled: StepCost, request: "_Request") -> float:
        """The un-tiled run's time in the units of ``budget.step_time``."""
        return max(3 * untiled.flops + self._fresh_flops(request) * untiled.fresh, 1)

    def _reference_time(self, request: "_Request") -> float:
        """The reference of ``relative_time``: the un-tiled run under the device's default allocator."""
        default = dataclasses.replace(request, mmap_threshold=self._host_thresholds()[0])
        return self._untiled_time(self._untiled_cost(default), default)

    @staticmethod
    def _faster(candidate, best) -> bool:
        """Whether ``candidate`` ``(time, peak, ...)`` beats ``best``: less time (to 0.1%), then less memory."""
        return best is None or (round(candidate[0], 3), candidate[1]) < (round(best[0], 3), best[1])

    @staticmethod
    def _allocator_allows(request: "_Request", peak: int) -> bool:
        """Whether a plan of ``peak`` bytes may run under the request's allocator (HEAP_PLAN_MIN_BYTES)."""
        return request.mmap_threshold != HOST_MMAP_THRESHOLD or peak >= HEAP_PLAN_MIN_BYTES

    def _candidate_tiles(self, geometry: StreamGeometry, height: int, width: int) -> list[tuple[int, int]]:
        """First-piece tiles to weigh: from the smallest that works up to the whole image, 15% apart."""
        size = (height, width)
        low = tuple(min(geometry.min_tile_size[i], size[i]) for i in range(2))  # a whole axis is one tile
        cap = self.tile_size or size
        if any(cap[i] < low[i] for i in range(2)):
            return []
        step = max(geometry.align)
        tiles, t = [], max(low)
        while True:
            tile = tuple(min(max(t, low[i]), cap[i], size[i]) for i in range(2))
            if tile not in tiles:
                tiles.append(tile)
            if t >= max(height, width):
                return tiles
            t = min(max(-(-int(t * 1.15) // step) * step, t + step), max(height, width))

    def _budget_plan(self, chain: list[Trace], request: "_Request") -> StreamPlan:
        """The plan that takes the least predicted time within ``memory_budget`` (see the class
        docstring); ties go to less memory."""
        budget = self.memory_budget
        layouts = [self._choose_layout(request.pooled, request.lazy)[1:]]
        for bounds, geometries, note in ((self._bounds, self._piece_geometry, "stitched pieces: chosen by the "
                                          "memory-budget planner"),
                                         (self._whole and self._whole[1], self._whole and self._whole[2],
                                          "one piece: chosen by the memory-budget planner")):
            if bounds and all(tuple(bounds) != tuple(other[0]) for other in layouts):
                layouts.append((bounds, geometries, note))
        best, smallest = self._budget_search(chain, request, layouts, budget)
        if best is None:
            size = f"{request.height}x{request.width}"
            if smallest is None:
                raise MemoryBudgetError(
                    f"no tiling of a {size} input is possible with tile_size {self.tile_size}: the tile is smaller "
                    "than the receptive field needs; raise tile_size or drop it")
            raise MemoryBudgetError(
                f"memory_budget {format_bytes(budget)} is too small to stream a {size} input (batch "
                f"{request.batch}): the smallest plan needs {format_bytes(smallest)} ({smallest} bytes). Raise "
                f"memory_budget to at least that, or stream a smaller image or batch", minimum=smallest)
        _, _, bounds, geometries, note, tile, kept, request = best
        return self._layout_plan(chain, bounds, geometries, note, tile, request, True, kept)

    def _budget_search(self, chain: list[Trace], request: "_Request", layouts, budget: int):
        """(the fastest plan within ``budget`` or None, the smallest peak of any plan or None), over the
        layouts, first-piece tiles and allocators (``_host_thresholds``). Every plan's cost is
        independent of the budget, so a larger budget never loses a plan: the smallest peak is a floor."""
        best, smallest = None, None
        for threshold in self._host_thresholds():
            found, least = self._budget_search_one(chain, dataclasses.replace(request, mmap_threshold=threshold),
                                                   layouts, budget)
            if least is not None:
                smallest = least if smallest is None else min(smallest, least)
            if found is not None and self._faster(found, best):
                best = found
        return best, smallest

    def _budget_search_one(self, chain: list[Trace], request: "_Request", layouts, budget: int):
        untiled = self._untiled_cost(request)
        reference = self._reference_time(request)
        best, smallest, seen = None, None, set()
        for bounds, geometries, note in layouts:
            for tile in self._candidate_tiles(geometries[0], request.height, request.width):
                pieces = self._tile_plans(chain, bounds, geometries, tile)
                grids = (tuple(map(tuple, bounds)), tuple(p.grid for p in pieces))
                if grids in seen:
                    continue
                seen.add(grids)
                map_bytes = _map_bytes(chain, bounds)
                if all(p.num_tiles == 1 for p in pieces):
                    # un-tiled whenever it fits: nothing recomputed, and the fresh pages that smaller
                    # blocks save a tiled CPU plan are within the cost model's error (it wins: time
                    # minus 1, still ordered by its own allocator's time)
                    kept, peak = [1] * len(pieces), untiled.peak
                    time = self._untiled_time(untiled, request) / reference - 1
                else:
                    costs = self._piece_costs(chain, bounds, geometries, pieces, map_bytes, request)
                    kept = allocate_kept(costs, budget)
                    if kept is None:
                        least = peak_memory(costs, [1 if p.num_tiles == 1 else 0 for p in pieces])
                        if self._allocator_allows(request, least):
                            smallest = least if smallest is None else min(smallest, least)
                        continue
                    peak = peak_memory(costs, kept)
                    time = step_time(costs, kept, self._fresh_flops(request)) / reference
                if not self._allocator_allows(request, peak):
                    continue  # this plan runs with every block mapped instead (the other threshold)
                smallest = peak if smallest is None else min(smallest, peak)
                candidate = (time, peak, bounds, geometries, note, tile, kept, request)
                if peak <= budget and self._faster(candidate, best):
                    best = candidate
        return best, smallest

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "StreamingCNN":
        super().train(mode)
        freeze_norm_layers(self.module)
        return self

    # ------------------------------------------------------------------ forward
    def _prepare(self, x, device: torch.device) -> Tensor:
        x = read_whole(x).to(device)
        return self.preprocess(x) if self.preprocess is not None else x

    def _check_input(self, x, device: torch.device) -> None:
        if self.preprocess is not None:
            return
        dtype = _module_dtype(self.module)
        if not x.dtype.is_floating_point:
            raise StreamingError(
                f"the input is {x.dtype} but this module computes in {dtype} and has no per-tile "
                f"preprocess: create the stream model with normalize_input=True (uint8 images), give "
                f"StreamingCNN preprocess= (e.g. lambda t: t.to({dtype}) / 255), or convert the image first")
        has_float_params = any(p.is_floating_point() for p in self.module.parameters())
        if has_float_params and x.dtype != dtype and not torch.is_autocast_enabled(device.type):
            raise StreamingError(
                f"the input is {x.dtype} but the module's parameters are {dtype}: convert the image "
                f"(x.to({dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")

    def forward(self, x, mask: Tensor | None = None, *, pool: Reducer | None = ...) -> Tensor:  # type: ignore[assignment]
        """The final map ``(N, C', H', W')``, or with a pool the pooled features ``(N, features)``.

        ``x``: tensor or lazy image ``(N, C, H, W)``; ``mask``: see the class docstring; ``pool``: this
        call's reducer instead of the module's own (``None``: return the map)."""
        if isinstance(x, torch.fx.Proxy):
            raise StreamingError(
                "a streamed module cannot be traced with torch.fx: the number of tiles depends on the "
                "input size and they run in a Python loop inside a custom autograd Function. Trace the "
                "un-tiled network instead (the base model, or StreamingCNN.module)")
        pool = self.pool if pool is ... else pool  # ... (not given): the module's own pool
        for _, x in self.forward_pieces(x, mask, pool=pool):
            pass
        return x

    def forward_pieces(self, x, mask: Tensor | None = None, *,
                       pool: Reducer | None = None) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name of the piece's last child, its stitched output map)`` piece by piece, lazily: a
        caller that stops early runs nothing more. The maps are the ones :meth:`forward` chains (same
        autograd graph), so the gradients of all of them flow back through the pieces before them.
        With ``streaming = False`` each piece runs un-tiled. With ``pool`` (a :class:`Reducer`) the
        last piece is pooled while streaming and yields ``("pool", pooled features (N, features))``
        instead of its map (which is then never stitched)."""
        lazy = is_lazy_image(x)
        if not lazy and not isinstance(x, Tensor):
            raise TypeError(f"StreamingCNN takes a tensor or a lazy image, got {type(x).__name__}: a lazy image has "
                            "`.shape` (N, C, H, W), `.dtype` (a torch.dtype) and `x[:, :, r0:r1, c0:c1]` returning a "
                            "tensor (timm_stream.engine.is_lazy_image)")
        if len(x.shape) != 4:
            raise ValueError(f"StreamingCNN expects an (N, C, H, W) input, got shape {tuple(x.shape)}")
        if mask is not None and pool is None:
            raise ValueError("mask= selects the final-map positions that are pooled, but this StreamingCNN has no "
                             "pooling: pass pool='avg' (or another reducer) or drop the mask")
        self._sync()
        freeze_norm_layers(self.module)
        device = _module_device(self.module)
        self._check_input(x, device)
        if not self.streaming:
            for index, piece in enumerate(self._pieces):
                x = piece.module(self._prepare(x, device) if index == 0 else x)
                if index < len(self._pieces) - 1 or pool is None:
                    yield piece.names[-1], x
            if pool is not None:
                yield "pool", pool(x, final_mask(mask, x.shape[0], tuple(x.shape[-2:]), x.device))
            return
        needs_grad = torch.is_grad_enabled()
        input_grad = isinstance(x, Tensor) and x.requires_grad and needs_grad
        plan = self._plan(int(x.shape[-2]), int(x.shape[-1]), x.dtype, int(x.shape[1]), lazy, pool is not None,
                          int(x.shape[0]), input_grad, estimate=False)
        pieces = self._layouts[plan.bounds][0]
        if device.type == "cpu" and self.memory_budget is not None and plan.mmap_threshold is not None:
            # a budget promises resident memory: run the allocator the plan was costed for, from the
            # first step (glibc's dynamic threshold gets near 32 MiB only after freeing such a block)
            use_fixed_mmap_threshold(plan.mmap_threshold)
        for index, (piece, piece_plan) in enumerate(zip(pieces, plan.pieces)):
            preprocess = self.preprocess if index == 0 else None
            last = index == len(pieces) - 1
            if piece_plan.num_tiles == 1:  # the whole map is one tile: run it plainly, nothing to recompute
                x = piece.module(self._prepare(x, device) if index == 0 else x.to(device))
                if last and pool is not None:
                    yield "pool", pool(x, final_mask(mask, x.shape[0], tuple(x.shape[-2:]), x.device))
                    return
                yield piece.names[-1], x
                continue
            params = [p for p in piece.module.parameters() if p.requires_grad]
            watched = self._watched(piece)
            sink = None
            if last and pool is not None:
                m = final_mask(mask, x.shape[0], piece_plan.output_size, device)
                sink = ReduceSink(piece_plan, pool, m)
                params += [p for p in pool.parameters() if p.requires_grad]
                watched += [(f"pool.{n}", t) for n, t in pool.named_parameters()]
            # Kept tile graphs: by default only the final piece's last tile (nothing but the caller's head
            # runs before its backward, so it never coexists with another piece's activations); with a
            # memory budget as many as the planner fitted in it.
            runner = TileRunner(piece.module, piece_plan, params, device, preprocess, self.progress,
                                plan.kept[index], sink, watched=watched)
            input_grad = isinstance(x, Tensor) and x.requires_grad
            if needs_grad and (input_grad or params):
                out = StreamFunction.apply(runner, x, *params)
            else:
                out = runner.forward(x, keep=False)[0]
                out = out[0] if len(out) == 1 else out
            if sink is not None:
                stats = (out,) if isinstance(out, Tensor) else tuple(out)
                yield "pool", pool.finalize(stats, sink.state).to(sink.dtype)  # the map's dtype, as un-tiled
                return
            x = out
            yield piece.names[-1], x

    @staticmethod
    def _watched(piece: "_Piece") -> list[tuple[str, Tensor]]:
        """Every parameter and buffer a piece's tiles are recomputed from, with its path."""
        watched = []
        for name, child in zip(piece.names, piece.modules):
            prefix = f"{name}." if name else ""
            watched += [(prefix + n, t) for n, t in child.named_parameters()]
            watched += [(prefix + n, t) for n, t in child.named_buffers()]
        return watched

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"tile_size={self.tile_size}, stride={g.stride}, receptive_field={g.receptive_field}, "
                f"pieces={[p.label for p in self._pieces]}, streaming={self.streaming}")


def final_mask(mask: Tensor | None, batch: int, size: Sequence[int], device: torch.device) -> Tensor | None:
    """The final-map mask ``(N, 1, *size)`` bool from a mask ``(N or 1, 1, h, w)`` bool at any resolution
    covering the image: position ``(p, q)`` is kept iff ``F.interpolate(mask.float(), size,
    mode="nearest") > 0.5`` there (nearest: the mask pixel under the position's top-left corner, torch's
    ``floor(p * h / H')``). Raises ``ValueError`` for a mask of another dtype/shape, or one that keeps
    no position of some image (pooling over nothing is undefined)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 \
            or mask.shape[0] not in (1, batch):
        what = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape (N, 1, h, w) with N = {batch} (or 1), got a {what}: "
                         "e.g. mask = probability > 0.5, or timm_stream.tissue_mask(image)")
    m = torch.nn.functional.interpolate(mask.to(device=device, dtype=torch.float32), size=tuple(size),
                                        mode="nearest") > 0.5
    m = m.expand(batch, 1, *m.shape[2:])
    empty = (~m.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"the mask keeps no position of the {tuple(size)} final feature map for image(s) {empty}: "
                         "nothing to pool. Check the mask (is the tissue True?), or pass mask=None")
    return m
