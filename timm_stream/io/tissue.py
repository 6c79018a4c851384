"""Tissue masks: Otsu's threshold on the saturation of a low-resolution view of the slide.

Method: the saturation channel of HSV (``(max - min) / max`` over R, G, B) separates stained tissue
from the bright, grey background of a brightfield slide; a 2-D median filter removes speckle and Otsu's
threshold (N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. SMC 9(1),
1979) splits the histogram. This is the segmentation of CLAM (M. Y. Lu et al., "Data-efficient and weakly
supervised computational pathology on whole-slide images", Nature Biomedical Engineering 5, 2021:
median blur + Otsu on saturation), used widely in whole-slide pipelines. Single-channel images use
darkness (255 - gray) instead of saturation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .image import OrientedImage

__all__ = ["tissue_mask", "otsu_threshold", "thumbnail"]


def otsu_threshold(values: Tensor) -> int:
    """Otsu's threshold of uint8 ``values``: the ``t`` maximizing the between-class variance of
    ``values <= t`` and ``values > t`` (Otsu 1979)."""
    hist = torch.bincount(values.flatten().long(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64)
    weight0 = hist.cumsum(0)
    weight1 = hist.sum() - weight0
    sum0 = (hist * levels).cumsum(0)
    mean0 = sum0 / weight0.clamp(min=1)
    mean1 = (sum0[-1] - sum0) / weight1.clamp(min=1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(between.argmax())


def thumbnail(image: Any, max_size: int = 1024, band_bytes: int = 64 << 20) -> Tensor:
    """``image`` (tensor or lazy image ``(N, C, H, W)``) reduced by an integer factor ``f`` (mean of
    ``f x f`` blocks, the last ones partial) so that its longer side is at most ``max_size``: read in bands
    of rows of about ``band_bytes``, so the whole image is never held. Returns float32 ``(N, C, h, w)``."""
    n, c, height, width = image.shape
    f = max(1, math.ceil(max(height, width) / max_size))
    rows = max(f, (band_bytes // max(1, n * c * width)) // f * f)
    bands = []
    for r0 in range(0, height, rows):
        band = image[:, :, r0:min(height, r0 + rows), :].float()
        bands.append(F.avg_pool2d(band, f, ceil_mode=True) if f > 1 else band)
    return torch.cat(bands, dim=2)


def _lowest_level(image: Any) -> Any:
    """The lowest-resolution level of a multi-level lazy image; the image itself otherwise."""
    shapes = getattr(image, "level_shapes", None)
    if shapes and len(shapes) > 1 and hasattr(image, "at_level"):
        return image.at_level(len(shapes) - 1)
    return image


def tissue_mask(image: Any, *, max_size: int = 1024, min_threshold: int = 15, median: int = 5) -> Tensor:
    """Which parts of a slide hold tissue: a bool ``(N, 1, h, w)`` mask covering the whole image.

    Mask pixel ``(i, j)`` stands for the image rows ``[i*H/h, (i+1)*H/h)`` and columns ``[j*W/w, (j+1)*W/w)``.
    Computed from the image's lowest-resolution pyramid level (a slide's level 0 is never read); a
    single-resolution image is read in bands and reduced. Views (:class:`OrientedImage`) get their base's
    mask, flipped/rotated the same way.

    Args:
        image: a lazy image (``timm_stream.open_image``) or a uint8 tensor ``(N, C, H, W)``, C = 3 (RGB) or 1.
        max_size: longest side of the mask in pixels (the lowest level is reduced further to fit).
        min_threshold: the saturation threshold (0..255) is at least this, so a slide without tissue
            (only background noise) gives an (almost) empty mask instead of half of its noise.
        median: side of the median filter (odd; 1: none).

    Returns:
        ``torch.bool`` tensor ``(N, 1, h, w)``, ``max(h, w) <= max_size``.

    Method: Otsu's threshold on HSV saturation after a median filter (Otsu 1979; CLAM, Lu et al. 2021).
    """
    if isinstance(image, OrientedImage):
        return image.orient(tissue_mask(image.base, max_size=max_size, min_threshold=min_threshold, median=median))
    small = thumbnail(_lowest_level(image), max_size=max_size)
    if small.shape[1] >= 3:
        rgb = small[:, :3]
        high, low = rgb.amax(1, keepdim=True), rgb.amin(1, keepdim=True)
        signal = torch.where(high > 0, (high - low) / high.clamp(min=1e-6) * 255, torch.zeros_like(high))
    else:
        signal = 255 - small[:, :1]
    signal = signal.round().clamp(0, 255).to(torch.uint8)
    if median > 1:
        pad = median // 2
        padded = F.pad(signal.float(), (pad, pad, pad, pad), mode="replicate")
        windows = F.unfold(padded, median)  # (N, median², h*w)
        signal = windows.median(dim=1).values.view_as(signal).to(torch.uint8)
    masks = []
    for values in signal:  # one threshold per image
        masks.append(values > max(otsu_threshold(values), min_threshold))
    return torch.stack(masks)
