"""timm_stream: train timm CNNs end-to-end on images too large for memory, tile by tile, exactly.

``import timm_stream`` registers ``stream_<arch>`` models in timm::

    model = timm.create_model("stream_resnet50", pretrained=True, tile_size=2048, num_classes=2)
"""
from .engine import NonLocalModuleError, StreamingCNN, StreamingError, TileTooSmallError
from . import models  # registers stream_<arch> in timm
from .io import LazyImage, open_image, tissue_mask
from .hub import load_pretrained, push_to_hub, render_model_card, save_pretrained, validate_config

__version__ = "0.1.0"
__all__ = ["StreamingCNN", "StreamingError", "NonLocalModuleError", "TileTooSmallError", "models",
           "save_pretrained", "push_to_hub", "load_pretrained", "validate_config", "render_model_card",
           "open_image", "tissue_mask", "LazyImage"]
