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

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from tempfile import TemporaryDirectory
from typing import Any

import timm
from timm.models._hub import hf_split, save_for_hf
from torch import nn

from .models import PICKLE_SUFFIXES as _PICKLE_SUFFIXES
from .models import WEIGHTS_NAME, InputNormalizer, StreamingModelMixin, base_name, pin_revision, validate_config
from .models import check_label_names as _check_label_names
from .models import check_model_args as _check_model_args
from .models import STAGE_REDUCTIONS
# (validate_config lives with the builder, which timm's own "local-dir:"/"hf-hub:" loads reach too)

__all__ = ["save_pretrained", "push_to_hub", "load_pretrained", "validate_config", "render_model_card",
           "WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME"]

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CARD_TEMPLATE = "stream_model.md"  # in model_cards/ == package data of timm_stream.model_cards

# Run-time options that are not part of the shared model (memory_budget: the saving machine's memory).
_RUNTIME_ARGS = ("progress", "memory_budget")

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
    # tile_size is None when a memory_budget alone chose the tiles: the budget is the saving machine's,
    # not part of the shared model (like progress), so a reload gets the default tile or its own budget.
    args = {
        **({} if model.tile_size is None else {"tile_size": list(model.tile_size)}),
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

    Same result as ``timm.create_model(source, pretrained=True, **overrides)`` (which runs the same
    checks once ``timm_stream`` is imported), but ``config.json`` is validated before the weights are
    downloaded (see :func:`validate_config`); only ``model.safetensors`` is ever read, never a pickle;
    on the Hub the revision is resolved to one commit, from which config and weights both come.
    """
    kind, location = _parse_source(source)
    config = _read_config(kind, location, cache_dir)
    validate_config(config)
    if kind == "hf-hub":  # config and weights from one commit, even if the branch moves meanwhile
        location = pin_revision(location, cache_dir)
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


# ------------------------------------------------------------------------------------------------ checks


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
    is_hub_id = isinstance(origin, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", origin) is not None

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
        labels = ": " + ", ".join(_md_text(n) for n in names[:20]) + (", …" if len(names) > 20 else "")
    if isinstance(model.streamer.preprocess, InputNormalizer):
        input_text = "uint8 RGB images (0..255); each tile is normalized inside the model"
        example = "torch.randint(0, 256, (1, 3, 8192, 8192), dtype=torch.uint8)  # a whole multi-megapixel image"
    else:
        input_text = f"float images normalized with mean {_fmt_seq(cfg.get('mean'))}, std {_fmt_seq(cfg.get('std'))}"
        example = "torch.randn(1, 3, 8192, 8192)  # a whole multi-megapixel image, normalized"

    fields = dict(
        front_matter=front,
        title=_md_text(card.get("title") or (repo_id.split("/")[-1] if repo_id else arch)),
        description=f"{card['description'].strip()}\n\n" if card.get("description") else "",
        architecture=arch,
        base=base,
        origin=f"[`{origin}`](https://huggingface.co/{origin})" if is_hub_id else (
            _md_text(origin) if origin else "not recorded"),
        tile_size=(f"{model.tile_size[0]} × {model.tile_size[1]}" if model.tile_size is not None else
                   "the default (saved without tile_size: this model's tiles were chosen from a memory_budget)"),
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
    license_ = card.get("license")
    if license_ is not None and not (isinstance(license_, str) and _LICENSE_ID.fullmatch(license_)):
        raise ValueError(f"card['license']={license_!r} is not a Hub license id: use a lowercase SPDX-style id "
                         "such as 'apache-2.0', 'mit', 'cc-by-4.0', or 'other' "
                         "(https://huggingface.co/docs/hub/repositories-licenses)")
    if isinstance(card.get("datasets"), str):
        card["datasets"] = [card["datasets"]]
    for key in ("datasets", "tags"):
        value = card.get(key, [])
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"card[{key!r}] must be a list of strings, got {value!r}")
    return card


# Hub license ids are lowercase SPDX-style identifiers ("apache-2.0", "cc-by-nc-sa-4.0", "openrail++",
# "other"); anything else (spaces, newlines, YAML) would end up in the card's front matter.
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+\-]{0,63}")
# Characters that make Markdown out of a name: table cells (|), code spans, emphasis, links, HTML,
# headings. Escaped with a backslash (CommonMark), so a name shows as written and stays in its cell.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|#])")


def _md_text(text: str) -> str:
    """One line of literal text for Markdown: whitespace runs (newlines included) become one space, so
    a name cannot start a line (no injected ``---`` / ``# heading``), and Markdown characters are escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _section(title: str, text: str | None) -> str:
    return f"\n## {title}\n\n{text.strip()}\n" if text else ""


def _metrics_section(metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return ""
    rows = "".join(f"| {_md_text(str(name))} | {_md_text(_fmt_value(value))} |\n" for name, value in metrics.items())
    return f"\n## Metrics\n\n| Metric | Value |\n|---|---|\n{rows}"


def _fmt_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_seq(values: Sequence[float] | None) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")" if values else "(not recorded)"
