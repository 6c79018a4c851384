"""The size-independence check: two traces at different input sizes must run the same operations."""
from __future__ import annotations

from ..errors import NonLocalModuleError
from .records import Trace

__all__ = ["check_size_independent"]


def check_size_independent(reference: Trace, other: Trace) -> None:
    """Raise if two traces at different input sizes ran different operations: the module then computes
    something that depends on the input size (e.g. 'same' padding computed at run time), and a tile
    would be computed differently from the image."""
    for a, b in zip(reference.records, other.records):
        if a != b:
            raise NonLocalModuleError(
                a.module, a.op,
                f"it depends on the input size (at {reference.input_shape[2:]} it ran {a.op}{a.key}, "
                f"at {other.input_shape[2:]} {b.op}{b.key}), e.g. padding computed at run time like "
                "timm's Conv2dSame",
                "Use static padding (timm: a non-tf_ variant or pad_type='') in the streamed part",
            )
    if len(reference.records) != len(other.records):
        longer = reference if len(reference.records) > len(other.records) else other
        extra = longer.records[min(len(reference.records), len(other.records))]
        raise NonLocalModuleError(extra.module, extra.op,
                                  "it runs different operations depending on the input size")
