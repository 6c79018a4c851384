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

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import StreamingError, TileTooSmallError, TraceError
from .function import ReduceSink, StreamFunction, TileRunner
from .lazy import is_lazy_image, read_whole
from .reducers import Reducer, make_reducer
from .geometry import AxisGeometry, lcm, min_tile_length
from .plan import TilePlan, make_plan
from .trace import Trace, check_size_independent, trace

__all__ = ["StreamingCNN", "StreamGeometry", "StreamPlan", "is_norm_layer", "freeze_norm_layers", "final_mask"]

_DEFAULT = object()  # forward(pool=...) not given: the module's own pool

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm / LayerNorm / ... including third-party norms named ``*Norm*`` (timm's
    ``BatchNormAct2d``, ``FrozenBatchNorm2d``, ``LayerNorm2d``)."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def freeze_norm_layers(module: nn.Module) -> None:
    """Put every normalization layer under ``module`` in eval mode (running statistics stop changing)."""
    for m in module.modules():
        if m.training and is_norm_layer(m):
            m.train(False)


def _as_tile_size(tile_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(tile_size, (tuple, list)) and len(tile_size) == 2:
        pair = tuple(tile_size)
    else:
        pair = (tile_size, tile_size)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"tile_size must be a positive int or a pair (height, width) of positive ints, "
                         f"got {tile_size!r}")
    return pair  # type: ignore[return-value]


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
class StreamGeometry:
    """Size-independent geometry of a streamed module (or of one piece of it).

    ``axes``: receptive field of the output per axis (output ``j`` reads input pixels
    ``[j*stride + lo, j*stride + hi]``); ``align``: tile origins are multiples of it; ``size_multiple``:
    input sizes the module accepts are multiples of it (1 for most networks).
    """

    axes: tuple[AxisGeometry, AxisGeometry]
    align: tuple[int, int]
    size_multiple: tuple[int, int]

    @property
    def stride(self) -> tuple[int, int]:
        return (self.axes[0].stride, self.axes[1].stride)

    @property
    def halo(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (self.axes[0].halo, self.axes[1].halo)

    @property
    def receptive_field(self) -> tuple[int, int]:
        return (self.axes[0].size, self.axes[1].size)

    @property
    def min_tile_size(self) -> tuple[int, int]:
        return tuple(min_tile_length(self.axes[i], self.align[i], self.size_multiple[i]) for i in range(2))

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
class StreamPlan:
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
    note: str = ""  # why these pieces (streamed pooling / lazy input), shown by str()

    @property
    def stride(self) -> tuple[int, int]:
        return self.geometry.stride

    @property
    def halo(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.geometry.halo

    @property
    def receptive_field(self) -> tuple[int, int]:
        return self.geometry.receptive_field

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
        for name, piece in zip(self.piece_names, self.pieces):
            lines.append(f"  [{name}] {piece}")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


class _Piece:
    """Consecutive children streamed as one unit. Holds references only (never registered as a
    submodule, so parameters keep their one place in the module tree)."""

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module]):
        self.names = list(names)
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
            ``stitch``) get tiles of the same activation memory.
        preprocess: applied to each tile on the module's device before the module (e.g. uint8 to
            normalized float), so that a huge input never has to be converted as a whole.
        in_channels: channels of the input (default: those of the first ``Conv2d``).
        stitch: for an ``nn.Sequential`` (or named parts), after which children to stitch the feature map and stream
            the rest as a new piece: ``"auto"`` (late children first, while the stitched maps hold
            at most twice the input's elements; it cuts the recomputation that large receptive
            fields cause), ``"none"``, or names.
        progress: show a progress bar over tiles.
        keep_last_tile: keep the last tile's graph from forward to backward instead of recomputing it
            (final piece only, so that memory stays about one tile).
        pool: streamed global pooling of the final map: a :class:`~.reducers.Reducer` or a name
            (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``; ``"attention"`` needs a Reducer
            built with the channels). The module then returns ``(N, features)`` pooled features and the
            final feature map is never stitched. A Reducer with parameters becomes a submodule.

    ``forward(x, mask=None)``: ``x`` a tensor ``(N, C, H, W)`` or a lazy image (``is_lazy_image``);
    ``mask`` bool ``(N, 1, h, w)`` (any resolution covering the image; needs ``pool``), see
    :func:`final_mask` for which final-map positions it keeps.

    ``streaming = False`` runs the same module un-tiled. Norm layers inside stay in eval mode whatever
    ``train()`` says. ``plan(size)`` shows the tiling for an input size before anything runs.
    """

    def __init__(self, module: nn.Module | Sequence[tuple[str, nn.Module]], tile_size: int | Sequence[int], *,
                 preprocess: Callable[[Tensor], Tensor] | None = None, in_channels: int | None = None,
                 stitch: str | Sequence[str] = "auto", progress: bool = False, keep_last_tile: bool = True,
                 pool: Reducer | str | None = None):
        super().__init__()
        if isinstance(module, (list, tuple)):  # named consecutive parts: names are used in messages
            self._children = [(str(name), part) for name, part in module]
            module = nn.Sequential(*[part for _, part in self._children])
        elif isinstance(module, nn.Sequential) and len(module) > 0:
            self._children = list(module.named_children())
        else:
            self._children = [("", module)]
        self.module = module
        self.tile_size = _as_tile_size(tile_size)
        self.preprocess = preprocess
        self.in_channels = in_channels if in_channels is not None else _infer_in_channels(module)
        if self.in_channels is None:
            raise StreamingError("cannot infer the input channels (no Conv2d found): pass in_channels=")
        self.progress = progress
        self.keep_last_tile = keep_last_tile
        self.streaming = True
        self.pool = make_reducer(pool) if isinstance(pool, str) else pool
        self._chains: dict[tuple, list[Trace]] = {}
        freeze_norm_layers(self.module)
        self._derive_geometry()
        self._make_pieces(stitch)

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

    def _make_pieces(self, stitch: str | Sequence[str]) -> None:
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
        bounds, start = [], 0
        for i in range(len(ref)):
            if i in cuts or i == len(ref) - 1:
                bounds.append((start, i + 1))
                start = i + 1
        self._pieces, self._bounds, self._piece_geometry = self._layout(bounds)
        # One piece for inputs whose stitched intermediate maps would be the only thing growing with the
        # image (a lazy image under streamed pooling), when the tile holds the whole receptive field.
        self._one_piece = None
        if stitch == "auto" and len(bounds) > 1:
            layout = self._layout([(0, len(ref))])
            if all(self.tile_size[i] >= layout[2][0].min_tile_size[i] for i in range(2)):
                self._one_piece = layout
        first = self._piece_geometry[0]
        if any(self.tile_size[i] < first.min_tile_size[i] for i in range(2)):
            (mh, mw), (rh, rw) = first.min_tile_size, first.receptive_field
            raise TileTooSmallError(
                f"tile_size {self.tile_size} is too small for this network: the receptive field of "
                f"'{self._pieces[0].label}' is {rh}x{rw} px at stride {first.stride}; use tile_size of "
                f"at least ({mh}, {mw})", min_tile_size=(mh, mw))

    def _layout(self, bounds):
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
        return tuple(m.training for m in self.module.modules())

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
             channels: int | None = None, *, lazy: bool = False, pooled: bool | None = None) -> StreamPlan:
        """What streaming an input of ``input_size`` (H, W) does: tiles per piece, number of tiles,
        overlap, output size, stride and halo. Runs nothing but a shape trace.

        ``lazy``: plan for a lazy image input; ``pooled``: with streamed pooling (default: whether the
        module has a ``pool``). Together they choose one piece (memory flat in the image size, more halo
        recomputation) over stitched pieces; ``note`` says which and why."""
        height, width = int(input_size[0]), int(input_size[1])
        pooled = self.pool is not None if pooled is None else pooled
        layout_pieces, bounds, geometries, note = self._choose_layout(pooled, lazy)
        chain = self._chain_for(height, width, dtype or _module_dtype(self.module), channels or self.in_channels)
        work = tuple(float(sum(t.activation_elements for t in chain[a:b])) for a, b in bounds)
        pieces: list[TilePlan] = []
        for index, ((a, b), geometry) in enumerate(zip(bounds, geometries)):
            size_in, size_out = chain[a].input_shape[2:], chain[b - 1].output_shape[2:]
            if index == 0:
                tile = self.tile_size
            else:
                # No more activation memory than the whole module would need on the first piece's
                # largest tile: a small late map runs as one tile (nothing recomputed), a large one is
                # tiled to stay within that budget.
                largest = pieces[0].largest_tile
                budget = sum(work) / (height * width) * largest[0] * largest[1]
                density = work[index] / math.prod(size_in)
                scale = math.sqrt(budget / (density * largest[0] * largest[1])) if density > 0 else float(max(size_in))
                tile = tuple(max(int(largest[i] * scale), geometry.min_tile_size[i]) for i in range(2))
            pieces.append(make_plan(size_in, size_out, tile, geometry.axes, geometry.align,
                                    geometry.size_multiple))
        return StreamPlan((height, width), tuple(chain[-1].output_shape[2:]), self.geometry, tuple(pieces),
                          tuple(p.label for p in layout_pieces), work, note)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "StreamingCNN":
        super().train(mode)
        freeze_norm_layers(self.module)
        return self

    # ------------------------------------------------------------------ forward
    def _prepare(self, x, device: torch.device) -> Tensor:
        x = read_whole(x).to(device)
        return self.preprocess(x) if self.preprocess is not None else x

    def forward(self, x, mask: Tensor | None = None, *, pool: Reducer | None = _DEFAULT) -> Tensor:  # type: ignore[assignment]
        """The final map ``(N, C', H', W')``, or with a pool the pooled features ``(N, features)``.

        ``x``: tensor or lazy image ``(N, C, H, W)``; ``mask``: see the class docstring; ``pool``: this
        call's reducer instead of the module's own (``None``: return the map)."""
        lazy = is_lazy_image(x)
        if len(x.shape) != 4:
            raise ValueError(f"StreamingCNN expects an (N, C, H, W) input, got shape {tuple(x.shape)}")
        pool = self.pool if pool is _DEFAULT else pool
        if mask is not None and pool is None:
            raise ValueError("mask= selects the final-map positions that are pooled, but this StreamingCNN has no "
                             "pooling: pass pool='avg' (or another reducer) or drop the mask")
        freeze_norm_layers(self.module)
        device = _module_device(self.module)
        if not self.streaming:
            y = self.module(self._prepare(x, device))
            if pool is None:
                return y
            return pool.reference(y, final_mask(mask, y.shape[0], tuple(y.shape[-2:]), y.device))
        plan = self.plan(x.shape[-2:], x.dtype, x.shape[1], lazy=lazy, pooled=pool is not None)
        pieces, _, _, _ = self._choose_layout(pool is not None, lazy)
        needs_grad = torch.is_grad_enabled()
        for index, (piece, piece_plan) in enumerate(zip(pieces, plan.pieces)):
            preprocess = self.preprocess if index == 0 else None
            last = index == len(pieces) - 1
            if piece_plan.num_tiles == 1:  # the whole map is one tile: run it plainly, nothing to recompute
                x = piece.module(self._prepare(x, device) if index == 0 else x.to(device))
                if last and pool is not None:
                    return pool.reference(x, final_mask(mask, x.shape[0], tuple(x.shape[-2:]), x.device))
                continue
            params = [p for p in piece.module.parameters() if p.requires_grad]
            sink = None
            if last and pool is not None:
                m = final_mask(mask, x.shape[0], piece_plan.output_size, device)
                sink = ReduceSink(piece_plan, pool, m)
                params += [p for p in pool.parameters() if p.requires_grad]
            # Only the final piece keeps its last tile: nothing but the caller's head runs before its
            # backward, so the kept graph never coexists with another piece's activations.
            keep = self.keep_last_tile and last
            runner = TileRunner(piece.module, piece_plan, params, device, preprocess, self.progress, keep, sink)
            input_grad = isinstance(x, Tensor) and x.requires_grad
            if needs_grad and (input_grad or params):
                out = StreamFunction.apply(runner, x, *params)
            else:
                out = runner.forward(x, keep_last=False)[0]
                out = out[0] if len(out) == 1 else out
            if sink is not None:
                stats = (out,) if isinstance(out, Tensor) else tuple(out)
                return pool.finalize(stats, sink.state)
            x = out
        return x

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
