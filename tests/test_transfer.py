"""The tile feed's order (engine/transfer.py): each tile's copy starts before the previous tile is handed
over, so that on a GPU the copy overlaps that tile's compute. The CUDA feed itself runs in test_cuda.py."""
from __future__ import annotations

import torch

from timm_stream.engine.transfer import staged


class RecordingFeed:
    def __init__(self):
        self.events = []

    def submit(self, region):
        self.events.append(("submit", int(region.item())))
        return region

    def take(self, handle):
        self.events.append(("take", int(handle.item())))
        return handle


def test_each_copy_starts_one_tile_ahead():
    feed = RecordingFeed()
    got = []
    for t in staged((torch.tensor(i) for i in range(4)), feed):
        got.append(int(t.item()))
        feed.events.append(("compute", got[-1]))
    assert got == [0, 1, 2, 3]
    assert feed.events == [("submit", 0), ("submit", 1), ("take", 0), ("compute", 0), ("submit", 2),
                           ("take", 1), ("compute", 1), ("submit", 3), ("take", 2), ("compute", 2),
                           ("take", 3), ("compute", 3)]


def test_one_and_no_tiles():
    feed = RecordingFeed()
    assert [int(t.item()) for t in staged([torch.tensor(7)], feed)] == [7]
    assert list(staged([], feed)) == []
