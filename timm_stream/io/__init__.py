"""Slide and image files: lazy, region-wise reading (``open_image``), pyramid levels and microns per
pixel, tissue masks, integrity checks. Depends on torch, numpy, tifffile, imagecodecs and Pillow only
(OpenSlide / tiffslide when installed); never on timm, the engine or Lightning."""
from .check import check_image
from .errors import ImageReadError
from .image import LazyImage, OrientedImage, is_lazy_image
from .levels import choose_level
from .open import open_image
from .openslide_backend import OpenSlideImage, openslide_available
from .pil import PILImage
from .tiff import TIFF_SUFFIXES, TiffImage
from .tissue import otsu_threshold, tissue_mask

__all__ = ["open_image", "tissue_mask", "check_image", "LazyImage", "OrientedImage", "TiffImage", "OpenSlideImage",
           "PILImage", "ImageReadError", "is_lazy_image", "choose_level", "openslide_available", "otsu_threshold",
           "TIFF_SUFFIXES"]
