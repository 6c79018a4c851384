"""``StreamingClassifier``: a LightningModule around any ``stream_<arch>`` timm model.

Automatic optimization: ``training_step`` returns the loss and Lightning calls ``loss.backward()``;
the streaming engine makes that backward exact and accumulates every parameter's gradient once, so
gradient accumulation, mixed precision and DDP (without ``find_unused_parameters``) are the
Trainer's as for any model.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Literal, Sequence

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

import timm_stream  # noqa: F401 - registers the stream_<arch> models
from timm_stream.engine import normalize_tile_size

__all__ = ["StreamingClassifier", "CHECKPOINT_KEY", "pretrained_weights_cached", "check_model_name"]

CHECKPOINT_KEY = "timm_stream"  # the checkpoint entry export reads (model name, kwargs, labels, metrics)
CHECKPOINT_FORMAT = 1



def check_model_name(model_name: str) -> None:
    """Raise a clear error unless ``model_name`` is a registered ``stream_<arch>`` model."""
    from timm_stream.models import REGISTERED, STREAM_PREFIX

    base = model_name.split(".", 1)[0]
    if base in REGISTERED:
        return
    hint = ""
    if timm.is_model(base) and not base.startswith(STREAM_PREFIX):
        candidate = STREAM_PREFIX + base
        hint = (f"; did you mean '{candidate}'?" if candidate in REGISTERED else
                f"; '{base}' has no streaming variant registered")
    raise ValueError(f"model_name '{model_name}' is not a streaming model{hint}. Registered: {', '.join(REGISTERED)}")


def _hf_hub_id(model_name: str) -> str | None:
    from timm.models import resolve_pretrained_cfg

    try:
        return resolve_pretrained_cfg(model_name).hf_hub_id
    except Exception:  # noqa: BLE001 - no cfg: nothing to find
        return None


def pretrained_weights_cached(model_name: str) -> bool:
    """Whether the pretrained weights of ``model_name`` are in the local Hugging Face cache (nothing is
    downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    repo = _hf_hub_id(model_name)
    if not repo:
        return False
    repo, _, revision = repo.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def _plain(value: Any) -> Any:
    """Checkpoint-safe copy (loads with ``torch.load(weights_only=True)``): tuples/lists/dicts of
    str/int/float/bool/None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class StreamingClassifier(LightningModule):
    """Image classification with a ``stream_<arch>`` timm model on uint8 images of any size.

    Args:
        model_name: a registered streaming model, e.g. ``stream_resnet50`` (optionally with a
            pretrained tag: ``stream_resnet50.a1_in1k``).
        num_classes: classes of the new head.
        tile_size: largest tile in input pixels (int or [height, width]); memory grows with it.
        pretrained: start from timm's pretrained weights (from the Hugging Face cache or the Hub;
            ``HF_HUB_OFFLINE=1`` is respected).
        global_pool: timm pooling ('max' suits "is the pattern anywhere" tasks; 'avg' is timm's default), or
            'attention' (gated attention MIL, Ilse et al. 2018: learns which regions matter; slide-level labels).
            With every stage streamed the pooling runs while streaming; batches may carry a ``"mask"``.
        stream_stages: stem plus this many stages run streamed (default: all proven local).
        model_kwargs: anything else the timm model takes (drop_rate, drop_path_rate, in_chans...).
        label_names: class names in class-index order (default: taken from the data if it names them).
        optimizer: optimizer factory, from the CLI/YAML as ``class_path``/``init_args``.
        scheduler: optional LR scheduler factory, likewise.
        scheduler_interval: step the scheduler every 'epoch' or every optimizer 'step'.
        scheduler_monitor: metric a ReduceLROnPlateau scheduler watches.
        grad_checkpointing: gradient checkpointing of the un-streamed tail (when stream_stages < all).
        tile_progress: progress bar over tiles (slow steps only).
    """

    def __init__(self, model_name: str = "stream_resnet18", num_classes: int = 2,
                 tile_size: int | tuple[int, int] = 2048, pretrained: bool = False, global_pool: str = "max",
                 stream_stages: int | None = None, model_kwargs: dict[str, Any] | None = None,
                 label_names: list[str] | None = None,
                 optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None,
                 scheduler_interval: Literal["epoch", "step"] = "epoch", scheduler_monitor: str = "val/loss",
                 grad_checkpointing: bool = False, tile_progress: bool = False):
        super().__init__()
        # Plain values only (the optimizer/scheduler factories are in the CLI's config.yaml), so that
        # checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_model_name(model_name)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (binary tasks use 2 classes), got {num_classes}")
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(f"{len(label_names)} label_names {label_names} for num_classes={num_classes}")
        self.model_name = model_name
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names is not None else None
        self.pretrained = pretrained
        kwargs = dict(model_kwargs or {})
        tile_size = normalize_tile_size(tile_size)  # a YAML list, an int or a pair: one (h, w) form
        kwargs.update(num_classes=num_classes, tile_size=tile_size, global_pool=global_pool, normalize_input=True,
                      progress=tile_progress)
        if stream_stages is not None:
            kwargs["stream_stages"] = stream_stages
        self.model_kwargs = kwargs
        self.model = self._create_model(model_name, pretrained, kwargs)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        for stage in ("train", "val", "test"):
            metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")}
            if num_classes == 2:
                metrics["auroc"] = BinaryAUROC()
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))

    @staticmethod
    def _create_model(model_name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        try:
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except Exception as exc:
            if not pretrained or pretrained_weights_cached(model_name):
                raise
            raise RuntimeError(
                f"cannot load the pretrained weights of {model_name} ({_hf_hub_id(model_name)}): they are not in "
                f"the local Hugging Face cache and the Hub could not be reached ({type(exc).__name__}: {exc}). "
                "Download them once with network access (e.g. python -c \"import timm_stream, timm; "
                f"timm.create_model('{model_name}', pretrained=True)\"), or set pretrained: false") from exc

    # ------------------------------------------------------------------ properties the data module reads
    @property
    def min_input_size(self) -> tuple[int, int]:
        """The smallest image (height, width) the network turns into an output, found by running it on
        meta tensors (not its stride: a padded ResNet gives logits for a 16x16 image)."""
        from .input_size import smallest_input_size

        return smallest_input_size(self.model)

    # ------------------------------------------------------------------ forward / steps
    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | Sequence[Tensor | None] | None = None) -> Tensor:
        """Logits for uint8 ``(N, C, H, W)`` images (or lazy images), or a list of ``(1, C, H, W)`` images
        of different sizes; ``mask``: bool ``(N, 1, h, w)`` (a list for a list of images) of the regions
        to pool over (e.g. tissue), or None."""
        if isinstance(images, (list, tuple)):
            masks = mask if isinstance(mask, (list, tuple)) else [None] * len(images)
            return torch.cat([self.model(x) if m is None else self.model(x, mask=m) for x, m in zip(images, masks)])
        return self.model(images) if mask is None else self.model(images, mask=mask)

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        labels = batch["label"]
        logits = self(batch["image"], mask=batch.get("mask"))
        loss = F.cross_entropy(logits, labels)
        probs = logits.detach().float().softmax(dim=1)
        size = labels.shape[0]
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=size,
                 sync_dist=stage != "train")
        for name, metric in getattr(self, f"{stage}_metrics").items():
            metric.update(probs[:, 1] if name == "auroc" else probs, labels)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc",
                     batch_size=size)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self(batch["image"], mask=batch.get("mask")).float().softmax(dim=1)
        return {"path": list(batch["path"]), "probs": probs.cpu()}

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ checkpoints and export
    def export_info(self) -> dict[str, Any]:
        """What export needs to rebuild and describe the model (plain values only)."""
        metrics = {}
        trainer = self._trainer
        if trainer is not None:
            for key, value in trainer.callback_metrics.items():
                if isinstance(value, Tensor) and value.numel() == 1 and not key.endswith("_step"):
                    metrics[key.removesuffix("_epoch")] = float(value)
        return _plain({
            "format": CHECKPOINT_FORMAT,
            "timm_stream_version": getattr(timm_stream, "__version__", None),
            "model_name": self.model_name,
            "model_kwargs": {k: v for k, v in self.model_kwargs.items() if k != "progress"},
            "label_names": self.label_names,
            "metrics": metrics,
            "base_pretrained": _hf_hub_id(self.model_name) if self.pretrained else "random initialization",
            "epoch": trainer.current_epoch if trainer is not None else None,
            "global_step": trainer.global_step if trainer is not None else None,
        })

    # The stream model keeps its norm layers in eval mode on purpose (frozen statistics: batches of huge
    # images hold one or two images, and a tile must be normalized like the whole image), so Lightning's
    # "Found N module(s) in eval mode at the start of training" (checked between these two hooks) is
    # silenced for exactly those modules: an eval-mode module anywhere else still gets the warning.
    def on_fit_start(self) -> None:
        modes = {name: m.training for name, m in self.named_modules()}
        self.train()  # as Lightning has it at the check: the stream model's train() keeps its norms frozen
        eval_names = [name for name, m in self.named_modules() if not m.training]
        for name, m in self.named_modules():
            m.training = modes[name]
        ours = [n for n in eval_names if n.startswith("model.")]
        others = [n for n in eval_names if not n.startswith("model.")]
        if ours and not others:
            self._eval_notice = warnings.catch_warnings()
            self._eval_notice.__enter__()
            warnings.filterwarnings("ignore", message=rf"Found {len(ours)} module\(s\) in eval mode at the start")

    def on_train_start(self) -> None:
        notice = self.__dict__.pop("_eval_notice", None)
        if notice is not None:
            notice.__exit__(None, None, None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.export_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CHECKPOINT_KEY) or {}
        if self.label_names is None and info.get("label_names"):
            self.label_names = list(info["label_names"])
