"""Streamed global pooling ("reducers"): the pooled features of a feature map that is never stitched.

A reducer computes ``finalize(S)`` from statistics ``S = sum over tiles of stats(y_tile, mask_tile)``,
where each tile contributes only the final-map positions it *owns* (owned regions are disjoint, so every
position counts once). Forward runs the tiles without autograd and accumulates ``S``; ``finalize`` runs
with autograd, so the loss gives ``dL/dS`` once; backward then recomputes each tile with autograd and
pulls ``dL/dS`` through that tile's ``tile_statistics`` (whose sum over tiles is ``S``) into the trunk.
Parameter gradients (the attention's included) are summed over tiles once.

Why this is exact: every ``S`` is a sum (or, for max, a selection) over positions, and the functions of
``y`` that the tiles differentiate sum to the very function the un-tiled pooling differentiates.
Softmax attention uses a fixed shift ``m`` (the global maximum score found in forward, kept online
like FlashAttention's running maximum): ``sum e^(s-m) v / sum e^(s-m)`` does not depend on ``m``, so
differentiating with ``m`` held constant gives the exact gradient.

Masks: ``mask`` is a bool ``(N, 1, h, w)`` at the resolution of ``y``; positions where it is False are
excluded from the pooling. ``None`` means every position counts.

Every reducer also has ``reference(y, mask)`` (= ``forward``): the plain un-tiled pooling of a whole
map, written independently of the streamed arithmetic; the un-tiled model (``streaming = False``) uses
it, and the tests compare against it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Reducer", "AvgReducer", "MaxReducer", "AvgMaxReducer", "CatAvgMaxReducer", "AttentionReducer",
           "REDUCER_NAMES", "make_reducer"]

State = dict[str, Any]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision sums over millions of positions would lose the mean: accumulate in at least fp32
    return torch.promote_types(dtype, torch.float32)


def _positions(y: Tensor, origin: Sequence[int], map_size: Sequence[int]) -> Tensor:
    """Row-major index in the whole final map of each position of the owned crop ``y``: ``(h*w,)`` long."""
    h, w = y.shape[-2:]
    rows = torch.arange(origin[0], origin[0] + h, device=y.device)
    cols = torch.arange(origin[1], origin[1] + w, device=y.device)
    return (rows[:, None] * map_size[1] + cols[None, :]).reshape(-1)


class Reducer(nn.Module):
    """Base class. Shapes: ``y`` ``(N, C, h, w)`` (a tile's owned crop, or a whole map); ``mask``
    ``(N, 1, h, w)`` bool or None; ``origin`` the crop's (row, column) in the final map of size
    ``map_size``; the pooled output is ``(N, out_features(C))``, accumulated in ``y``'s dtype promoted
    to float32 at least and returned (by ``forward`` and :class:`~.streaming.StreamingCNN`) in ``y``'s
    dtype, as timm's pooling returns it. ``state`` is a dict of tensors owned by one streamed call."""

    name = ""

    def out_features(self, channels: int) -> int:
        return channels

    def start(self, y: Tensor) -> State:
        raise NotImplementedError

    def accumulate(self, state: State, y: Tensor, mask: Tensor | None, origin: Sequence[int],
                   map_size: Sequence[int]) -> None:
        """Add a tile's statistics to ``state`` (runs without autograd)."""
        raise NotImplementedError

    def statistics(self, state: State) -> tuple[Tensor, ...]:
        """The differentiable statistics ``S`` after the last tile."""
        raise NotImplementedError

    def finalize(self, stats: Sequence[Tensor], state: State) -> Tensor:
        """Pooled features from ``S`` (differentiable in ``stats``)."""
        raise NotImplementedError

    def tile_statistics(self, y: Tensor, mask: Tensor | None, origin: Sequence[int], map_size: Sequence[int],
                        state: State) -> tuple[Tensor, ...]:
        """This tile's share of ``S`` as a differentiable function of ``y`` (and of the reducer's
        parameters), against the finished ``state``: summed over tiles it equals ``statistics(state)``."""
        raise NotImplementedError

    def reference(self, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """The un-tiled pooling of a whole map ``(N, C, h, w)`` -> ``(N, out_features(C))``."""
        raise NotImplementedError

    def forward(self, y: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.reference(y, mask).to(y.dtype)

    def extra_repr(self) -> str:
        return f"'{self.name}'"


class AvgReducer(Reducer):
    """Mean over (unmasked) positions: ``S = (sum y,)`` with the position count kept aside."""

    name = "avg"

    def start(self, y: Tensor) -> State:
        dtype = _accumulation_dtype(y.dtype)
        n, c = y.shape[:2]
        return {"sum": y.new_zeros((n, c), dtype=dtype), "count": y.new_zeros((n, 1), dtype=dtype)}

    def _sum(self, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        y = y.to(_accumulation_dtype(y.dtype))
        if mask is None:
            return y.sum((2, 3)), y.new_full((y.shape[0], 1), float(y.shape[2] * y.shape[3]))
        return torch.where(mask, y, 0).sum((2, 3)), mask.sum((2, 3)).to(y.dtype)

    def accumulate(self, state, y, mask, origin, map_size):
        total, count = self._sum(y, mask)
        state["sum"] += total
        state["count"] += count

    def statistics(self, state):
        return (state["sum"],)

    def finalize(self, stats, state):
        return stats[0] / state["count"]

    def tile_statistics(self, y, mask, origin, map_size, state):
        return (self._sum(y, mask)[0],)

    def reference(self, y, mask=None):
        y = y.to(_accumulation_dtype(y.dtype))
        if mask is None:
            return y.mean((2, 3))
        return torch.where(mask, y, 0).sum((2, 3)) / mask.sum((2, 3)).to(y.dtype)


class MaxReducer(Reducer):
    """Maximum over (unmasked) positions, per channel. The gradient goes to one position: the first
    maximal one in row-major order of the whole map, which is where ``torch.nn.functional.
    adaptive_max_pool2d`` (timm's ``global_pool='max'``) sends it, so ties behave as the un-tiled model."""

    name = "max"

    def start(self, y: Tensor) -> State:
        n, c = y.shape[:2]
        dtype = _accumulation_dtype(y.dtype)
        return {"value": y.new_full((n, c), float("-inf"), dtype=dtype),
                "index": torch.full((n, c), torch.iinfo(torch.long).max, dtype=torch.long, device=y.device)}

    def accumulate(self, state, y, mask, origin, map_size):
        flat = y.to(_accumulation_dtype(y.dtype)).flatten(2)
        if mask is not None:
            flat = flat.masked_fill(~mask.flatten(2), float("-inf"))
        local = flat.argmax(2)  # documented: the first maximal index on ties
        value = flat.gather(2, local[..., None])[..., 0]
        index = _positions(y, origin, map_size)[local]
        better = (value > state["value"]) | ((value == state["value"]) & (index < state["index"]))
        state["value"] = torch.where(better, value, state["value"])
        state["index"] = torch.where(better, index, state["index"])

    def statistics(self, state):
        return (state["value"],)

    def finalize(self, stats, state):
        return stats[0]

    def tile_statistics(self, y, mask, origin, map_size, state):
        positions = _positions(y, origin, map_size)
        # where the global argmax lies in this tile, if it does
        hit = state["index"][..., None] == positions  # (N, C, h*w)
        inside = hit.any(2)
        local = hit.to(torch.uint8).argmax(2)
        value = y.to(_accumulation_dtype(y.dtype)).flatten(2).gather(2, local[..., None])[..., 0]
        return (torch.where(inside, value, 0),)

    def reference(self, y, mask=None):
        y = y.to(_accumulation_dtype(y.dtype))
        if mask is not None:
            y = y.masked_fill(~mask, float("-inf"))
        return F.adaptive_max_pool2d(y, 1).flatten(1)


class _Combined(Reducer):
    """Average and maximum together (timm's ``avgmax`` / ``catavgmax``)."""

    def __init__(self):
        super().__init__()
        self.parts = (AvgReducer(), MaxReducer())  # no parameters: kept out of the module tree

    def start(self, y):
        return {"parts": [part.start(y) for part in self.parts]}

    def accumulate(self, state, y, mask, origin, map_size):
        for part, sub in zip(self.parts, state["parts"]):
            part.accumulate(sub, y, mask, origin, map_size)

    def statistics(self, state):
        return tuple(s for part, sub in zip(self.parts, state["parts"]) for s in part.statistics(sub))

    def _split(self, stats):
        return stats[:1], stats[1:]

    def finalize(self, stats, state):
        return self.combine(*(part.finalize(s, sub) for part, s, sub in
                              zip(self.parts, self._split(stats), state["parts"])))

    def tile_statistics(self, y, mask, origin, map_size, state):
        return tuple(s for part, sub in zip(self.parts, state["parts"])
                     for s in part.tile_statistics(y, mask, origin, map_size, sub))

    def reference(self, y, mask=None):
        return self.combine(*(part.reference(y, mask) for part in self.parts))

    def combine(self, avg: Tensor, mx: Tensor) -> Tensor:
        raise NotImplementedError


class AvgMaxReducer(_Combined):
    """``0.5 * (avg + max)``, as timm's ``adaptive_avgmax_pool2d``."""

    name = "avgmax"

    def combine(self, avg, mx):
        return 0.5 * (avg + mx)


class CatAvgMaxReducer(_Combined):
    """``cat([avg, max], 1)``: ``(N, 2C)``, as timm's ``adaptive_catavgmax_pool2d``."""

    name = "catavgmax"

    def out_features(self, channels):
        return 2 * channels

    def combine(self, avg, mx):
        return torch.cat((avg, mx), 1)


class AttentionReducer(Reducer):
    """Gated attention MIL pooling (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
    Learning", ICML 2018, eq. 9): every final-map position ``k`` is an instance ``h_k`` (C channels),
    ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` over the (unmasked) positions, and the
    pooled feature is ``sum_k a_k h_k`` ``(N, C)``. Trainable parameters ``V``, ``U`` (``C -> hidden``)
    and ``w`` (``hidden -> 1``), PyTorch's default ``nn.Linear`` initialization.

    Streamed: ``S = (sum e^(s-m) h, sum e^(s-m))`` with the running maximum ``m`` of the scores
    (earlier sums rescaled when it grows, as in FlashAttention); ``m`` is then a constant shift."""

    name = "attention"

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.channels, self.hidden = int(channels), int(hidden)
        self.V = nn.Linear(self.channels, self.hidden)
        self.U = nn.Linear(self.channels, self.hidden)
        self.w = nn.Linear(self.hidden, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"

    def _instances(self, y: Tensor) -> Tensor:
        if y.shape[1] != self.channels:
            raise ValueError(f"attention pooling was built for {self.channels} channels, the feature map has "
                             f"{y.shape[1]}: build AttentionReducer({y.shape[1]})")
        return y.flatten(2).transpose(1, 2).to(_accumulation_dtype(y.dtype))  # (N, P, C)

    def scores(self, h: Tensor, mask: Tensor | None) -> Tensor:
        """Attention logits ``(N, P)`` of instances ``h`` ``(N, P, C)``; masked positions get -inf."""
        h = h.to(self.V.weight.dtype)
        s = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))[..., 0]
        if mask is not None:
            s = s.masked_fill(~mask.flatten(1), float("-inf"))
        return s

    def start(self, y):
        n, c = y.shape[:2]
        dtype = _accumulation_dtype(y.dtype)
        return {"shift": y.new_full((n,), float("-inf"), dtype=dtype), "num": y.new_zeros((n, c), dtype=dtype),
                "den": y.new_zeros((n,), dtype=dtype)}

    @staticmethod
    def _weights(s: Tensor, shift: Tensor) -> Tensor:
        # a sample with no unmasked position yet has shift -inf: its weights are 0, not nan
        return torch.exp(s - torch.where(torch.isfinite(shift), shift, 0)[:, None])

    def accumulate(self, state, y, mask, origin, map_size):
        h = self._instances(y)
        s = self.scores(h, mask).to(h.dtype)
        shift = torch.maximum(state["shift"], s.amax(1))
        rescale = torch.where(torch.isfinite(state["shift"]), torch.exp(state["shift"] - shift), 0)
        e = self._weights(s, shift)
        state["num"] = state["num"] * rescale[:, None] + torch.einsum("np,npc->nc", e, h)
        state["den"] = state["den"] * rescale + e.sum(1)
        state["shift"] = shift

    def statistics(self, state):
        return state["num"], state["den"]

    def finalize(self, stats, state):
        num, den = stats
        return num / den[:, None]

    def tile_statistics(self, y, mask, origin, map_size, state):
        h = self._instances(y)
        e = self._weights(self.scores(h, mask).to(h.dtype), state["shift"])
        return torch.einsum("np,npc->nc", e, h), e.sum(1)

    def reference(self, y, mask=None):
        h = self._instances(y)
        a = torch.softmax(self.scores(h, mask).to(h.dtype), dim=1)
        return torch.einsum("np,npc->nc", a, h)


REDUCER_NAMES = ("avg", "max", "avgmax", "catavgmax", "attention")


def make_reducer(name: str, channels: int | None = None, **kwargs: Any) -> Reducer:
    """A reducer by timm's ``global_pool`` name (``avg``, ``max``, ``avgmax``, ``catavgmax``) or
    ``attention`` (needs ``channels``; ``hidden=`` optional). Raises ``ValueError`` for other names."""
    simple = {"avg": AvgReducer, "max": MaxReducer, "avgmax": AvgMaxReducer, "catavgmax": CatAvgMaxReducer}
    if name in simple:
        return simple[name]()
    if name == "attention":
        if channels is None:
            raise ValueError("attention pooling needs the feature map's channels: make_reducer('attention', channels)")
        return AttentionReducer(channels, **kwargs)
    raise ValueError(f"global pooling {name!r} cannot be streamed; streamed pooling types: {REDUCER_NAMES}")
