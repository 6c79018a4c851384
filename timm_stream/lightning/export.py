"""From a ``StreamingClassifier`` checkpoint to a Hub-format model (``timm_stream.save_pretrained``).

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: the module keeps its
hyperparameters and its ``timm_stream`` entry (model name, model kwargs, label names, metrics) plain.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from timm_stream.engine import normalize_tile_size

from .module import CHECKPOINT_KEY

__all__ = ["load_checkpoint", "model_from_checkpoint", "card_from_info", "export_checkpoint"]

_CARD_METRIC_PREFIXES = ("val/", "test/")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as a dict, loaded with ``weights_only=True`` (no pickle code runs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: cannot load the checkpoint with torch.load(weights_only=True) "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint of timm_stream.lightning.StreamingClassifier (no "
                         f"'{CHECKPOINT_KEY}' entry)")
    return checkpoint


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the timm model of a checkpoint (no pretrained download: the weights are the
    checkpoint's). Returns ``(model, info)`` with ``info`` the checkpoint's ``timm_stream`` entry."""
    import timm_stream  # noqa: F401 - registers stream_<arch>

    checkpoint = load_checkpoint(path)
    info = checkpoint[CHECKPOINT_KEY]
    kwargs = dict(info["model_kwargs"])
    if "tile_size" in kwargs:  # saved as a list or a pair
        kwargs["tile_size"] = normalize_tile_size(kwargs["tile_size"])
    model = timm.create_model(info["model_name"], pretrained=False, **kwargs)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, info


def card_from_info(info: Mapping[str, Any], card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Model-card fields from a checkpoint's info: validation/test metrics and the pretrained origin;
    ``card`` adds to or overrides them."""
    metrics = {k: v for k, v in (info.get("metrics") or {}).items() if k.startswith(_CARD_METRIC_PREFIXES)}
    result: dict[str, Any] = {}
    if metrics:
        result["metrics"] = dict(sorted(metrics.items()))
    if info.get("base_pretrained"):
        result["base_pretrained"] = info["base_pretrained"]
    result.update(card or {})
    return result


def export_checkpoint(checkpoint: str | os.PathLike, directory: str | os.PathLike, *,
                      card: Mapping[str, Any] | None = None, label_names=None) -> Path:
    """Write the checkpoint's model as a Hub-format folder (config.json, model.safetensors, README.md)."""
    from timm_stream.hub import save_pretrained

    model, info = model_from_checkpoint(checkpoint)
    return save_pretrained(model, directory, label_names=label_names or info.get("label_names"),
                           card=card_from_info(info, card))
