"""Global pooling of a stream model: masked, streamed when the whole trunk is, attention-MIL included.

:class:`StreamedPool` takes the place of the head's ``global_pool`` (timm's ``SelectAdaptivePool2d``,
which has no parameters, so the state dict keys of avg/max/avgmax/catavgmax models stay the base's).
It holds an engine :class:`~timm_stream.engine.Reducer`; the model's ``forward(x, mask)`` hands the
reducer to the streamer (pooled while streaming: the final map is never stitched) or applies it to the
stitched map (when stages are left un-streamed), then runs the rest of timm's own head on the pooled
features. ``global_pool="attention"`` (gated attention MIL, Ilse et al. 2018) adds trainable
parameters under ``<global_pool path>.reducer``.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..engine import REDUCER_NAMES, Reducer, make_reducer

__all__ = ["StreamedPool", "find_global_pool", "install_pooling", "POOL_FIRST_FAMILIES"]

# Families whose forward_head applies the global pool first (VGG runs its un-local ConvMlp before it).
POOL_FIRST_FAMILIES = ("ResNet", "ResNetV2", "ConvNeXt", "RegNet", "DenseNet", "DLA", "CspNet",
                       "XceptionAligned", "Xception", "EfficientNet", "MobileNetV3")


class StreamedPool(nn.Module):
    """The head's global pool, by an engine reducer. ``forward`` takes a feature map ``(N, C, H, W)``
    (pooled un-tiled, every position: ``forward_head(forward_features(x))`` still works) or features
    pooled already ``(N, F)`` (what the model's ``forward`` passes), and returns ``(N, F)``, or
    ``(N, F, 1, 1)`` where timm's pool did not flatten (ConvNeXt, MobileNetV3, DLA heads)."""

    def __init__(self, reducer: Reducer, pool_type: str, flatten: bool):
        super().__init__()
        self.reducer = reducer
        self.pool_type = pool_type
        self.flatten = bool(flatten)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x if x.dim() == 2 else self.reducer(x)
        return pooled if self.flatten else pooled[:, :, None, None]

    def feat_mult(self) -> int:  # timm's SelectAdaptivePool2d API (reset_classifier uses it)
        return 2 if self.pool_type == "catavgmax" else 1

    def is_identity(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}, flatten={self.flatten}"


def find_global_pool(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent module, attribute) of the head's global pool, or None if the family has none first."""
    from ._families import family_of

    if family_of(model) not in POOL_FIRST_FAMILIES:
        return None
    for parent in (model, getattr(model, "head", None)):
        if parent is not None and hasattr(parent, "global_pool") and isinstance(parent.global_pool, nn.Module):
            return parent, "global_pool"
    return None


def install_pooling(model: nn.Module, pool_type: str | None, channels: int) -> StreamedPool | None:
    """Replace the head's global pool by a :class:`StreamedPool` of ``pool_type`` (default: the pool's
    own type). Returns it, or None when the family or pool type cannot be masked/streamed (the model
    then keeps timm's pool, and ``forward(x, mask=...)`` refuses masks). An existing attention
    reducer of the same channels is kept (its trained parameters survive ``reset_classifier``)."""
    found = find_global_pool(model)
    if found is None:
        return None
    parent, name = found
    current = getattr(parent, name)
    pool_type = pool_type or getattr(current, "pool_type", "")
    if pool_type not in REDUCER_NAMES:
        return None
    if isinstance(current, StreamedPool) and current.pool_type == pool_type:
        reducer = current.reducer
    else:
        reducer = make_reducer(pool_type, channels)
        params = next(iter(model.parameters()), None)
        if params is not None:
            reducer.to(device=params.device, dtype=params.dtype)
    flatten = current.flatten if isinstance(current, StreamedPool) else isinstance(
        getattr(current, "flatten", None), nn.Flatten)
    pool = StreamedPool(reducer, pool_type, flatten)
    pool.train(current.training)
    setattr(parent, name, pool)
    return pool
