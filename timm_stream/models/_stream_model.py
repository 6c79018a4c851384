"""The streaming variant of a timm model: the same class, the same module tree, a streamed prefix.

:func:`make_streaming` turns a built timm model into its streaming variant in place: its class becomes
a subclass of its own class with :class:`StreamingModelMixin` in front, so the state dict, the module
tree and every method but ``forward_features`` (and the mode/checkpointing switches) are the base
model's. The :class:`~timm_stream.engine.StreamingCNN` that runs the streamed prefix only *refers* to
the model's modules; it is kept out of the module tree so that no parameter appears twice.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..engine import StreamingCNN, freeze_norm_layers
from ._families import TrunkSplit
from . import _features

__all__ = ["StreamingModelMixin", "InputNormalizer", "make_streaming"]


class InputNormalizer:
    """Per-tile input transform for uint8 (0..255) images: ``(x / 255 - mean) / std`` in the model's
    floating dtype, so that a huge image is never converted to float as a whole."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], model: nn.Module):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._model = model

    def __call__(self, x: Tensor) -> Tensor:
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
    def tile_size(self) -> tuple[int, int]:
        return self._streamer.tile_size

    @property
    def streamer(self) -> StreamingCNN:
        """The engine running the streamed part (``.plan(size)``, ``.geometry``)."""
        return self._streamer

    def stream_plan(self, input_size: Sequence[int]):
        """What streaming an image of ``input_size`` (H, W) does: tiles, overlap, stride, halo."""
        return self._streamer.plan(input_size)

    # ---------------------------------------------------------------- timm model API
    def forward_features(self, x: Tensor) -> Tensor:
        x = self._streamer(x)
        tail = [module for _, module in self._split.unstreamed(self.stream_stages)]
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
        for _, module in self._split.streamed(self.stream_stages):
            for m in module.modules():
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = False
        tail = [module for _, module in self._split.unstreamed(self.stream_stages)]
        own = any(hasattr(m, "grad_checkpointing") for module in tail for m in module.modules())
        self._tail_checkpointing = enable and not own  # tail stages that checkpoint themselves need no help

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self.train_tail_norms:
            for _, module in self._split.streamed(self.stream_stages):
                freeze_norm_layers(module)
        else:  # the un-tiled rest, head included: batches of huge images hold one or two images
            freeze_norm_layers(self)  # type: ignore[arg-type]
        return self


_CLASSES: dict[type, type] = {}


def _streaming_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Streaming{base.__name__}", (StreamingModelMixin, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls


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


def make_streaming(model: nn.Module, split: TrunkSplit, stream_stages: int, tile_size, *,
                   normalize_input: bool = False, train_tail_norms: bool = False,
                   progress: bool = False, outputs: Sequence[str] = ()) -> nn.Module:
    streamed = split.streamed(stream_stages)
    _disable_stochastic([m for _, m in streamed])
    preprocess = None
    if normalize_input:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        preprocess = InputNormalizer(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
                                     model)
    # outputs: steps whose stitched maps are features (features_only): each ends a piece
    streamer = StreamingCNN(streamed, tile_size, preprocess=preprocess, progress=progress, outputs=outputs)
    model.__class__ = _streaming_class(type(model))
    # Held outside the module tree: every parameter keeps its one, base-model name.
    object.__setattr__(model, "_streamer", streamer)
    object.__setattr__(model, "_split", split)
    model.stream_stages = stream_stages
    model.train_tail_norms = train_tail_norms
    model.train(model.training)
    return model
