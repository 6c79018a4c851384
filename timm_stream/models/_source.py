"""Checks for ``stream_<arch>`` models built from a saved config (``config.json``).

A shared model reaches the builder through two doors: :func:`timm_stream.load_pretrained` and timm's
own ``timm.create_model("local-dir:…" / "hf-hub:…", pretrained=True)``, which parses ``config.json``
itself and calls the registered entrypoint with the pretrained cfg and the saved ``model_args``
(``pretrained_model_args``). Both doors run :func:`validate_config` (``load_pretrained`` before anything
is downloaded beyond the config, the entrypoint through :func:`check_build_arguments`), so a config
that would silently build a random head, unpickle a weights file or mix two Hub revisions is refused
on every path.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from timm.models import PretrainedCfg

from ..engine import normalize_tile_size
from ._builder import DEFAULT_TILE_SIZE, STREAM_PREFIX, check_stream_stages

__all__ = ["validate_config", "check_model_args", "check_label_names", "check_build_arguments",
           "warn_if_untiled", "pin_revision", "STREAM_ARGS", "RESERVED_ARGS", "WEIGHTS_NAME", "PICKLE_SUFFIXES",
           "LargeTileWarning"]

WEIGHTS_NAME = "model.safetensors"  # the only weights file written and the only one loaded
# Streaming arguments of the builder, written to model_args by timm_stream.save_pretrained.
STREAM_ARGS = ("tile_size", "stream_stages", "normalize_input", "train_tail_norms")
# Parameters of timm.create_model / the entrypoints, never reconstruction arguments: in a config they
# would collide with what create_model passes itself ("got multiple values"), or, for features_only
# and local_stages, change what was proven local.
RESERVED_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
                 "checkpoint_path", "cache_dir", "scriptable", "exportable", "no_jit", "features_only",
                 "local_stages")
_BOOL_ARGS = ("normalize_input", "train_tail_norms", "progress")
# Files torch.load / pickle would read (timm falls back to them when no safetensors is named).
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".tar", ".npz")
# A tile side beyond this streams nothing on any image one would call large in 2025 (one
# resnet50 stem map of 16384^2 is 64 ch x 8192^2 x 4 B = 16 GiB): almost certainly a mistake.
MAX_SENSIBLE_TILE = 16384
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class LargeTileWarning(UserWarning):
    """The configured tile is so large that the model runs un-tiled on the images it is meant for."""


def validate_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check a shared model's ``config.json`` (as a dict) before anything is built from it; returns it.

    Raises ``ValueError`` naming the offending field when: the architecture is missing, not
    ``stream_*`` or not registered by this timm_stream; ``model_args`` has a tile_size that is not a
    positive int or (h, w) pair, a stream_stages out of range, a non-bool flag, a bad num_classes or a
    create_model / registry parameter (``local_stages``, ``pretrained``…); ``num_classes`` /
    ``model_args.num_classes`` / ``label_names`` are inconsistent (a mismatch would silently load a
    random head); the pretrained cfg has unknown fields, non-numeric mean/std, a custom loader or a
    weights file (``hf_hub_filename``, ``file``, ``url``) that is not safetensors: loading never
    unpickles.
    """
    from . import REGISTERED  # the registry imports this module

    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a JSON object, got {type(config).__name__}")
    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("config has no 'architecture' (expected 'stream_<arch>')")
    if not arch.startswith(STREAM_PREFIX):
        raise ValueError(f"architecture {arch!r} is not a streaming model (expected '{STREAM_PREFIX}<arch>'); "
                         "load it with timm.create_model instead")
    if arch not in REGISTERED:
        raise ValueError(f"unknown streaming architecture {arch!r}: this timm_stream registers "
                         f"{len(REGISTERED)} (timm.list_models('stream_*')); a newer timm_stream may know it")

    num_classes = config.get("num_classes")
    if num_classes is not None:
        _check_num_classes(num_classes, "num_classes")
    model_args = config.get("model_args", {})
    if model_args is None:
        model_args = {}
    if not isinstance(model_args, Mapping):
        raise ValueError(f"model_args must be a JSON object, got {type(model_args).__name__}")
    check_model_args(model_args, "model_args")
    if num_classes is not None and model_args.get("num_classes", num_classes) != num_classes:
        raise ValueError(f"model_args.num_classes={model_args['num_classes']} disagrees with "
                         f"num_classes={num_classes}: the saved head has one of them, a model built with the "
                         "other would get a random head; fix config.json")
    if config.get("label_names") is not None:
        check_label_names(config["label_names"], model_args.get("num_classes", num_classes))

    cfg = config.get("pretrained_cfg", {})
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"pretrained_cfg must be a JSON object, got {type(cfg).__name__}")
    unknown = set(cfg) - {f.name for f in dataclasses.fields(PretrainedCfg)}
    if unknown:
        raise ValueError(f"pretrained_cfg has unknown fields {sorted(unknown)}")
    if cfg.get("custom_load"):
        raise ValueError("pretrained_cfg.custom_load is set: shared streaming models load plain safetensors")
    filename = cfg.get("hf_hub_filename")
    if filename is not None and not (isinstance(filename, str) and filename.endswith(".safetensors")):
        raise ValueError(f"pretrained_cfg.hf_hub_filename={filename!r}: only .safetensors weights are loaded "
                         f"(a pickle file is never unpickled); point it to {WEIGHTS_NAME}")
    for key in ("file", "url"):
        value = cfg.get(key)
        if isinstance(value, str) and value.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(f"pretrained_cfg.{key}={value!r} is a pickle file: only .safetensors weights are "
                             "loaded (a pickle file is never unpickled)")
    if cfg.get("state_dict") is not None:
        raise ValueError("pretrained_cfg.state_dict is set: a config cannot carry weights")
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"pretrained_cfg.{key} must be a list of numbers, got {value!r}")
    if cfg.get("std") and any(v <= 0 for v in cfg["std"]):
        raise ValueError(f"pretrained_cfg.std must be positive, got {cfg['std']!r}")
    return config


def check_model_args(args: Mapping[str, Any], where: str) -> None:
    """Types and ranges of the streaming arguments in ``args``; ``ValueError`` naming ``where``."""
    reserved = sorted(set(args) & set(RESERVED_ARGS))
    if reserved:
        raise ValueError(f"{where} must not contain {reserved}: they are create_model's or the registry's own "
                         "parameters, not model arguments; remove them")
    try:
        if "tile_size" in args:
            normalize_tile_size(args["tile_size"])
        if "stream_stages" in args:
            check_stream_stages(args["stream_stages"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for key in _BOOL_ARGS:
        if key in args and not isinstance(args[key], bool):
            raise ValueError(f"{where}: {key} must be true or false, got {args[key]!r}")
    if "num_classes" in args:
        _check_num_classes(args["num_classes"], f"{where}: num_classes")


def _check_num_classes(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")


def check_label_names(label_names: Any, num_classes: int | None) -> list[str] | dict[int, str] | None:
    """``label_names`` as a list of str (one per class) or ``{index: name}`` with every index in
    ``0..num_classes-1`` (JSON keys may be digit strings); ``ValueError`` otherwise."""
    if label_names is None:
        return None
    if isinstance(label_names, Mapping):
        result = {}
        for key, name in label_names.items():
            index = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if isinstance(index, bool) or not isinstance(index, int) or not isinstance(name, str):
                raise ValueError(f"label_names must map class indices to names, got {key!r}: {name!r}")
            if index < 0 or (num_classes is not None and index >= num_classes):
                raise ValueError(f"label_names has index {index}, outside the class range 0..{num_classes - 1} "
                                 if num_classes else f"label_names has index {index}, but there are no classes")
            result[index] = name
        return dict(sorted(result.items()))
    if isinstance(label_names, str) or not isinstance(label_names, Sequence) or not all(
            isinstance(n, str) for n in label_names):
        raise ValueError(f"label_names must be a list of strings (or {{index: name}}), got {label_names!r}")
    if num_classes is not None and len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label_names for {num_classes} classes")
    return list(label_names)


def _config_of(arch: str, cfg: Mapping[str, Any], model_args: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json that timm parsed into (pretrained_cfg, model_args): timm copies the top-level
    num_classes / label_names into the cfg and adds where it came from (source, file, hf_hub_id)."""
    fields = {k: v for k, v in cfg.items() if k not in ("num_classes", "label_names", "label_descriptions")}
    return {"architecture": arch, "num_classes": cfg.get("num_classes"), "label_names": cfg.get("label_names"),
            "model_args": dict(model_args), "pretrained_cfg": fields}


def check_build_arguments(arch: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """Run in the ``stream_<arch>`` entrypoint before the base model is built; edits ``kwargs``.

    Always: ``local_stages`` (fixed by the registry) is refused, the streaming arguments are type-checked.
    For a model timm builds from a saved config (``local-dir:`` / ``hf-hub:``): the whole config goes
    through :func:`validate_config`; the weights are pinned to ``model.safetensors`` (timm would
    otherwise fall back to ``pytorch_model.bin``, a pickle) and, on the Hub, to the commit the config
    was read from (a push between the two downloads cannot mix revisions).
    """
    if "local_stages" in kwargs:
        raise ValueError(f"{arch}: local_stages is not an argument: it is fixed by the registry to the stages "
                         "proven local; use stream_stages to stream fewer stages")
    check_model_args({k: v for k, v in kwargs.items() if k in (*STREAM_ARGS, "progress", "num_classes")},
                     f"{arch} arguments")
    cfg = kwargs.get("pretrained_cfg")
    saved_args = kwargs.get("pretrained_model_args")
    if not isinstance(cfg, Mapping) or cfg.get("source") not in ("local-dir", "hf-hub"):
        return  # a registry model (pretrained tags are timm's own cfgs)
    validate_config(_config_of(arch, cfg, saved_args or {}))
    cfg = dict(cfg)
    if cfg["source"] == "local-dir":
        weights = os.path.join(cfg.get("file") or "", WEIGHTS_NAME)
        if pretrained and not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights} not found: only safetensors weights are loaded (pickle files "
                                    "never are); save the model with timm_stream.save_pretrained")
    else:
        cfg["hf_hub_filename"] = cfg.get("hf_hub_filename") or WEIGHTS_NAME
        if pretrained:
            _pin_to_config_commit(cfg, saved_args or {}, kwargs.get("cache_dir"))
    kwargs["pretrained_cfg"] = cfg


def pin_revision(model_id: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``user/repo[@revision]`` -> ``user/repo@<commit>``: the commit the revision resolves to now
    (huggingface_hub's ``hf_hub_download`` of ``config.json``: one request online, the cache's refs
    offline; the snapshot folder of the cache is named by the commit). Weights fetched with the result
    come from that commit even if the branch moves afterwards."""
    from huggingface_hub import hf_hub_download
    from timm.models._hub import hf_split

    repo_id, revision = hf_split(model_id)
    if revision and _COMMIT.match(revision):
        return model_id
    path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    commit = os.path.basename(os.path.dirname(path))  # <cache>/models--user--repo/snapshots/<commit>/config.json
    return f"{repo_id}@{commit}" if _COMMIT.match(commit) else model_id


def _pin_to_config_commit(cfg: dict[str, Any], model_args: Mapping[str, Any], cache_dir: Any) -> None:
    """timm read config.json of ``cfg["hf_hub_id"]`` a moment ago without recording the commit: pin the
    revision now and check that the config of that commit is the one timm parsed; if the repository
    changed in between, refuse instead of pairing one commit's config with another's weights."""
    from timm.models._hub import _parse_model_cfg, load_cfg_from_json

    model_id = cfg["hf_hub_id"]
    pinned = pin_revision(model_id, cache_dir)
    if pinned == model_id:
        return
    from huggingface_hub import hf_hub_download
    from timm.models._hub import hf_split

    repo_id, commit = hf_split(pinned)
    path = hf_hub_download(repo_id, "config.json", revision=commit, cache_dir=cache_dir)
    now_cfg, _, now_args = _parse_model_cfg(load_cfg_from_json(path), {"hf_hub_id": model_id, "source": "hf-hub"})
    if {**now_cfg, "hf_hub_filename": cfg["hf_hub_filename"]} != cfg or dict(now_args) != dict(model_args):
        raise RuntimeError(f"hf-hub:{model_id} changed while it was loading (config.json of commit {commit} "
                           "differs from the one read first): load it again, or pin a revision with "
                           f"'hf-hub:{repo_id}@<commit>'")
    cfg["hf_hub_id"] = pinned


def warn_if_untiled(model: Any, cfg: Mapping[str, Any] | None) -> None:
    """Warn (:class:`LargeTileWarning`) when ``model.tile_size`` streams nothing where it matters: a tile
    side above :data:`MAX_SENSIBLE_TILE`, or a tile covering the whole input size the config declares when
    that size is larger than the default tile (the model would run un-tiled, with the un-tiled memory).
    Never with a ``memory_budget``: the planner then keeps within it whatever the largest tile."""
    if getattr(getattr(model, "streamer", None), "memory_budget", None) is not None or model.tile_size is None:
        return
    tile = tuple(model.tile_size)
    size = tuple((cfg or {}).get("input_size") or ())[-2:]
    why = None
    if max(tile) > MAX_SENSIBLE_TILE:
        why = f"a tile side above {MAX_SENSIBLE_TILE} px"
    elif len(size) == 2 and max(size) > DEFAULT_TILE_SIZE and tile[0] >= size[0] and tile[1] >= size[1]:
        why = f"the config's input size {size[0]}x{size[1]} fits in one tile"
    if why:
        warnings.warn(f"{model.pretrained_cfg.get('architecture', 'model')}: tile_size {tile[0]}x{tile[1]} is so "
                      f"large that images run un-tiled ({why}), needing the un-tiled memory; pass a smaller "
                      f"tile_size (e.g. tile_size={DEFAULT_TILE_SIZE}: same outputs, less memory)",
                      LargeTileWarning, stacklevel=3)
