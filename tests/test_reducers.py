"""Streamed pooling (reducers), masks and lazy inputs in the engine.

Exactness against the un-tiled module with the same pooling (float64, randomized weights and BN
statistics, batch 2, several tiles, non-aligned sizes), agreement with timm's own global pooling,
max ties, masks that skip tiles without reading them, lazy images read by region with prefetching, and
memory that does not grow with the image.
"""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import EXACT, streaming_setter, timm_trunk
from timm.layers import SelectAdaptivePool2d
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from timm_stream.engine import AttentionReducer, StreamingCNN, is_lazy_image, make_reducer
from timm_stream.testing import RecordingLazyImage, compare_streaming, randomize_, relative_error

POOLS = ["avg", "max", "avgmax", "catavgmax", "attention"]
SIZE = (83, 101)  # not a multiple of the trunk's stride 8
TILE = 76  # the trunk's receptive field is 55 px: several tiles


def pool_for(name: str, channels: int, seed: int = 3):
    if name != "attention":
        return make_reducer(name)
    return randomize_(AttentionReducer(channels, hidden=6), seed).double()


CHANNELS = 48  # test_resnet's layer2 channels


@pytest.fixture(scope="module")
def trunk():
    """timm's test_resnet up to layer2 (stride 8): every pooling x mask combination stays fast; the
    whole trunk is covered by test_whole_resnet_with_masked_attention_is_exact."""
    return randomize_(nn.Sequential(*list(timm_trunk("test_resnet").children())[:6]), seed=1).double()


def streamer(trunk, pool, **kwargs):
    s = StreamingCNN(trunk, TILE, pool=pool, stitch="none", **kwargs)  # one piece: the reducer path
    assert s.plan(SIZE, torch.float64).num_tiles >= 4
    return s


def check_exact(s, x, **kwargs):
    c = compare_streaming(s, x, streaming_setter(s), **kwargs)
    assert c.output <= EXACT and c.input_grad <= EXACT, c
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    assert set(c.param_grads) == trainable
    # w.bias shifts every attention score alike: its true gradient is 0, so only rounding remains
    worst = max(v for n, v in c.param_grads.items() if not n.endswith("pool.w.bias"))
    assert worst <= EXACT, c.worst_param()
    return c


@pytest.mark.parametrize("name", POOLS)
def test_streamed_pooling_is_exact(trunk, name):
    s = streamer(trunk, pool_for(name, CHANNELS))
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = check_exact(s, x)
    if name == "attention":
        assert {"pool.V.weight", "pool.U.weight", "pool.w.weight"} <= set(c.param_grads)


@pytest.mark.parametrize("name", POOLS)
def test_masked_streamed_pooling_is_exact(trunk, name):
    s = streamer(trunk, pool_for(name, CHANNELS))
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # a mask at a resolution that is no multiple of the final map's (3x4): each image keeps other positions
    mask = torch.rand(2, 1, 7, 5, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[:, :, 0, 0] = True
    check_exact(s, x, mask=mask)
    # the mask matters: unmasked pooling differs
    with torch.no_grad():
        assert relative_error(s(x, mask=mask), s(x)) > 1e-3


def test_whole_resnet_with_masked_attention_is_exact():
    trunk = randomize_(timm_trunk("test_resnet"), seed=1).double()  # stride 32, receptive field 167 px
    s = StreamingCNN(trunk, 200, pool=pool_for("attention", 96), stitch="none")
    size = (211, 243)
    assert s.plan(size, torch.float64).num_tiles >= 4
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[:, :, -1, -1] = True
    check_exact(s, x, mask=mask)


@pytest.mark.parametrize("name", ["avg", "max", "avgmax", "catavgmax"])
def test_unmasked_streamed_pooling_equals_timm_global_pool(trunk, name):
    s = streamer(trunk, name)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pooled = s(x)
        expected = SelectAdaptivePool2d(pool_type=name, flatten=True)(trunk(x))
    assert pooled.shape == expected.shape
    assert relative_error(pooled, expected) <= EXACT


@pytest.mark.parametrize("name", ["max", "catavgmax"])
def test_max_ties_go_where_torch_sends_them(name):
    # positive integer weights, and the same block of ones in four corners: equal maxima in distant tiles
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3, padding=1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(1, 3, p.shape, generator=torch.Generator().manual_seed(5)))
    s = StreamingCNN(net, 12, pool=name)
    x = torch.zeros(2, 1, 41, 37, dtype=torch.float64)
    for r, c in ((4, 4), (30, 4), (4, 26), (30, 26)):
        x[:, :, r:r + 4, c:c + 4] = 1
    x[1] = x[1].flip(-1)
    with torch.no_grad():
        y = net(x)
    assert ((y == y.amax((2, 3), keepdim=True)).flatten(2).sum(2) > 1).all()  # ties in every channel
    assert s.plan((41, 37)).num_tiles > 4
    c = compare_streaming(s, x, streaming_setter(s))
    assert c.worst <= EXACT, c


def test_masked_out_tiles_are_never_read(trunk):
    s = streamer(trunk, "avg")
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, 60, 60, dtype=torch.bool)
    mask[:, :, 40:, :15] = True  # bottom-left corner only
    lazy = RecordingLazyImage(x)
    plan = s.plan(SIZE, torch.float64, lazy=True).pieces[0]
    final = torch.nn.functional.interpolate(mask.float(), size=plan.output_size, mode="nearest") > 0.5  # the rule
    wanted = [t for t in plan.tiles if final[:, :, t.output_region[0], t.output_region[1]].any()]
    assert 0 < len(wanted) < plan.num_tiles / 2
    pooled = s(lazy, mask=mask)
    pooled.sum().backward()
    allowed = {(t.input_region[0].start, t.input_region[0].stop, t.input_region[1].start, t.input_region[1].stop)
               for t in wanted}
    reads = [(r.start, r.stop, c.start, c.stop) for r, c in lazy.reads]
    assert set(reads) == allowed
    assert len(reads) == 2 * len(wanted) - 1  # forward, then backward recomputes all but the kept last tile
    # the same pooled features as the tensor input
    with torch.no_grad():
        assert relative_error(pooled, s(x, mask=mask)) <= EXACT


@pytest.mark.parametrize("name", ["avg", "attention"])
def test_lazy_input_gives_the_tensor_results_and_prefetches(trunk, name):
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    results = []
    for lazy in (False, True):
        s = streamer(trunk, pool_for(name, CHANNELS))
        s.zero_grad(set_to_none=True)
        inp = RecordingLazyImage(x) if lazy else x
        out = s(inp)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), {n: p.grad.clone() for n, p in s.named_parameters()}))
        if lazy:
            assert is_lazy_image(inp) and not is_lazy_image(x)
            # every read but the first of each pass runs in the prefetch thread, beside the main thread
            assert sum(t != threading.current_thread().name for t in inp.threads) >= len(inp.reads) - 2
            assert max((r.stop - r.start) * (c.stop - c.start) for r, c in inp.reads) <= TILE * TILE
    (out0, g0), (out1, g1) = results
    assert relative_error(out1, out0) <= EXACT
    assert all(relative_error(g1[n], g0[n]) <= EXACT for n in g0 if not n.endswith("pool.w.bias"))


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation produced (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_flat_in_the_image_size():
    trunk = randomize_(timm_trunk("test_resnet"), seed=2)  # float32, auto stitching: pieces for tensors
    tile = torch.zeros(1, 3, 320, 320, requires_grad=True)
    with LargestTensor() as one_tile:  # what a single tile's forward and backward allocate at most
        trunk(tile).mean().backward()
    for size in (512, 1024):
        s = StreamingCNN(trunk, 320, pool="avg")
        plan = s.plan((size, size), lazy=True)
        assert len(plan.pieces) == 1 and "one piece" in str(plan)
        image = RecordingLazyImage(torch.randint(0, 255, (1, 3, size, size), dtype=torch.uint8).float())
        with LargestTensor() as probe:
            s(image).sum().backward()
        assert probe.largest <= one_tile.largest
    assert one_tile.largest < 3 * 1024 * 1024  # so nothing of the (larger) image's size was allocated
    # a tensor input keeps stitched pieces (it is in memory anyway)
    assert len(StreamingCNN(trunk, 320, pool="avg").plan((1024, 1024)).pieces) > 1


def test_bad_masks_and_lazy_images_are_refused(trunk):
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64)
    with pytest.raises(ValueError, match="no pooling"):
        StreamingCNN(trunk, TILE)(x, mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    s = streamer(trunk, "avg")
    with pytest.raises(ValueError, match="bool tensor of shape"):
        s(x, mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        s(x, mask=torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keeps no position"):
        s(x, mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool))

    class Broken(RecordingLazyImage):
        def __getitem__(self, index):
            return super().__getitem__(index)[:, :, 1:]

    with pytest.raises(TypeError, match="lazy image protocol"):
        s(Broken(x))
    with pytest.raises(ValueError, match="cannot be streamed"):
        make_reducer("lse")
