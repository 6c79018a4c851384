"""Callbacks: the predictions CSV writer and the export of the best checkpoint as a Hub-format model."""
from __future__ import annotations

import csv
import os
from typing import Any, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["PredictionWriter", "HubExport", "prediction_columns", "merge_prediction_parts", "part_path"]


def prediction_columns(label_names: Sequence[str] | None, num_classes: int) -> list[str]:
    names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
    return ["path", "prediction"] + [f"prob_{name}" for name in names]


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results to a CSV: ``path, prediction, prob_<class>...`` (the predicted class
    name, or index when the model has no class names), one row per input image, in input order. Rows
    are written batch by batch, so an interrupted run keeps what it predicted. With several processes
    each writes its own part (``<output>.rank<r>``, rows tagged with their input index) and rank 0
    merges exactly this run's parts: sorted by input index, the duplicates that Lightning's
    ``DistributedSampler`` pads with dropped; part files left by an earlier run are never read.

    Args:
        output: CSV path (default: ``predictions.csv`` in the Trainer's log folder).
    """

    def __init__(self, output: str | None = None):
        super().__init__(write_interval="batch")
        self.output = output
        self._file = None
        self._writer = None
        self._tagged = False
        self.path: str | None = None

    def _final_path(self, trainer: Trainer) -> str:
        return self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.csv")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = self._final_path(trainer)
        self._tagged = trainer.world_size > 1
        self.path = final if not self._tagged else part_path(final, trainer.global_rank)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._names = getattr(pl_module, "label_names", None)
        self._file = open(self.path, "w", newline="")  # truncates this rank's part of an earlier run
        self._writer = csv.writer(self._file)
        header = prediction_columns(self._names, getattr(pl_module, "num_classes", 0))
        self._writer.writerow((["index"] if self._tagged else []) + header)

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        probs: torch.Tensor = prediction["probs"]
        indices = _batch_indices(batch, batch_indices, len(prediction["path"]))
        for index, path, row in zip(indices, prediction["path"], probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            label = self._names[best] if self._names else best
            self._writer.writerow(([index] if self._tagged else []) + [path, label] + [f"{p:.6g}" for p in row])
        self._file.flush()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        final = self._final_path(trainer)
        if self._tagged:
            trainer.strategy.barrier("prediction_writer")
            if trainer.is_global_zero:
                merge_prediction_parts(final, trainer.world_size)
            trainer.strategy.barrier("prediction_writer_merged")
            self.path = final
        rank_zero_info(f"Predictions written to {final}")


def part_path(final: str, rank: int) -> str:
    """The part file of process ``rank`` for the predictions CSV ``final``."""
    return f"{final}.rank{rank}"


def _batch_indices(batch: Any, batch_indices: Sequence[int] | None, n: int) -> list[int]:
    if isinstance(batch, dict) and "index" in batch:
        return [int(i) for i in torch.as_tensor(batch["index"]).tolist()]
    if batch_indices is not None:
        return [int(i) for i in batch_indices]
    return [-1] * n


def merge_prediction_parts(final: str, world_size: int) -> str:
    """Merge the part files of ranks ``0..world_size-1`` into ``final`` (rows in input order, each input
    once) and delete them. Only this run's ranks are read: a ``.rank7`` left by an earlier run on more
    processes is not. Raises ``FileNotFoundError`` naming a missing part."""
    header, rows = None, {}
    for rank in range(world_size):
        part = part_path(final, rank)
        if not os.path.isfile(part):
            raise FileNotFoundError(f"{part}: the predictions of rank {rank} are missing")
        with open(part, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)[1:]
            for row in reader:
                rows.setdefault(int(row[0]), row[1:])  # DistributedSampler pads with repeated inputs
    tmp = f"{final}.tmp"
    with open(tmp, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows[i] for i in sorted(rows))
    os.replace(tmp, final)
    for rank in range(world_size):
        os.remove(part_path(final, rank))
    return final


class HubExport(Callback):
    """At the end of ``fit``, turn the best checkpoint (else the last) into a Hub-format model folder
    with :func:`timm_stream.save_pretrained` (config.json, model.safetensors, README.md model card
    filled with the checkpoint's metrics). ``scripts/push_to_hub.py`` uploads such a folder or any
    checkpoint.

    Args:
        dirpath: output folder (default: ``hub_model`` in the Trainer's log folder).
        card: extra model-card fields (license, datasets, training_data...).
    """

    def __init__(self, dirpath: str | None = None, card: dict[str, Any] | None = None):
        self.dirpath = dirpath
        self.card = card
        self.exported_to: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or \
            getattr(trainer.checkpoint_callback, "last_model_path", "")
        if not checkpoint or not os.path.isfile(checkpoint):
            rank_zero_warn("HubExport: no checkpoint was saved, nothing to export")
            return
        from .export import export_checkpoint

        directory = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hub_model")
        try:
            export_checkpoint(checkpoint, directory, card=self.card)
        except ImportError as exc:  # timm_stream.save_pretrained not available
            rank_zero_warn(f"HubExport: cannot export ({exc})")
            return
        self.exported_to = directory
        rank_zero_info(f"Exported {checkpoint} as a Hub-format model in {directory}")
