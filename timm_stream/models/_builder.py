"""Build ``stream_<arch>``: the base timm model, through its own entrypoint and pretrained cfg, made
streaming. Weights, ``in_chans``/``num_classes`` adaptation and Hub caching are timm's own."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from timm.models import is_model, model_entrypoint, resolve_pretrained_cfg
from torch import nn

from ..engine import TileTooSmallError
from ._families import STAGE_REDUCTIONS, split_trunk
from ._pooling import load_pretrained_with_attention
from ._stream_model import make_streaming

__all__ = ["STREAM_PREFIX", "DEFAULT_TILE_SIZE", "create_stream_model", "stream_name", "base_name"]

_logger = logging.getLogger(__name__)

STREAM_PREFIX = "stream_"
DEFAULT_TILE_SIZE = 2048


def stream_name(base: str) -> str:
    return STREAM_PREFIX + base


def base_name(stream: str) -> str:
    if not stream.startswith(STREAM_PREFIX):
        raise ValueError(f"'{stream}' is not a streaming architecture name (they start with '{STREAM_PREFIX}')")
    return stream[len(STREAM_PREFIX):]


def _check_stream_stages(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(STAGE_REDUCTIONS):
        raise ValueError(f"stream_stages must be an int from 0 to {len(STAGE_REDUCTIONS)}, got {value!r}")
    return value


def create_stream_model(base: str, pretrained: bool = False, *, local_stages: int,
                        tile_size: Any = None, stream_stages: int | None = None, normalize_input: bool = False,
                        train_tail_norms: bool = False, progress: bool = False, **kwargs: Any) -> nn.Module:
    """Create the streaming variant of timm architecture ``base``.

    Args:
        local_stages: stages of ``base`` proven local (registered with the architecture).
        tile_size: largest tile in input pixels, int or (h, w) (default 2048, or the architecture's
            minimum if larger).
        stream_stages: stem plus this many stages run streamed (default: ``local_stages``).
        normalize_input: accept uint8 images (0..255) and normalize each tile with the pretrained
            cfg's mean/std on the model's device.
        train_tail_norms: let the norm layers outside the streamed part (tail and head) train
            (default: frozen, since batches of huge images hold one or two images).
        progress: progress bar over tiles.
        global_pool: timm's pooling names, plus ``"attention"`` (gated attention MIL, Ilse et al. 2018,
            with its own parameters). Avg/max/avgmax/catavgmax/attention accept masks
            (``model(x, mask=m)``) and, when every stage is streamed, are computed while streaming.
        **kwargs: everything the base architecture accepts (num_classes, in_chans,
            drop_rate, drop_path_rate, pretrained_cfg, pretrained_cfg_overlay, cache_dir...).
    """
    if kwargs.pop("features_only", False):
        raise ValueError(
            f"features_only=True is not supported by {stream_name(base)}: timm would build a feature "
            "network from the base model's children and silently run it un-tiled. Use "
            "model.forward_features(x) for the streamed feature map.")
    stream_stages = local_stages if stream_stages is None else _check_stream_stages(stream_stages)
    pool_type = kwargs.get("global_pool")
    if pool_type == "attention":  # not a timm pool: build the base with 'avg', then replace it
        kwargs["global_pool"] = "avg"
    # The registered stream cfgs mirror the base's; an unregistered base (being checked) uses its own.
    registered = is_model(stream_name(base))
    cfg = resolve_pretrained_cfg(stream_name(base) if registered else base,
                                 pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                 pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None))
    cfg = dataclasses.replace(cfg, architecture=stream_name(base))
    # attention parameters must exist before weights that may hold them load (timm loads while building)
    late_load = pretrained and pool_type == "attention"
    model = model_entrypoint(base)(pretrained=pretrained and not late_load, pretrained_cfg=cfg.to_dict(), **kwargs)
    if late_load:
        load_pretrained_with_attention(model, model.num_classes, kwargs.get("in_chans", 3))
    split = split_trunk(model)
    options = dict(normalize_input=normalize_input, train_tail_norms=train_tail_norms, progress=progress,
                   pool_type=pool_type)
    if tile_size is not None:
        return make_streaming(model, split, stream_stages, tile_size, **options)
    try:
        return make_streaming(model, split, stream_stages, DEFAULT_TILE_SIZE, **options)
    except TileTooSmallError as exc:  # the default is too small for this receptive field: use the minimum
        _logger.info("%s: default tile_size raised to %s", stream_name(base), exc.min_tile_size)
        return make_streaming(model, split, stream_stages, exc.min_tile_size, **options)
