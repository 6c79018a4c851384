"""Share streaming models on the Hugging Face Hub: save, push, validate, reload.

A shared streaming model is an ordinary timm Hub model — ``config.json``, ``model.safetensors`` and a
``README.md`` model card — whose ``architecture`` is the registered ``stream_<arch>`` and whose
``model_args`` carry the streaming arguments. After ``import timm_stream`` (which registers the
architectures) timm's own loaders rebuild it::

    import timm_stream, timm
    model = timm.create_model("hf-hub:user/repo", pretrained=True)               # or "local-dir:/path"
    model = timm_stream.load_pretrained("hf-hub:user/repo", tile_size=4096)    # validates the config first

Files are written by timm's ``save_for_hf`` (safetensors only); downloads, uploads, the cache,
``HF_HUB_OFFLINE`` and tokens are huggingface_hub's own: nothing here reads a token.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from tempfile import TemporaryDirectory
from typing import Any

import timm
from timm.models import PretrainedCfg
from timm.models._hub import hf_split, save_for_hf
from torch import nn

from .engine.streaming import _as_tile_size
from .models import REGISTERED, STREAM_PREFIX, InputNormalizer, StreamingModelMixin, base_name
from .models._builder import _check_stream_stages
from .models._families import STAGE_REDUCTIONS

__all__ = ["save_pretrained", "push_to_hub", "load_pretrained", "validate_config", "render_model_card",
           "WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME"]

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"  # the only weights file written and the only one loaded
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CARD_TEMPLATE = "stream_model.md"  # in model_cards/ == package data of timm_stream.model_cards

# Streaming arguments written to model_args explicitly (timm >= 1.0.2x also records the factory's
# kwargs, older timm only what is passed): without them a reload would stream differently.
STREAM_ARGS = ("tile_size", "stream_stages", "normalize_input", "train_tail_norms")
# Run-time options that are not part of the shared model.
_RUNTIME_ARGS = ("progress",)
# Parameters of timm.create_model / the entrypoints, never reconstruction arguments: in a config they
# would collide with what create_model passes itself (or, for features_only, be refused later).
_RESERVED_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
                  "checkpoint_path", "cache_dir", "scriptable", "exportable", "no_jit", "features_only")
_BOOL_ARGS = ("normalize_input", "train_tail_norms", "progress")
# Pickle files timm's own push writes next to the safetensors; a push of ours removes stale ones.
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt")

CARD_KEYS = ("license", "datasets", "training_data", "metrics", "base_pretrained", "repo_id", "title",
             "description", "tags")


# ------------------------------------------------------------------------------------------------ save


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                    label_names: Sequence[str] | Mapping[int, str] | None = None,
                    card: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``directory`` (created if
    missing); nothing else, and nothing outside it. Returns the directory.

    ``config.json`` is timm's (``save_for_hf``): architecture ``stream_<arch>``, ``num_classes``,
    ``label_names``, the pretrained cfg (mean/std...) and ``model_args`` holding the streaming
    arguments (tile_size, stream_stages, normalize_input, train_tail_norms), so that
    ``timm.create_model("local-dir:<directory>", pretrained=True)`` rebuilds the same model.

    Args:
        model: a ``stream_<arch>`` model from ``timm.create_model``.
        label_names: class names, one per output (or ``{index: name}``).
        card: optional model-card fields, see :func:`render_model_card`.
    """
    _check_streaming(model)
    label_names = _check_label_names(label_names, model.num_classes)
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
        if (directory / name).is_symlink():  # writing through it would write outside the directory
            raise ValueError(f"{directory / name} is a symbolic link; refusing to write through it")
    text = render_model_card(model, card=card, label_names=label_names)  # fails before anything is written

    model_config = {"label_names": label_names} if label_names else None
    save_for_hf(model, directory, model_config=model_config, model_args=_streaming_args(model),
                safe_serialization=True)
    _finish_config(directory / CONFIG_NAME)
    (directory / CARD_NAME).write_text(text, encoding="utf-8")

    stale = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if stale:
        _logger.warning("%s also holds pickle files %s (not written by save_pretrained); they are never "
                        "loaded, but uploading the whole folder would publish them", directory, stale)
    return directory


def _streaming_args(model: nn.Module) -> dict[str, Any]:
    args = {
        "tile_size": list(model.tile_size),
        "stream_stages": model.stream_stages,
        "normalize_input": isinstance(model.streamer.preprocess, InputNormalizer),
        "train_tail_norms": bool(model.train_tail_norms),
        "num_classes": model.num_classes,
    }
    pool = getattr(model, "_stream_pool", None)
    if pool is not None:  # 'max', 'attention' (its parameters are in the weights)...: rebuilt the same
        args["global_pool"] = pool.pool_type
    return args


def _finish_config(path: Path) -> None:
    """Post-edit timm's config (every timm version writes the same layout): pin the weights file so
    that even a plain ``timm.create_model("hf-hub:...")`` fetches ``model.safetensors`` and never falls
    back to a pickle, and drop run-time options the factory recorded. Then check it loads."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("pretrained_cfg", {})["hf_hub_filename"] = WEIGHTS_NAME
    for key in _RUNTIME_ARGS:
        config.get("model_args", {}).pop(key, None)
    validate_config(config)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ push


def push_to_hub(model: nn.Module, repo_id: str, *,
                label_names: Sequence[str] | Mapping[int, str] | None = None,
                card: Mapping[str, Any] | None = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str = "Add streaming model"):
    """Upload the model to the Hub repository ``repo_id`` (created if needed) in one commit: the files
    of :func:`save_pretrained`, with the model card's usage snippet pointing at the repository. A stale
    ``pytorch_model.bin`` (as timm's own push leaves) is deleted in the same commit. Returns
    huggingface_hub's ``CommitInfo``.

    timm's ``push_to_hf_hub`` is not used because it writes its own generic README (and keeps any
    existing one); the steps are the same: ``HfApi.create_repo(exist_ok=True)``, ``save_for_hf`` into a
    temporary directory, ``HfApi.upload_folder``. ``token=None`` lets huggingface_hub find the
    user's token.
    """
    from huggingface_hub import HfApi

    from . import __version__

    _check_streaming(model)
    api = HfApi(token=token, library_name="timm_stream", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # may add the user's namespace
    with TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, label_names=label_names, card={"repo_id": repo_id, **(card or {})})
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 delete_patterns=["pytorch_model.bin"])


# ------------------------------------------------------------------------------------------------ load


def load_pretrained(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                    **overrides: Any) -> nn.Module:
    """Load a shared streaming model: ``"hf-hub:<user>/<repo>[@revision]"``, ``"local-dir:<path>"`` or
    a directory path. ``overrides`` (e.g. ``tile_size=4096``, ``num_classes=5``) replace the saved
    ``model_args``.

    Same result as ``timm.create_model(source, pretrained=True, **overrides)``, but the
    ``stream_*`` registry is imported first, ``config.json`` is validated before anything is built
    (see :func:`validate_config`), and only ``model.safetensors`` is ever read: never a pickle.
    """
    kind, location = _parse_source(source)
    config = _read_config(kind, location, cache_dir)
    validate_config(config)
    _check_model_args(overrides, "keyword argument")
    if kind == "local-dir" and not (Path(location) / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{Path(location) / WEIGHTS_NAME} not found: only safetensors weights are "
                                "loaded (pickle files never are)")
    return timm.create_model(f"{kind}:{location}", pretrained=True, cache_dir=cache_dir,
                             pretrained_cfg_overlay={"hf_hub_filename": WEIGHTS_NAME}, **overrides)


def _parse_source(source: str | os.PathLike) -> tuple[str, str]:
    if isinstance(source, os.PathLike):
        return "local-dir", os.fspath(source)
    prefix, sep, rest = source.partition(":")
    kind = {"hf-hub": "hf-hub", "hf_hub": "hf-hub", "local-dir": "local-dir"}.get(prefix.lower()) if sep else None
    if kind and rest:
        return kind, rest
    if Path(source).is_dir():
        return "local-dir", source
    raise ValueError(f"cannot load {source!r}: expected 'hf-hub:<user>/<repo>[@revision]', "
                     "'local-dir:<path>' or an existing directory")


def _read_config(kind: str, location: str, cache_dir: str | os.PathLike | None) -> Any:
    if kind == "hf-hub":
        from huggingface_hub import hf_hub_download

        from . import __version__

        repo_id, revision = hf_split(location)
        path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                               library_name="timm_stream", library_version=__version__)
    else:
        path = Path(location) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {location} is not a saved timm model directory")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid {CONFIG_NAME} of {location}: not JSON ({exc})") from exc


# ------------------------------------------------------------------------------------------------ validate


def validate_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check a shared model's ``config.json`` (as a dict) before anything is built from it; returns it.

    Raises ``ValueError`` naming the offending field when: the architecture is missing, not
    ``stream_*`` or not registered by this timm_stream; ``model_args`` has a tile_size that is not a
    positive int or (h, w) pair, a stream_stages out of range, a non-bool flag, a bad num_classes or a
    create_model parameter; ``num_classes`` / ``label_names`` are inconsistent; the pretrained cfg has
    unknown fields, non-numeric mean/std, a custom loader or a non-safetensors weights file.
    """
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
                         f"{', '.join(sorted(REGISTERED))} (a newer timm_stream may know it)")

    num_classes = config.get("num_classes")
    if num_classes is not None:
        _check_num_classes(num_classes, "num_classes")
    model_args = config.get("model_args", {})
    if not isinstance(model_args, Mapping):
        raise ValueError(f"model_args must be a JSON object, got {type(model_args).__name__}")
    _check_model_args(model_args, "model_args")
    if num_classes is not None and model_args.get("num_classes", num_classes) != num_classes:
        raise ValueError(f"model_args.num_classes={model_args['num_classes']} disagrees with "
                         f"num_classes={num_classes}")
    if config.get("label_names") is not None:
        _check_label_names(config["label_names"], model_args.get("num_classes", num_classes))

    cfg = config.get("pretrained_cfg", {})
    if not isinstance(cfg, Mapping):
        raise ValueError(f"pretrained_cfg must be a JSON object, got {type(cfg).__name__}")
    unknown = set(cfg) - {f.name for f in dataclasses.fields(PretrainedCfg)}
    if unknown:
        raise ValueError(f"pretrained_cfg has unknown fields {sorted(unknown)}")
    if cfg.get("custom_load"):
        raise ValueError("pretrained_cfg.custom_load is set: shared streaming models load plain safetensors")
    filename = cfg.get("hf_hub_filename")
    if filename is not None and not (isinstance(filename, str) and filename.endswith(".safetensors")):
        raise ValueError(f"pretrained_cfg.hf_hub_filename={filename!r}: only .safetensors weights are loaded")
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"pretrained_cfg.{key} must be a list of numbers, got {value!r}")
    if cfg.get("std") and any(v <= 0 for v in cfg["std"]):
        raise ValueError(f"pretrained_cfg.std must be positive, got {cfg['std']!r}")
    return config


def _check_model_args(args: Mapping[str, Any], where: str) -> None:
    reserved = sorted(set(args) & set(_RESERVED_ARGS))
    if reserved:
        raise ValueError(f"{where} must not contain {reserved}: they are create_model's own parameters")
    try:
        if "tile_size" in args:
            _as_tile_size(args["tile_size"])
        if "stream_stages" in args:
            _check_stream_stages(args["stream_stages"])
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


def _check_label_names(label_names: Any, num_classes: int | None) -> list[str] | dict | None:
    if label_names is None:
        return None
    if isinstance(label_names, Mapping):
        return dict(label_names)
    if isinstance(label_names, str) or not isinstance(label_names, Sequence) or not all(
            isinstance(n, str) for n in label_names):
        raise ValueError(f"label_names must be a list of strings (or {{index: name}}), got {label_names!r}")
    if num_classes is not None and len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label_names for {num_classes} classes")
    return list(label_names)


def _check_streaming(model: Any) -> None:
    if not isinstance(model, StreamingModelMixin):
        raise TypeError(f"expected a streaming model from timm.create_model('stream_<arch>', ...), "
                        f"got {type(model).__name__}")


# ------------------------------------------------------------------------------------------------ card


def render_model_card(model: nn.Module, *, card: Mapping[str, Any] | None = None,
                      label_names: Sequence[str] | Mapping[int, str] | None = None) -> str:
    """The model card (``README.md``) of a streaming model, from ``model_cards/stream_model.md``.

    Hub front matter (library ``timm``, tags incl. ``streaming``, license, datasets, base_model), the
    base architecture and its pretrained origin, tile size, streamed stages, total stride,
    receptive field and halo, training data and metrics when given, a usage snippet and the
    streaming paper's citation.

    ``card`` keys, all optional:
        license: Hub license id (default: the base weights' license from the pretrained cfg, else
            ``unknown``).
        datasets: Hub dataset ids (list, or one str) for the front matter.
        training_data: free text, shown under "Training data".
        metrics: ``{name: value}``, shown as a table.
        base_pretrained: the weights the model was initialized from, e.g. ``timm/resnet50.a1_in1k``; a
            Hub id also becomes the front matter's ``base_model``. Default: the pretrained cfg's
            ``hf_hub_id`` (the base's weights, or this repository after a Hub reload), shown only.
        repo_id: the Hub repository, used in the usage snippet (set by :func:`push_to_hub`).
        title: heading (default: the repository name, else the architecture).
        description: a paragraph under the heading.
        tags: extra Hub tags.
    """
    from huggingface_hub import ModelCardData

    _check_streaming(model)
    card = _check_card(card)
    label_names = _check_label_names(label_names, model.num_classes)
    cfg = model.pretrained_cfg
    arch = cfg["architecture"]  # stream_<arch>, set by the builder
    base = base_name(arch)
    repo_id = card.get("repo_id")
    # The pretrained cfg names the weights the base *would* load; only the caller knows whether they did
    # (or what else initialized the model), so only an explicit base_pretrained becomes base_model.
    origin = card.get("base_pretrained") or cfg.get("hf_hub_id") or (
        f"{base}.{cfg['tag']}" if cfg.get("tag") else None)
    is_hub_id = isinstance(origin, str) and origin.count("/") == 1 and " " not in origin

    tags = ["image-classification", "timm", "timm_stream", "streaming", base, *card.get("tags", [])]
    front = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        license=card.get("license") or cfg.get("license") or "unknown",
        tags=list(dict.fromkeys(tags)),
        datasets=list(card.get("datasets", [])) or None,
        base_model=origin if card.get("base_pretrained") and is_hub_id and origin != repo_id else None,
    ).to_yaml()

    g = model.streamer.geometry
    (top, bottom), (left, right) = g.halo
    labels = ""
    if label_names:
        names = list(label_names.values()) if isinstance(label_names, Mapping) else label_names
        labels = ": " + ", ".join(f"`{n}`" for n in names[:20]) + (", …" if len(names) > 20 else "")
    if isinstance(model.streamer.preprocess, InputNormalizer):
        input_text = "uint8 RGB images (0..255); each tile is normalized inside the model"
        example = "torch.randint(0, 256, (1, 3, 8192, 8192), dtype=torch.uint8)  # a whole multi-megapixel image"
    else:
        input_text = f"float images normalized with mean {_fmt_seq(cfg.get('mean'))}, std {_fmt_seq(cfg.get('std'))}"
        example = "torch.randn(1, 3, 8192, 8192)  # a whole multi-megapixel image, normalized"

    fields = dict(
        front_matter=front,
        title=card.get("title") or (repo_id.split("/")[-1] if repo_id else arch),
        description=f"{card['description'].strip()}\n\n" if card.get("description") else "",
        architecture=arch,
        base=base,
        origin=f"[`{origin}`](https://huggingface.co/{origin})" if is_hub_id else (
            f"`{origin}`" if origin else "not recorded"),
        tile_size=f"{model.tile_size[0]} × {model.tile_size[1]}",
        stream_stages=model.stream_stages,
        total_stages=len(STAGE_REDUCTIONS),
        stride=f"{g.stride[0]} × {g.stride[1]}",
        receptive_field=f"{g.receptive_field[0]} × {g.receptive_field[1]}",
        halo=f"top {top}, bottom {bottom}, left {left}, right {right}",
        num_classes=model.num_classes,
        labels=labels,
        params=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
        input=input_text,
        training_section=_section("Training data", card.get("training_data")),
        metrics_section=_metrics_section(card.get("metrics")),
        model_id=f"hf-hub:{repo_id}" if repo_id else "hf-hub:<user>/<repo>",
        example_input=example,
    )
    return _template().substitute(fields)


def _template() -> Template:
    try:
        text = resources.files("timm_stream.model_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(f"model card template {CARD_TEMPLATE} not found in timm_stream.model_cards: "
                           "reinstall timm_stream (pip install -e . for a checkout)") from exc
    return Template(text)


def _check_card(card: Mapping[str, Any] | None) -> dict[str, Any]:
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"unknown model card fields {unknown}; known: {', '.join(CARD_KEYS)}")
    metrics = card.get("metrics")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError(f"card['metrics'] must be a dict name -> value, got {metrics!r}")
    if isinstance(card.get("datasets"), str):
        card["datasets"] = [card["datasets"]]
    for key in ("datasets", "tags"):
        value = card.get(key, [])
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"card[{key!r}] must be a list of strings, got {value!r}")
    return card


def _section(title: str, text: str | None) -> str:
    return f"\n## {title}\n\n{text.strip()}\n" if text else ""


def _metrics_section(metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return ""
    rows = "".join(f"| {name} | {_fmt_value(value)} |\n" for name, value in metrics.items())
    return f"\n## Metrics\n\n| Metric | Value |\n|---|---|\n{rows}"


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_seq(values: Sequence[float] | None) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")" if values else "(not recorded)"
