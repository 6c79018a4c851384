"""Global pooling of a stream model: masked, streamed when the whole trunk is, attention-MIL included.

:class:`StreamedPool` (a ``SelectAdaptivePool2d``) takes the place of the head's ``global_pool``: the module
tree and state dict keys of avg/max/avgmax/catavgmax models stay the base's.
It holds an engine :class:`~timm_stream.engine.Reducer`; the model's ``forward(x, mask)`` hands the
reducer to the streamer (pooled while streaming: the final map is never stitched) or applies it to the
stitched map (when stages are left un-streamed), then runs the rest of timm's own head on the pooled
features. ``global_pool="attention"`` (gated attention MIL, Ilse et al. 2018) adds trainable
parameters under ``<global_pool path>.reducer``.
"""
from __future__ import annotations

from timm.layers import SelectAdaptivePool2d
from torch import Tensor, nn

from ..engine import REDUCER_NAMES, Reducer, make_reducer

__all__ = ["StreamedPool", "find_global_pool", "install_pooling", "POOL_FIRST_FAMILIES"]

# Families whose forward_head applies the global pool first (VGG runs its un-local ConvMlp before it).
POOL_FIRST_FAMILIES = ("ResNet", "ResNetV2", "ConvNeXt", "RegNet", "DenseNet", "DLA", "CspNet",
                       "XceptionAligned", "Xception", "EfficientNet", "MobileNetV3")


class StreamedPool(SelectAdaptivePool2d):
    """The head's global pool, knowing its engine reducer. ``forward`` takes a feature map
    ``(N, C, H, W)`` (pooled un-tiled over every position, by timm's own pooling for timm's pool types:
    ``forward_head(forward_features(x))`` works as in timm) or features pooled already ``(N, F)`` (what
    the model's ``forward`` passes), and returns ``(N, F)``, or ``(N, F, 1, 1)`` where timm's pool does
    not flatten (ConvNeXt, MobileNetV3, DLA heads).

    A subclass of timm's ``SelectAdaptivePool2d`` with the same children: the module tree and state dict
    of avg/max/avgmax/catavgmax models stay the base model's (their reducers have no parameters and are
    held outside the tree); the attention reducer is the child ``reducer``."""

    def __init__(self, reducer: Reducer, pool_type: str, flatten: bool):
        super().__init__(pool_type="avg" if pool_type == "attention" else pool_type, flatten=flatten)
        self.pool_type = pool_type
        if any(True for _ in reducer.parameters()):
            self.reducer = reducer
        else:
            object.__setattr__(self, "reducer", reducer)

    @property
    def flattens(self) -> bool:
        return isinstance(self.flatten, nn.Flatten)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return x if self.flattens else x[:, :, None, None]
        if self.pool_type == "attention":
            pooled = self.reducer(x)
            return pooled if self.flattens else pooled[:, :, None, None]
        return super().forward(x)


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
    flatten = isinstance(getattr(current, "flatten", None), nn.Flatten)
    pool = StreamedPool(reducer, pool_type, flatten)
    pool.train(current.training)
    setattr(parent, name, pool)
    return pool


def load_pretrained_with_attention(model: nn.Module, num_classes: int, in_chans: int) -> None:
    """timm's pretrained loading for a model whose pool becomes attention: the attention parameters are
    installed first, so that a checkpoint saved with them (a shared fine-tuned model) loads them, and
    a checkpoint without them (timm's ImageNet weights) leaves them at their initialization. Any other
    missing or unexpected key fails as in a strict load."""
    from timm.models import load_pretrained

    pool = install_pooling(model, "attention", model.num_features)
    if pool is None:
        raise ValueError(f"{type(model).__name__} cannot take global_pool='attention' (its head does not pool "
                         "first): use another global_pool")
    prefix = next(name for name, m in model.named_modules() if m is pool)
    attention = {f"{prefix}.reducer.{key}" for key in pool.reducer.state_dict()}
    original = model.load_state_dict

    def load_state_dict(state_dict, strict: bool = True, **kwargs):
        result = original(state_dict, strict=False, **kwargs)
        missing = set(result.missing_keys) - attention
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"loading the pretrained weights of {type(model).__name__}: missing keys "
                               f"{sorted(missing)}, unexpected keys {sorted(result.unexpected_keys)}")
        return result

    model.load_state_dict = load_state_dict  # only for timm's loader below
    try:
        load_pretrained(model, num_classes=num_classes, in_chans=in_chans, strict=True)
    finally:
        del model.load_state_dict
