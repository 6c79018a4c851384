"""timm_stream: train timm CNNs end-to-end on images too large for memory, tile by tile, exactly."""
from .engine import NonLocalModuleError, StreamingCNN, StreamingError, TileTooSmallError

__version__ = "0.1.0"
__all__ = ["StreamingCNN", "StreamingError", "NonLocalModuleError", "TileTooSmallError"]
