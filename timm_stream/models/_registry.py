"""Register ``stream_<arch>`` in timm's registry for every architecture proven local.

``architectures.json`` lists, for each base architecture, how many of its stages were proven local by
``scripts/check_architectures.py`` (which traces and checks float64 exactness of every entry). Only
those are registered. Their pretrained cfgs mirror the base's tags with the base's *explicit*
``hf_hub_id`` (``timm/resnet50.a1_in1k``): the same Hub cache entry serves both, and timm never
auto-completes an id to a ``timm/stream_...`` repository that does not exist.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Callable

import timm
from timm.models import generate_default_cfgs, register_model

from ._builder import create_stream_model, stream_name
from ._source import check_build_arguments, warn_if_untiled

__all__ = ["architectures", "register_all"]

# timm's register_model looks for the pretrained cfgs of an entrypoint in its module's `default_cfgs`.
default_cfgs: dict = {}


def architectures() -> dict[str, int]:
    """Base architecture -> number of stages proven local (the default ``stream_stages``)."""
    text = resources.files(__package__).joinpath("architectures.json").read_text()
    return {name: entry["local_stages"] for name, entry in json.loads(text)["architectures"].items()}


def _base_cfgs(base: str) -> dict:
    try:
        from timm.models import get_arch_pretrained_cfgs
        return get_arch_pretrained_cfgs(base)
    except ImportError:  # older timm
        from timm.models import _registry as registry
        return {name: registry.get_pretrained_cfg(name) for name in registry._model_with_tags.get(base, [])}


def _mirrored_cfgs(base: str) -> dict:
    cfgs = {}
    for name, cfg in _base_cfgs(base).items():
        entry = cfg.to_dict()
        entry.pop("architecture", None)
        entry.pop("tag", None)
        cfgs[stream_name(name)] = entry  # 'resnet50.a1_in1k' -> 'stream_resnet50.a1_in1k'
    return cfgs


def _entrypoint(base: str, local_stages: int) -> Callable:
    def entrypoint(pretrained: bool = False, **kwargs):
        # timm's "local-dir:"/"hf-hub:" loads arrive here with the parsed config: validate it on this path too
        check_build_arguments(stream_name(base), pretrained, kwargs)
        model = create_stream_model(base, pretrained, local_stages=local_stages, **kwargs)
        warn_if_untiled(model, model.pretrained_cfg)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = stream_name(base)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"Streaming {base}: stem and the first stages (default {local_stages}) run tile by "
                          f"tile. Accepts tile_size, stream_stages and every argument of {base}.")
    return entrypoint


def register_all() -> list[str]:
    table = {base: stages for base, stages in architectures().items() if timm.is_model(base)}
    cfgs = {}
    for base in table:
        cfgs.update(_mirrored_cfgs(base))
    default_cfgs.update(generate_default_cfgs(cfgs))
    registered = []
    for base, stages in table.items():
        register_model(_entrypoint(base, stages))
        registered.append(stream_name(base))
    return registered
