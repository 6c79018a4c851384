"""Lightning fine-tuning of ``stream_<arch>`` models on large images.

* :class:`StreamingClassifier` -- LightningModule (automatic optimization, torchmetrics, CLI-configurable
  optimizer/scheduler).
* :class:`LargeImageDataModule` -- CSV / folder layouts of TIFF (tiled, pyramidal), PNG and JPEG images.
* :class:`AtomicCheckpointIO` -- checkpoint writes that never leave a partial file.
* :class:`PredictionWriter`, :class:`HubExport` -- predictions CSV, Hub-format export of the best checkpoint.
* ``timm-stream`` console command (:mod:`.cli`): ``fit|validate|test|predict --config recipes/<name>.yaml``
  and ``demo``.
"""
from .callbacks import HubExport, PredictionWriter
from .checkpoint import AtomicCheckpointIO, atomic_torch_save
from .data import (DataValidationError, ImageReadError, LargeImageDataModule, LargeImageDataset, collate_images,
                   read_image, read_image_info, validate_entries)
from .memory import MemoryEstimate, estimate_training_memory
from .module import CHECKPOINT_KEY, StreamingClassifier, pretrained_weights_cached

__all__ = [
    "StreamingClassifier", "LargeImageDataModule", "LargeImageDataset", "collate_images", "read_image",
    "read_image_info", "validate_entries", "DataValidationError", "ImageReadError", "AtomicCheckpointIO",
    "atomic_torch_save", "PredictionWriter", "HubExport", "MemoryEstimate", "estimate_training_memory",
    "CHECKPOINT_KEY", "pretrained_weights_cached",
]
