"""The streaming engine: pure torch, no timm. See :class:`StreamingCNN`."""
from .errors import MemoryBudgetError, NonLocalModuleError, StreamingError, TileTooSmallError, TraceError
from .geometry import AxisGeometry, AxisTile, PerAxisGeometry, plan_axis
from .lazy import is_lazy_image
from .memory import format_bytes, parse_memory
from .plan import Tile, TilePlan, make_plan, normalize_tile_size
from .reducers import (AttentionReducer, AvgMaxReducer, AvgReducer, CatAvgMaxReducer, MaxReducer, Reducer,
                       REDUCER_NAMES, make_reducer)
from .streaming import StreamGeometry, StreamingCNN, StreamPlan, final_mask, freeze_norm_layers, is_norm_layer
from .trace import Trace, trace

__all__ = [
    "StreamingCNN", "StreamGeometry", "StreamPlan", "TilePlan", "Tile", "AxisGeometry", "AxisTile", "plan_axis",
    "make_plan", "normalize_tile_size", "PerAxisGeometry", "Trace", "trace", "freeze_norm_layers", "is_norm_layer",
    "is_lazy_image", "final_mask", "Reducer", "AvgReducer", "MaxReducer", "AvgMaxReducer", "CatAvgMaxReducer",
    "AttentionReducer", "REDUCER_NAMES", "make_reducer",
    "StreamingError", "NonLocalModuleError", "TileTooSmallError", "TraceError", "MemoryBudgetError",
    "parse_memory", "format_bytes",
]
