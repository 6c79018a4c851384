"""The streaming engine: pure torch, no timm. See :class:`StreamingCNN`."""
from .errors import NonLocalModuleError, StreamingError, TileTooSmallError, TraceError
from .geometry import AxisGeometry, AxisTile, PerAxisGeometry, plan_axis
from .plan import Tile, TilePlan, make_plan, normalize_tile_size
from .streaming import StreamGeometry, StreamingCNN, StreamPlan, freeze_norm_layers, is_norm_layer
from .trace import Trace, trace

__all__ = [
    "StreamingCNN", "StreamGeometry", "StreamPlan", "TilePlan", "Tile", "AxisGeometry", "AxisTile", "plan_axis",
    "make_plan", "normalize_tile_size", "PerAxisGeometry", "Trace", "trace", "freeze_norm_layers", "is_norm_layer",
    "StreamingError", "NonLocalModuleError", "TileTooSmallError", "TraceError",
]
