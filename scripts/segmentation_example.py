"""A small FPN-style segmentation model on a streamed encoder, trained for a few steps on one generated
large image with a dense mask (CPU, offline, ~1-2 minutes). Prints the loss after each step.

The encoder is ``timm.create_model("stream_resnet18", features_only=True, out_indices=(1, 2, 3, 4))``:
its four stage maps (reductions 4, 8, 16, 32) come from the streamed stages, exactly as the un-tiled
network would compute them; the decoder (lateral 1x1 convs, top-down upsampling and sums, a 3x3 conv,
a 1x1 classifier at reduction 4, upsampled to the image) is ordinary PyTorch on those maps. The loss is
per-pixel binary cross-entropy against the mask; gradients reach every encoder parameter through the
streamed pieces.

    python scripts/segmentation_example.py [--size 640] [--tile 256] [--steps 6]
"""
from __future__ import annotations

import argparse
import math
import time

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import timm_stream  # noqa: F401 - registers stream_<arch>


class FPNDecoder(nn.Module):
    """Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017), reduced
    to what dense binary segmentation needs: ``forward(features) -> (N, classes, H/r0, W/r0)`` logits at
    the finest feature's reduction ``r0``."""

    def __init__(self, channels: list[int], width: int = 32, classes: int = 1):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(width, classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(self.lateral[-2::-1], features[-2::-1]):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="nearest")
        return self.classify(self.smooth(x))


class Segmenter(nn.Module):
    def __init__(self, tile_size: int):
        super().__init__()
        self.encoder = timm.create_model("stream_resnet18", features_only=True, out_indices=(1, 2, 3, 4),
                                         tile_size=tile_size)
        self.decoder = FPNDecoder(self.encoder.feature_info.channels())

    def forward(self, image: Tensor) -> Tensor:
        logits = self.decoder(self.encoder(image))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def generate(size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """An (1, 3, size, size) float image of textured discs on a noisy background and its (1, 1, size,
    size) mask (1 inside the discs)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    mask = torch.zeros(size, size)
    for _ in range(max(4, size * size // 40000)):
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        r = float(torch.empty(1).uniform_(size / 40, size / 12, generator=g))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    texture = torch.sin(xx / 3) * torch.cos(yy / 4)
    image = 0.3 * torch.randn(3, size, size, generator=g) + mask * (0.8 + 0.3 * texture)
    return image[None], mask[None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=256, help="tile side in input pixels")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    image, mask = generate(args.size)
    model = Segmenter(args.tile).train()
    plan = model.encoder.stream_plan((args.size, args.size))
    print(plan)
    # weigh the rarer class up so that "all background" is not a plateau
    positive = float(mask.mean())
    pos_weight = torch.tensor([(1 - positive) / max(positive, 1e-6)])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(image), mask, pos_weight=pos_weight)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)")
    with torch.no_grad():
        prediction = model(image) > 0
        iou = float((prediction & (mask > 0)).sum() / (prediction | (mask > 0)).sum().clamp(min=1))
    print(f"{args.size}x{args.size} image, {plan.num_tiles} tiles per pass, mask covers {positive:.1%}: loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}, IoU {iou:.3f}, {time.perf_counter() - start:.0f} s")
    if not all(math.isfinite(v) for v in losses) or losses[-1] >= losses[0]:
        raise SystemExit("the loss did not decrease")


if __name__ == "__main__":
    main()
