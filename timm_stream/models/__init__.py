"""timm glue: ``stream_<arch>`` models registered in timm's registry (imported by ``timm_stream``)."""
from ._builder import (DEFAULT_TILE_SIZE, STREAM_PREFIX, base_name, check_stream_stages, create_stream_model,
                       stream_name)
from ._families import FAMILY_STEPS, STAGE_REDUCTIONS, TrunkSplit, split_trunk
from ._features import StreamFeatureNet
from ._registry import architectures, register_all
from ._stream_model import InputNormalizer, StreamingModelMixin
from ._source import (PICKLE_SUFFIXES, WEIGHTS_NAME, LargeTileWarning, check_label_names, check_model_args,
                      pin_revision, validate_config)

REGISTERED = register_all()

__all__ = [
    "REGISTERED", "DEFAULT_TILE_SIZE", "STREAM_PREFIX", "FAMILY_STEPS", "STAGE_REDUCTIONS", "TrunkSplit",
    "InputNormalizer", "StreamingModelMixin", "StreamFeatureNet", "architectures", "base_name", "check_stream_stages",
    "create_stream_model", "split_trunk", "stream_name",
    "validate_config", "check_model_args", "check_label_names", "pin_revision", "WEIGHTS_NAME", "PICKLE_SUFFIXES",
    "LargeTileWarning",
]
