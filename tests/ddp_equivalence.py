"""Helper of tests/test_lightning_ddp.py (not a test module: Lightning's ``ddp`` strategy re-launches
this script for rank 1, so it must be a standalone script).

    python tests/ddp_equivalence.py OUTDIR MODE

OUTDIR holds ``data.csv`` (two images of one size, labels 0 and 1). MODE:
  ddp     Trainer(strategy="ddp", accelerator="cpu", devices=2) (gloo), batch_size 1: each process sees
          one image per step; gradients are averaged across the processes.
  spawn   the same with strategy="ddp_spawn": the model is pickled into the worker processes.
  single  one process, batch_size 2: both images in every step.
  first   one process, only the first image (to show the comparison can fail).
Two optimization steps (SGD, lr 0.1) from the same seed; rank 0 writes ``params_<MODE>.pt`` with the
parameters and what the run was (world size, DDP wrapper, find_unused_parameters).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from timm_stream.lightning import LargeImageDataModule, StreamingClassifier  # noqa: E402

STEPS = 2


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


class RecordStrategy(Callback):
    """What the model is wrapped in while it trains (Lightning unwraps it at teardown)."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        wrapped = trainer.strategy.model
        self.seen = {
            "ddp_wrapped": isinstance(wrapped, torch.nn.parallel.DistributedDataParallel),
            "find_unused_parameters": bool(getattr(wrapped, "find_unused_parameters", False)),
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        }


def run(outdir: str, mode: str) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    model = StreamingClassifier(model_name="stream_test_resnet", num_classes=2, tile_size=64, optimizer=sgd)
    csv_path = os.path.join(outdir, "data.csv" if mode != "first" else "first.csv")
    data = LargeImageDataModule(csv=csv_path, batch_size=2 if mode == "single" else 1, num_workers=0,
                                augment=False)
    ddp = mode in ("ddp", "spawn")
    strategy = {"ddp": "ddp", "spawn": "ddp_spawn"}.get(mode, "auto")
    trainer = Trainer(accelerator="cpu", devices=2 if ddp else 1, strategy=strategy,
                      max_steps=STEPS, max_epochs=STEPS, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[record := RecordStrategy()])
    trainer.fit(model, data)
    if trainer.is_global_zero:
        torch.save({
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            **record.seen,
        }, os.path.join(outdir, f"params_{mode}.pt"))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
