"""Multi-scale features of a streaming model: ``forward_intermediates``, ``prune_intermediate_layers`` and
``features_only=True`` (timm's feature API), with the streamed stages' maps stitched by the engine.

How: the streamed steps run in :class:`~timm_stream.engine.StreamingCNN` *pieces* cut after every step
whose output a requested feature is (plus wherever ``stitch="auto"`` cuts anyway); each piece is tiled
with its own halo and its stitched output map is exactly the un-tiled one. The base model's own
``forward_intermediates`` then runs on a shallow copy of the model in which each streamed step is a
*replay* of its stitched map, so index selection, ``norm``, ``stop_early``, ``output_fmt``,
``intermediates_only`` and the un-streamed tail are timm's code, run as in timm.

Trade-off against one streamed pass that crops every stage out of the same tile (the pass the issue
first asked for): each feature is still computed once per tile of its piece and backward recomputes
each piece's tiles once, pulling the gradients of all requested maps through autograd, but a later
stage re-tiles its small stitched input with only its own halo instead of recomputing the whole trunk's
halo from the image, so less is recomputed. The price is the same in both designs: every requested
map is stitched (kept whole) because it is an output, and backward holds its gradient.

Memory: the requested maps and the auto cuts are kept from forward to backward, one map per piece,
``(C, H/r, W/r)`` elements per image for a feature at reduction ``r`` (``stream_plan`` prints each
map's MiB). A stage that is not requested is never stitched because of features (only where
``stitch="auto"`` would cut it for a plain forward too).
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Sequence

import torch
# timm's FeatureGetterNet (feature_cls='getter') and feature_take_indices are not re-exported by
# timm.models; they are the library's own implementation of the feature API, used here unchanged.
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import Tensor, nn

from ..engine import StreamingCNN, StreamingError
from ._families import TrunkSplit

__all__ = ["StreamFeatureNet", "make_feature_net", "default_out_indices", "feature_steps", "observed_steps",
           "features_streamer", "forward_intermediates", "prune_intermediate_layers", "restream", "stream_cuts"]


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(module.named_children())


def feature_steps(model: nn.Module, split: TrunkSplit | None = None,
                  stream_stages: int | None = None) -> list[tuple[str, nn.Module]]:
    """The streamed steps of ``model`` at the granularity features need: a step (an ``nn.Sequential``)
    containing a feature point strictly inside one of its children is expanded into its children
    (ResNetV2's and CSPNet's stem features are taken after ``stem.conv`` / ``stem.conv1``)."""
    points = [info["module"] for info in model.feature_info]
    steps: list[tuple[str, nn.Module]] = []
    split = model._split if split is None else split
    stream_stages = model.stream_stages if stream_stages is None else stream_stages
    for name, module in split.streamed(stream_stages):
        inside = [p for p in points if p.startswith(name + ".")]
        if inside and isinstance(module, nn.Sequential) and any(
                p[len(name) + 1:].split(".")[0] in module._modules for p in inside):
            steps += [(f"{name}.{child}", m) for child, m in _children(module)]
        else:
            steps.append((name, module))
    return steps


def observed_steps(model: nn.Module, steps: Sequence[str], family: str | None = None) -> list[str | None]:
    """For each feature index (``model.feature_info`` order), the streamed step whose output the base
    model's ``forward_intermediates`` reads for it, or None when the feature is not a streamed step's
    output (a point inside a streamed block, or a step of the un-streamed tail)."""
    names = set(steps)
    ends = getattr(model, "feature_ends", None)
    last = len(model.feature_info) - 1
    observed: list[str | None] = []
    for k, info in enumerate(model.feature_info):
        point = info["module"]
        if point in names:
            observed.append(point)
        elif (family or model._split.family) == "Xception" and ends is not None and 0 < k < last:
            # legacy Xception taps block i as relu(block i output): the ReLU that starts block i+1
            step = f"block{ends[k]}"
            observed.append(step if step in names else None)
        else:
            observed.append(None)
    return observed


def _inside_streamed(point: str, steps: Sequence[str]) -> str | None:
    for name in steps:
        if point == name or point.startswith(name + "."):
            return name
    return None


# model -> {cuts: StreamingCNN}: kept outside the model so that copies, pickles and state dicts of the
# model never carry engines (they are rebuilt on demand from the model's own modules).
_STREAMERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _streamer_cache(model: nn.Module) -> dict:
    cache = _STREAMERS.get(model)
    if cache is None:
        cache = _STREAMERS[model] = {}
    return cache


def _wanted_steps(model: nn.Module, names: Sequence[str], take_indices: Sequence[int],
                  family: str | None = None) -> dict[int, str]:
    observed = observed_steps(model, names, family)
    wanted: dict[int, str] = {}
    for k in take_indices:
        point = model.feature_info[k]["module"]
        if observed[k] is not None:
            wanted[k] = observed[k]
        elif _inside_streamed(point, names) is not None:
            available = [i for i, info in enumerate(model.feature_info)
                         if observed[i] is not None or _inside_streamed(info["module"], names) is None]
            raise StreamingError(
                f"feature {k} of {type(model).__name__} ('{point}') is taken inside the streamed block "
                f"'{_inside_streamed(point, names)}', where no stitched piece can end. Request only features "
                f"{available} (out_indices / indices), or stream fewer stages (stream_stages=...) so that "
                "the block runs un-tiled (the stem always streams).")
    return wanted


def stream_cuts(model: nn.Module, split: TrunkSplit, stream_stages: int, out_indices) -> tuple[str, ...]:
    """The streamed steps (of ``split.streamed(stream_stages)``) after which features ``out_indices``
    need a stitched map: a features-only model cuts its main streamer there too, so that ``tile_size``
    is checked against the pieces that actually run (the stem alone, not the stem and stage 1).

    Raises:
        StreamingError: a requested feature lies inside a streamed block.
    """
    take, _ = feature_take_indices(len(model.feature_info), out_indices)
    names = [n for n, _ in feature_steps(model, split, stream_stages)]
    steps = [n for n, _ in split.streamed(stream_stages)]
    wanted = _wanted_steps(model, names, take, split.family)
    return tuple(sorted({_inside_streamed(name, steps) for name in wanted.values()}, key=steps.index))


def features_streamer(model: nn.Module, take_indices: Sequence[int]) -> tuple[StreamingCNN, dict[int, str]]:
    """The engine that stitches the maps of the features ``take_indices`` (and the last streamed step,
    whose map the tail reads); cached per set of cuts. Returns it and feature index -> step name.

    Raises:
        StreamingError: a requested feature lies inside a streamed block (not at a step's output), so no
            piece can end there; the message names it and the fix (fewer ``stream_stages``).
    """
    steps = feature_steps(model)
    names = [n for n, _ in steps]
    wanted = _wanted_steps(model, names, take_indices)
    # A features_only extractor's own cuts stay (its tile_size was checked against those pieces; a
    # call asking for fewer features would otherwise get a longer first piece than the tile allows).
    main_cuts = {n if n in names else [m for m in names if m.startswith(n + ".")][-1]
                 for n in model._streamer.outputs}
    cuts = tuple(sorted(set(wanted.values()) | main_cuts, key=names.index))
    key = (cuts, tuple(id(m) for _, m in steps))
    cache = _streamer_cache(model)
    streamer = cache.get(key)
    if streamer is None:
        main: StreamingCNN = model._streamer
        streamer = StreamingCNN(steps, main.tile_size, preprocess=main.preprocess, in_channels=main.in_channels,
                                progress=main.progress, keep_last_tile=main.keep_last_tile, outputs=cuts,
                                memory_budget=main.memory_budget)
        if len(cache) > 16:
            cache.clear()
        cache[key] = streamer
    streamer.streaming = model._streamer.streaming
    return streamer, wanted


class _Maps:
    """The stitched maps of one call, computed piece by piece as the base code asks for them."""

    def __init__(self, pieces):
        self._pieces = pieces
        self._done: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        while name not in self._done:
            piece_end, out = next(self._pieces)
            self._done[piece_end] = out
        return self._done[name]


class _Replay(nn.Module):
    """Stands in for a streamed step in the base model's ``forward_intermediates``: returns the step's
    stitched map (a cut) or, for a step inside a piece, a placeholder on the meta device whose only
    use is to be ignored by the next replay (anything else is detected and refused)."""

    def __init__(self, name: str, maps: _Maps, cut: bool):
        super().__init__()
        self.step, self.cut = name, cut
        object.__setattr__(self, "maps", maps)

    def forward(self, x: Any) -> Tensor:
        if self.cut:
            return self.maps[self.step]
        return torch.empty(0, device="meta")

    def forward_with_tap(self, x: Any) -> tuple[Tensor, Tensor]:
        """XceptionAligned's strided blocks: a tap inside a streamed block is refused before anything runs
        (features_streamer), so the tap is a placeholder that the base code only reads when not requested."""
        return self.forward(x), torch.empty(0, device="meta")


def _replayed(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``model`` whose modules at the given paths are replaced; every container on
    those paths is copied too, so ``model`` itself is never modified (parameters are shared)."""
    copies: dict[int, nn.Module] = {}

    def shallow(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            c = copy.copy(module)
            c.__dict__["_modules"] = dict(module._modules)
            copies[id(module)] = c
        return copies[id(module)]

    root = shallow(model)
    for path, new in replacements.items():
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            child = shallow(parent._modules[part])
            parent._modules[part] = child
            parent = child
        parent._modules[parts[-1]] = new
    return root


def _meta_tensors(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return obj.is_meta
    if isinstance(obj, (list, tuple)):
        return any(_meta_tensors(o) for o in obj)
    return False


def forward_intermediates(model: nn.Module, x: Tensor, indices: int | Sequence[int] | None = None,
                          norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                          intermediates_only: bool = False, **kwargs: Any):
    """The base model's ``forward_intermediates`` with the streamed steps' maps stitched by the engine.

    Args/returns as timm's: ``x`` (N, C, H, W) image (uint8 with ``normalize_input``); ``indices`` None
    (all), an int (the last n) or feature indices (``feature_info`` order); returns the list of
    (N, C_k, H/r_k, W/r_k) maps, or ``(final features, list)``.

    Raises:
        StreamingError: a requested feature is inside a streamed block (see :func:`features_streamer`),
            or an option that indexes other points than ``feature_info`` (EfficientNet's
            ``extra_blocks=True``) while streaming.
    """
    base_method = _base_method(model, "forward_intermediates")
    if kwargs.get("extra_blocks"):
        raise StreamingError("extra_blocks=True takes every block's output, which the streamed pieces do not "
                             "stitch; use the default feature indices (feature_info) or model.streaming = False")
    take_indices, _ = feature_take_indices(len(model.feature_info), indices)
    streamer, wanted = features_streamer(model, take_indices)
    maps = _Maps(streamer.forward_pieces(x))
    cuts = set(wanted.values())
    last = streamer._children[-1][0]
    replacements = {name: _Replay(name, maps, name in cuts or name == last) for name, _ in streamer._children}
    replay = _replayed(model, replacements)
    out = base_method(replay, x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                      intermediates_only=intermediates_only, **kwargs)
    if _meta_tensors(out):  # the base read a step that no piece ends at: never return such a value
        raise StreamingError(
            f"{type(model).__name__}.forward_intermediates read a streamed step that is not stitched; this "
            "family's feature points are not supported streamed: use model.streaming = False")
    return out


def _base_method(model: nn.Module, name: str):
    """The base timm class's method (the class after the streaming mixin in the MRO)."""
    mro = type(model).__mro__
    for cls in mro[1:]:
        if cls.__name__ != "StreamingModelMixin" and name in cls.__dict__:
            return cls.__dict__[name]
    raise AttributeError(f"{type(model).__name__} has no base {name}")


def restream(model: nn.Module) -> None:
    """Rebuild the streamed part after the base model's ``prune_intermediate_layers`` replaced or
    removed steps: each step keeps its place if its path still exists (now maybe ``nn.Identity``)."""
    old: TrunkSplit = model._split

    def alive(steps):
        kept = []
        for name, _ in steps:
            try:
                kept.append((name, model.get_submodule(name)))
            except AttributeError:
                pass
        return kept

    split = TrunkSplit(old.family, alive(old.stem), [alive(s) for s in old.stages], alive(old.tail))
    main: StreamingCNN = model._streamer
    streamed = split.streamed(model.stream_stages)
    names = [n for n, _ in streamed]
    from ._stream_model import SubmoduleOf  # (that module delegates to this one)

    streamer = StreamingCNN(streamed, main.tile_size, preprocess=main.preprocess, in_channels=main.in_channels,
                            progress=main.progress, keep_last_tile=main.keep_last_tile, memory_budget=main.memory_budget,
                            outputs=[n for n in main.outputs if n in names], resolve=SubmoduleOf(model))
    streamer.streaming = main.streaming
    object.__setattr__(model, "_split", split)
    object.__setattr__(model, "_streamer", streamer)
    _streamer_cache(model).clear()


def prune_intermediate_layers(model: nn.Module, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                              prune_head: bool = True, **kwargs: Any) -> list[int]:
    """The base model's ``prune_intermediate_layers`` (returns the kept feature indices), then the
    streamed part is rebuilt from the steps that remain."""
    take = _base_method(model, "prune_intermediate_layers")(model, indices, prune_norm=prune_norm,
                                                            prune_head=prune_head, **kwargs)
    restream(model)
    return take


class StreamFeatureNet(FeatureGetterNet):
    """``features_only=True`` for a ``stream_<arch>``: timm's ``FeatureGetterNet`` (``feature_cls=
    'getter'``) around the streaming model, whose ``forward_intermediates`` stitches the streamed
    stages' maps (see the module docstring for the design and its cost).

    ``forward(x)`` -> list of (N, C_k, H/r_k, W/r_k) maps for ``out_indices`` (``feature_info``: timm's
    channels, reductions and module names). Parameters live under ``model.`` (timm's getter layout).
    ``streaming = False`` runs the same modules un-tiled; ``stream_plan((H, W))`` shows the pieces and
    what each stitched map costs.
    """

    @property
    def streaming(self) -> bool:
        return self.model.streaming

    @streaming.setter
    def streaming(self, value: bool) -> None:
        self.model.streaming = value

    @property
    def tile_size(self) -> tuple[int, int]:
        return self.model.tile_size

    def stream_plan(self, input_size: Sequence[int], lazy: bool = False, *, batch: int = 1,
                    dtype: torch.dtype | None = None):
        """Tiles per piece and each stitched map's size (C x H x W, MiB per image) for ``batch`` images of
        ``input_size`` (H, W), with the predicted peak memory (bytes) and time relative to un-tiled (see
        :meth:`StreamingModelMixin.stream_plan`). Pieces end at every requested feature of the streamed part
        and where ``stitch="auto"`` cuts; every map listed is kept from forward to backward, plus its
        gradient. Raises ``MemoryBudgetError`` when the model's ``memory_budget`` is too small."""
        take, _ = feature_take_indices(len(self.model.feature_info), list(self.out_indices))
        streamer, _ = features_streamer(self.model, take)
        return streamer.plan(input_size, dtype, lazy=lazy, batch=batch)

    @property
    def streamer(self) -> StreamingCNN:
        """The engine stitching this extractor's features (``.plan(size)``, ``.geometry``)."""
        take, _ = feature_take_indices(len(self.model.feature_info), list(self.out_indices))
        return features_streamer(self.model, take)[0]


# timm's default out_indices for features_only is every feature_info entry, except where a family's
# model file sets its own (dla.py: feature_cfg=dict(out_indices=(1, 2, 3, 4, 5)), no stride-1 level0).
_DEFAULT_OUT_INDICES = {"DLA": (1, 2, 3, 4, 5)}


def default_out_indices(model: nn.Module, family: str) -> tuple[int, ...]:
    return _DEFAULT_OUT_INDICES.get(family, tuple(range(len(model.feature_info))))


def make_feature_net(model: nn.Module, out_indices: Sequence[int] | int | None = None, output_fmt: str = "NCHW",
                     norm: bool = False) -> StreamFeatureNet:
    """Wrap a streaming model as timm's ``features_only`` would (getter wrapper, pruned after the
    deepest requested feature, ``pretrained_cfg`` without the classifier fields).

    Raises:
        StreamingError: a requested feature lies inside a streamed block (see :func:`features_streamer`).
    """
    if out_indices is None:
        out_indices = default_out_indices(model, model._split.family)
    # refuse unsupported indices before pruning (the error then names the unpruned block)
    take, _ = feature_take_indices(len(model.feature_info), out_indices)
    features_streamer(model, take)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    traits = {k: getattr(model, k) for k in ("in_chans", "_traits") if hasattr(model, k)}
    net = StreamFeatureNet(model, out_indices=out_indices, output_fmt=output_fmt, norm=norm)
    for key in ("num_classes", "classifier", "global_pool"):  # as timm's pretrained_cfg_for_features
        cfg.pop(key, None)
    net.pretrained_cfg = net.default_cfg = cfg
    for key, value in traits.items():
        setattr(net, key, value)
    return net
