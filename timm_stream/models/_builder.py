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
from ._features import FeatureGetterNet, StreamFeatureNet, default_out_indices, make_feature_net, stream_cuts
from ._pooling import load_pretrained_with_attention
from ._stream_model import make_streaming

__all__ = ["STREAM_PREFIX", "DEFAULT_TILE_SIZE", "create_stream_model", "stream_name", "base_name",
           "check_stream_stages"]

_logger = logging.getLogger(__name__)

STREAM_PREFIX = "stream_"
DEFAULT_TILE_SIZE = 2048


def stream_name(base: str) -> str:
    return STREAM_PREFIX + base


def base_name(stream: str) -> str:
    if not stream.startswith(STREAM_PREFIX):
        raise ValueError(f"'{stream}' is not a streaming architecture name (they start with '{STREAM_PREFIX}')")
    return stream[len(STREAM_PREFIX):]


def check_stream_stages(value: Any) -> int:
    """``value`` if it is a stage count (an int from 0 to 4), else ``ValueError`` naming the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(STAGE_REDUCTIONS):
        raise ValueError(f"stream_stages must be an int from 0 to {len(STAGE_REDUCTIONS)}, got {value!r}")
    return value


def _pop_feature_args(base: str, kwargs: dict) -> dict | None:
    """timm's features_only arguments (also inside ``feature_cfg``), or None without features_only."""
    if not kwargs.pop("features_only", False):
        return None  # anything else goes to the base model, as in timm
    cfg = dict(kwargs.pop("feature_cfg", None) or {})
    for key in ("out_indices", "feature_cls", "output_fmt", "norm"):
        if key in kwargs:
            cfg[key] = kwargs.pop(key)
    cfg.pop("flatten_sequential", None)  # a layout option of timm's list/dict wrappers: no meaning here
    feature_cls = cfg.pop("feature_cls", None)
    if feature_cls not in (None, "getter", FeatureGetterNet, StreamFeatureNet):
        raise ValueError(
            f"{stream_name(base)}: feature_cls={feature_cls!r} is not supported: timm's list/dict/hook/fx "
            "feature wrappers run the base model's modules (un-tiled) themselves. Leave feature_cls unset "
            "(or 'getter'): the features then come from the streamed forward_intermediates.")
    unknown = set(cfg) - {"out_indices", "output_fmt", "norm"}
    if unknown:
        raise ValueError(f"{stream_name(base)}: unsupported feature options {sorted(unknown)}; supported: "
                         "out_indices, output_fmt, norm, feature_cls='getter'")
    return cfg


def create_stream_model(base: str, pretrained: bool = False, *, local_stages: int,
                        tile_size: Any = None, memory_budget: int | float | str | None = None,
                        stream_stages: int | None = None, normalize_input: bool = False,
                        train_tail_norms: bool = False, progress: bool = False, **kwargs: Any) -> nn.Module:
    """Create the streaming variant of timm architecture ``base``.

    Args:
        local_stages: stages of ``base`` proven local (registered with the architecture).
        tile_size: largest tile in input pixels, int or (h, w) (default 2048, or the architecture's
            minimum if larger; with ``memory_budget`` no default: the engine's planner chooses).
        memory_budget: bytes that one forward + backward of the streamed part may allocate (int or
            float bytes, or a string such as ``"20GiB"``, ``"512 MiB"``, ``"1.5e9"``; parsed by
            :func:`timm_stream.engine.parse_memory`). The engine chooses tiles, pieces and kept tile graphs
            to fit it (``tile_size``, if given, stays the largest tile); a budget below the smallest
            workable one raises :class:`~timm_stream.engine.MemoryBudgetError` when planning or running.
        stream_stages: stem plus this many stages run streamed (default: ``local_stages``).
        normalize_input: accept uint8 images (0..255) and normalize each tile with the mean/std that
            ``timm.data.resolve_data_config`` gives (the pretrained cfg's), on the model's device. One
            value per input channel (or one for all): for ``in_chans`` other than the cfg's, pass them
            with ``pretrained_cfg_overlay=dict(mean=..., std=...)``, else ``ValueError``. Images of any
            other dtype are refused (``TypeError``).
        train_tail_norms: let the norm layers outside the streamed part (tail and head) train
            (default: frozen, since batches of huge images hold one or two images).
        progress: progress bar over tiles.
        features_only, out_indices, output_fmt, norm, feature_cls, feature_cfg: timm's feature-extractor
            arguments. ``features_only=True`` returns a :class:`StreamFeatureNet` (timm's getter wrapper)
            whose maps at ``out_indices`` (default: timm's for the family) come from the streamed stages;
            ``feature_cls`` other than ``'getter'`` raises ValueError (timm's other wrappers would run
            the modules un-tiled).
        global_pool: timm's pooling names, plus ``"attention"`` (gated attention MIL, Ilse et al. 2018,
            with its own parameters). Avg/max/avgmax/catavgmax/attention accept masks
            (``model(x, mask=m)``) and, when every stage is streamed, are computed while streaming.
        **kwargs: everything the base architecture accepts (num_classes, in_chans,
            drop_rate, drop_path_rate, pretrained_cfg, pretrained_cfg_overlay, cache_dir...).
    """
    features = _pop_feature_args(base, kwargs)
    stream_stages = local_stages if stream_stages is None else check_stream_stages(stream_stages)
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
    try:
        model = model_entrypoint(base)(pretrained=pretrained and not late_load, pretrained_cfg=cfg.to_dict(),
                                       **kwargs)
    except (TypeError, AssertionError) as exc:
        # timm's bases refuse an unsupported output_stride with a bare `assert output_stride == 32` or
        # an unexpected-keyword TypeError: name the argument instead
        if kwargs.get("output_stride", 32) != 32 and (isinstance(exc, AssertionError) or "output_stride" in str(exc)):
            raise ValueError(f"{base} does not support output_stride={kwargs['output_stride']} (timm's {base} "
                             "only runs at output stride 32): drop output_stride") from exc
        raise
    if late_load:
        load_pretrained_with_attention(model, model.num_classes, kwargs.get("in_chans", 3))
    split = split_trunk(model)
    options = dict(normalize_input=normalize_input, train_tail_norms=train_tail_norms, progress=progress,
                   pool_type=pool_type, memory_budget=memory_budget)
    if features is not None:  # cut the streamer at the requested features; tile_size is checked on those pieces
        features.setdefault("out_indices", default_out_indices(model, split.family))
        options["outputs"] = stream_cuts(model, split, stream_stages, features["out_indices"])
    if tile_size is not None or memory_budget is not None:  # a budget lets the planner choose the tile
        model = make_streaming(model, split, stream_stages, tile_size, **options)
    else:
        try:
            model = make_streaming(model, split, stream_stages, DEFAULT_TILE_SIZE, **options)
        except TileTooSmallError as exc:  # the default is too small for this receptive field: use the minimum
            _logger.info("%s: default tile_size raised to %s", stream_name(base), exc.min_tile_size)
            model = make_streaming(model, split, stream_stages, exc.min_tile_size, **options)
    return model if features is None else make_feature_net(model, **features)
