"""``timm-stream``: the LightningCLI of :class:`StreamingClassifier` + :class:`LargeImageDataModule`.

    timm-stream fit      --config recipes/resnet50_8192.yaml
    timm-stream validate --config recipes/resnet50_8192.yaml --ckpt_path path/to/best.ckpt
    timm-stream test     --config recipes/resnet50_8192.yaml --ckpt_path path/to/best.ckpt
    timm-stream predict  --config recipes/resnet50_8192.yaml --ckpt_path path/to/best.ckpt \\
                         --data.predict slides/ --predictions.output predictions.csv
    timm-stream demo     [--images 48 --size 1024 --epochs 4 ...]
    timm-stream plan     stream_resnet50 --image-size 65536 --memory-budget 20GiB [--precision bf16-mixed]

Everything is LightningCLI's own (``--help``, ``--print_config``, ``--trainer.*``, ``--model.*``,
``--data.*``), plus: ``--predictions.output`` (the CSV ``predict`` writes) and atomic checkpoint writes
(:class:`AtomicCheckpointIO` is added to the Trainer unless the config names another CheckpointIO).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from .callbacks import PredictionWriter
from .checkpoint import AtomicCheckpointIO
from .data import LargeImageDataModule
from .module import StreamingClassifier

__all__ = ["StreamingCLI", "main"]

DESCRIPTION = ("Fine-tune stream_<arch> timm models on large images, tile by tile. Subcommands: fit, validate, "
               "test, predict (LightningCLI; e.g. --config recipes/<name>.yaml), demo (timm-stream demo --help) "
               "and plan (timm-stream plan --help).")


DEMO_HELP = ("Fine-tune stream_test_resnet on generated 1024x1024 images (CPU, offline, a few minutes); writes "
             "under ./timm_stream_demo. Options: timm-stream demo --help")

PLAN_HELP = ("Print the streaming plan of a model for an image size, its predicted peak memory and time relative "
             "to un-tiled, and whether un-tiled fits a --memory-budget (nothing allocated, nothing downloaded). "
             "Options: timm-stream plan --help")


class StreamingCLI(LightningCLI):
    """LightningCLI with the streaming model and data module, the predictions writer and atomic
    checkpoint writes. Optimizer and scheduler are the model's ``optimizer``/``scheduler`` arguments
    (``class_path`` + ``init_args`` in YAML)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("auto_configure_optimizers", False)  # model.optimizer / model.scheduler instead
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", DESCRIPTION)
        super().__init__(StreamingClassifier, LargeImageDataModule, *args, parser_kwargs=parser_kwargs, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # Lightning's fit/validate/test/predict, plus `demo` and `plan` in the help's list of subcommands
        # (main() runs them before the CLI is built; their own options: timm-stream demo|plan --help).
        add_subcommands, actions = parser.add_subcommands, []
        parser.add_subcommands = lambda *a, **k: actions.append(add_subcommands(*a, **k)) or actions[-1]
        try:
            super()._add_subcommands(parser, **kwargs)
        finally:
            del parser.add_subcommands
        actions[0].add_subcommand("demo", LightningArgumentParser(description=DEMO_HELP), help=DEMO_HELP)
        actions[0].add_subcommand("plan", LightningArgumentParser(description=PLAN_HELP), help=PLAN_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        if self.subcommand in ("validate", "test", "predict"):
            # Only fit's config reproduces a model. Lightning's SaveConfigCallback would refuse a second
            # predict run into the same folder (config.yaml exists) or clobber the training run's config.
            self.save_config_callback = None
        return super().instantiate_trainer(**kwargs)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``timm-stream`` console command (exit status)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "plan":
        from .plan_cli import main as plan_main

        return plan_main(argv[1:])
    StreamingCLI(args=argv if args is not None else None)
    return 0


if __name__ == "__main__":  # python -m timm_stream.lightning.cli
    sys.exit(main())
