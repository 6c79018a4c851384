"""timm glue: ``stream_<arch>`` models registered in timm's registry (imported by ``timm_stream``)."""
from ._builder import DEFAULT_TILE_SIZE, STREAM_PREFIX, base_name, create_stream_model, stream_name
from ._families import FAMILY_STEPS, TrunkSplit, split_trunk
from ._features import StreamFeatureNet
from ._registry import architectures, register_all
from ._stream_model import InputNormalizer, StreamingModelMixin

REGISTERED = register_all()

__all__ = [
    "REGISTERED", "DEFAULT_TILE_SIZE", "STREAM_PREFIX", "FAMILY_STEPS", "TrunkSplit", "InputNormalizer",
    "StreamingModelMixin", "StreamFeatureNet", "architectures", "base_name", "create_stream_model", "split_trunk",
    "stream_name",
]
