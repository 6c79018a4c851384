"""The streaming variant of a timm model: the same class, the same module tree, a streamed prefix.

:func:`make_streaming` turns a built timm model into its streaming variant in place: its class becomes
a subclass of its own class with :class:`StreamingModelMixin` in front, so the state dict, the module
tree and every method but ``forward_features`` (and the mode/checkpointing switches) are the base
model's. The :class:`~timm_stream.engine.StreamingCNN` that runs the streamed prefix is kept out of the
module tree so that no parameter appears twice; it finds the model's modules *by name* at every call, so
replacing one (``SyncBatchNorm.convert_sync_batchnorm``, surgery, fusing) takes effect.

The runtime class ``Streaming<Base>`` is made on the fly, so instances pickle through
:func:`rebuild_streaming_model` (a module-level function, addressable by name) and the base class.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.data import resolve_data_config
from torch import Tensor, nn

from ..engine import NonLocalModuleError, StreamingCNN, final_mask, freeze_norm_layers
from ._families import TrunkSplit
from . import _features
from ._pooling import StreamedPool, install_pooling

__all__ = ["StreamingModelMixin", "InputNormalizer", "SubmoduleOf", "make_streaming", "rebuild_streaming_model"]


class SubmoduleOf:
    """``resolve`` for :class:`~timm_stream.engine.StreamingCNN`: the submodule of ``root`` at a dotted
    path, looked up at each call (a plain class, so that it pickles with the model)."""

    def __init__(self, root: nn.Module):
        self.root = root

    def __call__(self, name: str) -> nn.Module:
        return self.root.get_submodule(name)


class InputNormalizer:
    """Per-tile input transform for uint8 (0..255) images: ``(x / 255 - mean) / std`` in the model's
    floating dtype, so that a huge image is never converted to float as a whole."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], model: nn.Module):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._model = model

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 and not x.is_meta:  # meta: the engine's shape trace, in the model's dtype
            raise TypeError(f"normalize_input=True expects uint8 images (0..255), got {x.dtype}: pass the uint8 "
                            "pixels, or create the model without normalize_input and normalize the image yourself")
        if x.shape[1] != len(self.mean):
            raise ValueError(f"normalize_input has {len(self.mean)} channel means and stds but the image has "
                             f"{x.shape[1]} channels")
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        dtype = next(self._model.parameters()).dtype
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(shape)
        return (x.to(dtype) / 255 - mean) / std

    def __repr__(self) -> str:
        return f"InputNormalizer(mean={self.mean}, std={self.std})"


class StreamingModelMixin:
    """Overrides for a timm model whose stem and first ``stream_stages`` stages run streamed."""

    _streamer: StreamingCNN
    _split: TrunkSplit
    stream_stages: int
    train_tail_norms: bool

    # ---------------------------------------------------------------- streaming switches
    @property
    def streaming(self) -> bool:
        """False runs the very same modules un-tiled (for comparison or small images)."""
        return self._streamer.streaming

    @streaming.setter
    def streaming(self, value: bool) -> None:
        self._streamer.streaming = bool(value)

    @property
    def tile_size(self) -> tuple[int, int] | None:
        """The largest tile (h, w) in input pixels; None when ``memory_budget`` alone chooses it."""
        return self._streamer.tile_size

    @property
    def memory_budget(self) -> int | None:
        """Bytes one forward + backward of the streamed part may allocate (None: no budget, tiles of
        ``tile_size``)."""
        return self._streamer.memory_budget

    @property
    def streamer(self) -> StreamingCNN:
        """The engine running the streamed part (``.plan(size)``, ``.geometry``)."""
        return self._streamer

    def stream_plan(self, input_size: Sequence[int], lazy: bool = False, *, batch: int = 1,
                    dtype: torch.dtype | None = None):
        """What streaming ``batch`` images of ``input_size`` (H, W) pixels does in ``forward``: tiles,
        overlap, stride, halo, and (see :meth:`timm_stream.engine.StreamingCNN.plan`) the predicted peak
        memory in bytes (``peak_memory``) and time relative to un-tiled (``relative_time``). Runs only a
        shape ("meta") trace: nothing of the image's size is allocated.

        ``lazy``: for a lazy image input (with pooling streamed it may then run as one piece);
        ``dtype``: the activations' dtype (default: the parameters'; ``torch.bfloat16`` for bf16
        autocast). Raises :class:`~timm_stream.engine.MemoryBudgetError` (naming the smallest workable
        budget) when the model's ``memory_budget`` is too small for this input."""
        return self._streamer.plan(input_size, dtype, lazy=lazy, pooled=self.pooling_streamed, batch=batch)

    # ---------------------------------------------------------------- pooling and masks
    def forward(self, x, mask: Tensor | None = None) -> Tensor:
        """Logits ``(N, num_classes)`` for ``x`` (a tensor or a lazy image ``(N, C, H, W)``).

        ``mask``: bool ``(N, 1, h, w)`` at any resolution covering the image: final-map positions
        outside it are left out of the global pooling (rule: ``timm_stream.engine.final_mask``). With
        every stage streamed the pooling runs while streaming (the final map is never stitched) and
        tiles without a masked-in output are neither read nor computed. Raises ``ValueError`` for a
        mask on a model whose pooling cannot take one."""
        self._refuse_fx(x)
        pool: StreamedPool | None = getattr(self, "_stream_pool", None)
        if pool is None:
            if mask is not None:
                raise ValueError(f"{type(self).__name__} has no maskable global pooling (its global_pool is not one "
                                 "of avg/max/avgmax/catavgmax/attention, or its head pools after other layers): "
                                 "drop mask= or create the model with global_pool='avg'")
            return super().forward(x)  # type: ignore[misc]
        if self._pool_streamed:
            pooled = self._streamer(x, mask=mask, pool=pool.reducer)
        else:
            features = self.forward_features(x)
            pooled = pool.reducer(features, final_mask(mask, features.shape[0], features.shape[-2:],
                                                       features.device))
        return self.forward_head(pooled)  # type: ignore[attr-defined]

    @property
    def pooling_streamed(self) -> bool:
        """True when the global pooling is computed while streaming (no stitched final map)."""
        return bool(getattr(self, "_pool_streamed", False))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, *args, **kwargs) -> None:
        pool: StreamedPool | None = getattr(self, "_stream_pool", None)
        if global_pool is None and pool is not None:
            global_pool = pool.pool_type
        kept = pool.reducer if pool is not None and pool.pool_type == global_pool == "attention" else None
        # timm builds a fresh SelectAdaptivePool2d ('attention' is ours: built as 'avg', then replaced)
        super().reset_classifier(num_classes, "avg" if global_pool == "attention" else global_pool,  # type: ignore[misc]
                                 *args, **kwargs)
        found = install_pooling(self, global_pool, self.num_features)  # type: ignore[arg-type,attr-defined]
        if found is not None and kept is not None:
            found.reducer = kept  # the trained attention parameters stay
        object.__setattr__(self, "_stream_pool", found)
        object.__setattr__(self, "_pool_streamed", found is not None and self._tail_streamed)

    def _now(self, steps: Sequence[tuple[str, nn.Module]]) -> list[nn.Module]:
        """The modules at these steps' paths in the tree now (they may have been replaced)."""
        return [self.get_submodule(name) for name, _ in steps]  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- pickling, scripting, fx
    def __reduce_ex__(self, protocol):
        # pickle would look up the runtime class by name and fail; rebuild it from its base instead.
        return (rebuild_streaming_model, (self._stream_base,), self.__getstate__())

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be scripted with torch.jit.script: its streamed part runs tiles "
            "in a Python loop whose count depends on the input size, inside a custom autograd Function. "
            "Script the base timm model instead (timm.create_model(<base name>), then "
            "load_state_dict(model.state_dict()): the keys are the same)")

    # ---------------------------------------------------------------- timm model API
    def _refuse_fx(self, x) -> None:
        if isinstance(x, torch.fx.Proxy):
            raise RuntimeError(
                f"{type(self).__name__} cannot be traced with torch.fx: its streamed part runs tiles in a "
                "Python loop whose count depends on the input size. Trace the base timm model instead "
                "(timm.create_model(<base name>), then load_state_dict(model.state_dict()))")

    def forward_features(self, x: Tensor) -> Tensor:
        self._refuse_fx(x)
        x = self._streamer(x)
        tail = self._now(self._split.unstreamed(self.stream_stages))
        if getattr(self, "_tail_checkpointing", False) and torch.is_grad_enabled():
            from timm.models import checkpoint_seq
            return checkpoint_seq(tail, x)
        for module in tail:
            x = module(x)
        return x

    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, **kwargs):
        """The base model's ``forward_intermediates``; the streamed stages' maps are stitched by the engine,
        cut after each requested feature (see :mod:`timm_stream.models._features` for the cost)."""
        return _features.forward_intermediates(self, x, indices, norm=norm, stop_early=stop_early,
                                               output_fmt=output_fmt, intermediates_only=intermediates_only,
                                               **kwargs)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True, **kwargs):
        """The base model's ``prune_intermediate_layers``; the streamed part is rebuilt from what remains."""
        return _features.prune_intermediate_layers(self, indices, prune_norm=prune_norm, prune_head=prune_head,
                                                   **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the un-tiled tail (the streamed part never keeps activations)."""
        super().set_grad_checkpointing(enable)  # type: ignore[misc]
        for module in self._now(self._split.streamed(self.stream_stages)):
            for m in module.modules():
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = False
        tail = self._now(self._split.unstreamed(self.stream_stages))
        own = any(hasattr(m, "grad_checkpointing") for module in tail for m in module.modules())
        self._tail_checkpointing = enable and not own  # tail stages that checkpoint themselves need no help

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self.train_tail_norms:
            for module in self._now(self._split.streamed(self.stream_stages)):
                freeze_norm_layers(module)
        else:  # the un-tiled rest, head included: batches of huge images hold one or two images
            freeze_norm_layers(self)  # type: ignore[arg-type]
        return self


_CLASSES: dict[type, type] = {}


def _streaming_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Streaming{base.__name__}", (StreamingModelMixin, base),
                   {"__module__": __name__, "_stream_base": base})
        _CLASSES[base] = cls
    return cls


def rebuild_streaming_model(base: type) -> nn.Module:
    """An empty instance of ``Streaming<base>`` for pickle to fill with the pickled state (the
    inverse of ``StreamingModelMixin.__reduce_ex__``)."""
    cls = _streaming_class(base)
    return cls.__new__(cls)


def _disable_stochastic(modules: Sequence[nn.Module]) -> list[str]:
    """Stochastic depth and dropout would draw a different mask per tile: turn them off in the
    streamed part. Returns what was disabled."""
    disabled = []
    for root in modules:
        for name, m in root.named_modules():
            if isinstance(getattr(m, "drop_prob", None), float) and m.drop_prob > 0:
                m.drop_prob = 0.0
                disabled.append(name)
            elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                m.p = 0.0
                disabled.append(name)
    return disabled


def _input_normalizer(model: nn.Module, streamed: Sequence[tuple[str, nn.Module]]) -> InputNormalizer:
    """The per-tile normalization with the mean/std that timm's own data config resolves for this model
    (``timm.data.resolve_data_config``: the pretrained cfg's, ImageNet's by default), one per input
    channel. A statistic given for one channel is repeated (as timm does); any other count that differs
    from the model's input channels is refused here, with the way to pass the right ones."""
    in_chans = next(m.in_channels for _, part in streamed for m in part.modules() if isinstance(m, nn.Conv2d))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    config = resolve_data_config({}, pretrained_cfg=cfg, model=model)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    mean, std = (mean * in_chans if len(mean) == 1 else mean), (std * in_chans if len(std) == 1 else std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"normalize_input=True needs one mean and one std per input channel, but the pretrained cfg "
            f"gives {len(mean)} (mean={mean}, std={std}) for in_chans={in_chans}: pass yours (in 0..1 "
            f"units, as timm's) with pretrained_cfg_overlay=dict(mean=(...), std=(...)), {in_chans} values "
            f"each or one value each for every channel")
    return InputNormalizer(mean, std, model)


def make_streaming(model: nn.Module, split: TrunkSplit, stream_stages: int, tile_size, *,
                   normalize_input: bool = False, train_tail_norms: bool = False,
                   progress: bool = False, outputs: Sequence[str] = (), pool_type: str | None = None,
                   memory_budget: int | float | str | None = None) -> nn.Module:
    pool = install_pooling(model, pool_type, model.num_features)
    preprocess = None
    if normalize_input:
        preprocess = _input_normalizer(model, split.streamed(stream_stages))
    # resolve: the streamed steps are looked up in the model's tree at each call (module replacement);
    # outputs: steps whose stitched maps are features (features_only): each ends a piece
    # memory_budget: the engine's planner chooses tiles, pieces and kept tile graphs to fit it
    options = dict(preprocess=preprocess, progress=progress, resolve=SubmoduleOf(model), outputs=outputs,
                   memory_budget=memory_budget)
    streamer, tail_streamed = None, stream_stages == len(split.stages) and not split.tail
    if stream_stages == len(split.stages) and split.tail and not outputs:
        # Everything streamed: the tail (ConvNeXt's norm_pre, EfficientNet's conv_head/bn2, ...) joins the
        # streamed part when it is local, so that pooling can run while streaming; else it stays un-tiled.
        joined = TrunkSplit(split.family, split.stem, split.stages[:-1] + [split.stages[-1] + split.tail], [])
        _disable_stochastic([m for _, m in joined.streamed(stream_stages)])
        try:
            streamer = StreamingCNN(joined.streamed(stream_stages), tile_size, **options)
        except NonLocalModuleError:
            pass
        else:
            split, tail_streamed = joined, True
    if streamer is None:
        streamed = split.streamed(stream_stages)
        _disable_stochastic([m for _, m in streamed])
        streamer = StreamingCNN(streamed, tile_size, **options)
    model.__class__ = _streaming_class(type(model))
    # Held outside the module tree: every parameter keeps its one, base-model name.
    object.__setattr__(model, "_streamer", streamer)
    object.__setattr__(model, "_split", split)
    object.__setattr__(model, "_stream_pool", pool)
    object.__setattr__(model, "_tail_streamed", tail_streamed)
    object.__setattr__(model, "_pool_streamed", pool is not None and tail_streamed)
    model.stream_stages = stream_stages
    model.train_tail_norms = train_tail_norms
    model.train(model.training)
    return model
