"""Host-to-device transfers of tiles that overlap the compute of the tile before them (CUDA).

A tile read from host memory (a slice of a CPU tensor, or a region of a lazy image) is copied into
page-locked ("pinned") memory and from there to the device on a side stream, one tile ahead: while the
device computes tile ``i`` on the current stream, the copy of tile ``i + 1`` runs on the copy engine.
The current stream waits for that copy through an event only when it uses the tile, so nothing
synchronizes the host per tile. Method: the CUDA programming guide's "overlap of data transfer and
kernel execution"; torch's idiom for it (``pin_memory``, ``non_blocking=True`` on a side stream,
``Tensor.record_stream`` so that the caching allocator does not reuse the memory while the current
stream may still read it).

Pinned buffers come from torch's caching host allocator, which records the copy on them and does not
hand a buffer out again before the copy finished, so reusing them needs no synchronization here.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["TileFeed", "staged"]


class TileFeed:
    """Copies host tiles to ``device`` (a CUDA device) on a side stream: :meth:`submit` starts a copy and
    returns a handle, :meth:`take` makes the current stream wait for it and returns the device tensor."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def submit(self, region: Tensor):
        if region.device.type != "cpu":
            return region, None
        pinned = region if region.is_pinned() else region.pin_memory()
        with torch.cuda.stream(self.stream):
            tensor = pinned.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return tensor, event

    def take(self, handle) -> Tensor:
        tensor, event = handle
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        return tensor


def staged(regions: Iterable[Tensor], feed) -> Iterator[Tensor]:
    """Yield the regions on the feed's device, each one's copy started before the previous one is handed
    over (one tile ahead). ``feed``: a :class:`TileFeed` or any object with ``submit`` and ``take``."""
    iterator = iter(regions)
    pending = None
    for region in iterator:
        handle = feed.submit(region)
        del region
        if pending is not None:
            yield feed.take(pending)
        pending = handle
    if pending is not None:
        yield feed.take(pending)
