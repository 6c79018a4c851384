"""What a trace records: per operation (:class:`OpRecord`), per input-dependent tensor (:class:`Map`),
and for the whole traced function (:class:`Trace`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..geometry import AxisGeometry

__all__ = ["OpRecord", "Trace", "Map"]


@dataclass(frozen=True)
class OpRecord:
    """One operation on an input-dependent map: where it was issued, what it was, and its
    size-independent parameters."""

    module: str
    op: str
    key: tuple


@dataclass(frozen=True)
class Trace:
    """What a trace learned about ``fn`` for one input shape."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype
    axes: tuple[AxisGeometry, AxisGeometry]  # receptive field of the output, per spatial axis
    align: tuple[int, int]  # lcm of all intermediate strides, per axis
    records: tuple[OpRecord, ...]
    activation_elements: int  # elements of all input-dependent tensors allocated, batch included

    @property
    def stride(self) -> tuple[int, int]:
        return (self.axes[0].stride, self.axes[1].stride)


@dataclass(frozen=True)
class Map:
    """An input-dependent tensor: which of its dims are (H, W), and their geometry."""

    dims: tuple[int, int]
    axes: tuple[AxisGeometry, AxisGeometry]

    def moved(self, dims: Sequence[int]) -> "Map":
        return Map((dims[0], dims[1]), self.axes)

    def union(self, other: "Map") -> "Map":
        return Map(self.dims, (self.axes[0].union(other.axes[0]), self.axes[1].union(other.axes[1])))
