"""``timm-stream plan``: what training a ``stream_<arch>`` model on images of a given size will cost,
before anything runs.

    timm-stream plan stream_resnet50 --image-size 65536 --memory-budget 20GiB --precision bf16-mixed

builds the model (random weights: nothing is downloaded), asks the engine for its plan
(:meth:`StreamingModelMixin.stream_plan`, a shape-only trace: the image is never allocated) and
prints it with the predicted peak memory of the streamed part, the predicted step time relative to
the un-tiled network, and whether the un-tiled network would fit in the budget. A budget below the
smallest workable one prints the engine's :class:`~timm_stream.engine.MemoryBudgetError` (which
names that minimum) and exits with status 2, as do other bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
from torch import nn

__all__ = ["PRECISION_DTYPES", "build_parser", "create_model_for_plan", "describe_plan", "main"]

# Lightning's precision names -> the dtype the activations have. "-mixed" runs the network under
# autocast with float32 weights: planned as the half dtype throughout (convolution outputs and the
# activations autograd keeps are half; weights and their gradients are outside the budget anyway).
PRECISION_DTYPES = {
    "64": torch.float64, "64-true": torch.float64,
    "32": torch.float32, "32-true": torch.float32,
    "16": torch.float16, "16-mixed": torch.float16, "16-true": torch.float16,
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
}

DESCRIPTION = ("Print how a stream_<arch> model would stream images of a given size: tiles, pieces, the predicted "
               "peak memory of the streamed part (one forward + backward, beyond weights and input) and its "
               "step time relative to the un-tiled network, and whether the un-tiled network fits in the "
               "budget. Runs only a shape trace: the image is never allocated and no weights are downloaded.")

EPILOG = ("examples:\n"
          "  timm-stream plan stream_resnet50 --image-size 65536 --memory-budget 20GiB --precision bf16-mixed\n"
          "  timm-stream plan stream_resnet18 --image-size 8192,12288 --tile-size 2048\n"
          "exit status: 0 planned; 2 bad arguments or a memory budget below the smallest workable one "
          "(the message names it)")


def _positive_ints(text: str, what: str) -> tuple[int, int]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be one positive int (square) or 'H,W' in pixels, got {text!r}")
    return (values[0], values[-1])


def _image_size(text: str) -> tuple[int, int]:
    return _positive_ints(text, "--image-size")


def _tile_size(text: str) -> tuple[int, int]:
    return _positive_ints(text, "--tile-size")


def _memory(text: str) -> int:
    from timm_stream.engine import parse_memory

    try:
        return parse_memory(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-stream plan", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a registered streaming model, e.g. stream_resnet50 "
                                      "(timm.list_models('stream_*') lists them)")
    parser.add_argument("--image-size", type=_image_size, required=True, metavar="H[,W]",
                        help="image height and width in pixels (one value: square)")
    parser.add_argument("--memory-budget", type=_memory, default=None, metavar="BYTES",
                        help="memory one forward + backward of the streamed part may allocate: bytes or a "
                             "string such as 20GiB, 512MiB, 20GB, 1.5e9. The engine then chooses tiles and "
                             "kept tile graphs to fit (default: no budget; plan at the model's tile size)")
    parser.add_argument("--tile-size", type=_tile_size, default=None, metavar="T[,T]",
                        help="largest tile in input pixels (with --memory-budget: the largest the planner "
                             "may choose; without: the tile used, default the model's 2048)")
    parser.add_argument("--precision", choices=list(PRECISION_DTYPES), default="32-true",
                        help="Lightning's precision names (default 32-true). The model is converted to the "
                             "matching dtype for planning; the mixed precisions (16-mixed, bf16-mixed) are "
                             "approximated by their half dtype for all activations")
    parser.add_argument("--batch", type=_positive_int, default=1, help="images per batch (default 1)")
    parser.add_argument("--lazy", action="store_true",
                        help="plan for a lazy (whole-slide) image read tile by tile, e.g. from "
                             "timm_stream.open_image")
    parser.add_argument("--stream-stages", type=int, default=None, metavar="K",
                        help="stem plus this many stages run streamed (default: all that are local)")
    parser.add_argument("--global-pool", default=None,
                        help="the model's global pooling (timm's names or 'attention'; default: the "
                             "model's). With every stage streamed avg/max/avgmax/catavgmax/attention pool "
                             "while streaming and no final map is stitched")
    parser.add_argument("--in-chans", type=_positive_int, default=None, help="input channels (default 3)")
    parser.add_argument("--device", default="cpu",
                        help="device the model is put on for planning (default cpu); the plan is for that "
                             "device, e.g. cuda")
    return parser


def create_model_for_plan(args: argparse.Namespace) -> nn.Module:
    """The model ``args`` describe, random weights (``pretrained=False``: nothing is downloaded), in
    eval mode, converted to the precision's dtype and put on ``args.device``.

    Raises:
        ValueError: an unknown model name (the message lists the registered ones) or an argument the
            model refuses (e.g. a tile smaller than its receptive field allows).
    """
    import timm

    from .module import check_model_name

    check_model_name(args.model)
    kwargs = {}
    for key in ("memory_budget", "tile_size", "stream_stages", "global_pool", "in_chans"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    return model.to(device=args.device, dtype=PRECISION_DTYPES[args.precision]).eval()


def describe_plan(model: nn.Module, plan, args: argparse.Namespace) -> str:
    """The text ``timm-stream plan`` prints for ``plan`` (from ``model.stream_plan``)."""
    from timm_stream.engine import format_bytes

    (h, w), budget = plan.input_size, plan.memory_budget
    lines = [f"{args.model}: {args.batch} x {model.streamer.in_channels} x {h} x {w} image"
             f"{'s' if args.batch > 1 else ''} ({'lazy, ' if args.lazy else ''}precision {args.precision}, "
             f"{str(PRECISION_DTYPES[args.precision]).replace('torch.', '')} activations), "
             f"stem + {model.stream_stages} stages streamed",
             str(plan), ""]
    within = "" if budget is None else f" (budget {format_bytes(budget)})"
    lines.append(f"predicted peak memory of the streamed part: {format_bytes(plan.peak_memory)}{within}")
    lines.append(f"predicted step time relative to un-tiled: {plan.relative_time:.2f}x")
    if budget is None:
        lines.append(f"un-tiled, the streamed part would need {format_bytes(plan.untiled_memory)} "
                     "(no --memory-budget given to compare with)")
    else:
        verdict = "fits" if plan.fits_untiled else "does NOT fit"
        lines.append(f"un-tiled, the streamed part would need {format_bytes(plan.untiled_memory)}: {verdict} "
                     f"in the budget of {format_bytes(budget)}")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = PRECISION_DTYPES[args.precision]
    image = args.batch * model.streamer.in_channels * h * w * dtype.itemsize
    lines.append(f"not counted above: the weights ({format_bytes(params)} in this precision) with their gradients "
                 "and optimizer states, the input image ("
                 + ("lazy: read tile by tile" if args.lazy else
                    f"{format_bytes(image)} as a {str(dtype).replace('torch.', '')} tensor, "
                    f"{format_bytes(image // dtype.itemsize)} as uint8 with normalize_input; --lazy for whole "
                    "slides read tile by tile")
                 + ")" + (", the activations of the un-streamed stages" if model.stream_stages < _local(model) else ""))
    return "\n".join(lines)


def _local(model: nn.Module) -> int:
    """The most stages this architecture can stream (registered with it)."""
    from timm_stream.models import architectures, base_name

    return architectures().get(base_name(model.pretrained_cfg["architecture"]), model.stream_stages)


def main(argv: Sequence[str] | None = None) -> int:
    """``timm-stream plan ...``: print the plan; exit status 0, or 2 for bad arguments (argparse's) and a
    memory budget below the smallest workable one (the engine's message, naming it, on stderr)."""
    from timm_stream.engine import MemoryBudgetError, StreamingError

    args = build_parser().parse_args(argv)
    try:
        model = create_model_for_plan(args)
        plan = model.stream_plan(args.image_size, lazy=args.lazy, batch=args.batch)
    except MemoryBudgetError as exc:
        print(f"timm-stream plan: {exc}", file=sys.stderr)
        return 2
    except (StreamingError, ValueError) as exc:  # e.g. a tile below the receptive field, an unknown model
        print(f"timm-stream plan: error: {exc}", file=sys.stderr)
        return 2
    print(describe_plan(model, plan, args))
    return 0


if __name__ == "__main__":  # python -m timm_stream.lightning.plan_cli
    sys.exit(main())
