"""Error messages: each states the problem, the number or module involved, and comes before any
tile runs."""
from __future__ import annotations

import copy
import re
from collections import OrderedDict

import pytest
import torch
from conftest import EvenOnly, ForwardCounter, assert_exact, timm_trunk
from torch import nn

from timm_stream.engine import NonLocalModuleError, StreamingCNN, StreamingError, TileTooSmallError
from timm_stream.testing import randomize_


def _numbers(message: str) -> tuple[int, int]:
    match = re.search(r"at least \((\d+), (\d+)\)", message)
    assert match, message
    return int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize("module", [
    nn.Conv2d(3, 4, (3, 7), (1, 2), (1, 3)),  # one module, non-square minimum
    nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.ReLU(), nn.Conv2d(4, 4, (5, 3), (2, 1), (2, 1))),
])
def test_tile_too_small_states_the_minimum(module):
    geometry = StreamingCNN(module, 10**6, stitch="none").geometry
    min_h, min_w = geometry.min_tile_size
    assert min_h != min_w
    for tile in [(min_h - 1, min_w), (min_h, min_w - 1), (1, 1)]:
        with pytest.raises(TileTooSmallError) as info:
            StreamingCNN(module, tile, stitch="none")
        assert _numbers(str(info.value)) == (min_h, min_w)
        assert info.value.min_tile_size == (min_h, min_w)
        assert "tile_size" in str(info.value)
    # the stated minimum works, for any image size, exactly
    s = StreamingCNN(randomize_(copy.deepcopy(module), 0).double(), (min_h, min_w), stitch="none")
    for size in [(50, 61), (64, 64), (33, 97)]:
        assert s.plan(size, torch.float64).num_tiles > 1
    assert_exact(s, torch.randn(2, 3, 33, 97, dtype=torch.float64))


def test_tile_too_small_with_stitched_pieces_states_the_first_piece_minimum():
    # with stitching the tile is for the first piece only: the stated minimum is exactly the limit
    module = nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.Conv2d(4, 4, 5, 2, 2), nn.Conv2d(4, 4, 5, 1, 2))
    with pytest.raises(TileTooSmallError) as info:
        StreamingCNN(module, 2)
    min_h, min_w = _numbers(str(info.value))
    StreamingCNN(module, (min_h, min_w))
    with pytest.raises(TileTooSmallError):
        StreamingCNN(module, (min_h - 1, min_w))
    with pytest.raises(TileTooSmallError):
        StreamingCNN(module, (min_h, min_w - 1))


@pytest.mark.parametrize("tile_size", [0, -1, 2.5, (1, 2, 3), True, (64, 0), (64, 2.0), "64", None])
def test_invalid_tile_size(tile_size):
    with pytest.raises(ValueError, match="tile_size"):
        StreamingCNN(nn.Conv2d(3, 4, 3), tile_size)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (32,)])
def test_non_4d_input(shape):
    s = StreamingCNN(nn.Conv2d(3, 4, 3), 16)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        s(torch.zeros(shape))


def test_seresnet_names_the_squeeze_excitation_module():
    with pytest.raises(NonLocalModuleError) as info:
        StreamingCNN(timm_trunk("seresnet18"), 512)
    assert info.value.module_path == "layer1.0.se"
    assert "'layer1.0.se'" in str(info.value) and "spatial" in str(info.value)


def test_groupnorm_resnet_names_the_norm_module():
    trunk = timm_trunk("resnet50_gn")
    with pytest.raises(NonLocalModuleError) as info:
        StreamingCNN(trunk, 512)
    assert isinstance(trunk.get_submodule(info.value.module_path), nn.GroupNorm)
    assert info.value.module_path == "bn1"
    assert "GroupNorm" in str(info.value)
    # streaming only what comes after the stem norm still finds the next one, by its full path
    rest = nn.Sequential(OrderedDict((k, getattr(trunk, k)) for k in ("maxpool", "layer1")))
    with pytest.raises(NonLocalModuleError, match=r"'layer1\.0\.bn1'"):
        StreamingCNN(rest, 512, in_channels=64)


def test_refused_before_any_tile_runs():
    counter = ForwardCounter()
    module = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), count=counter, pool=nn.AdaptiveAvgPool2d(4)))
    with pytest.raises(NonLocalModuleError, match="'pool'"):
        StreamingCNN(module, 32)
    assert counter.real_calls == 0

    # a mode change that makes the module non-local is refused at the next forward, before any tile
    module = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), count=counter, drop=nn.Dropout(0.1))).eval()
    s = StreamingCNN(module, 32)
    s(torch.zeros(1, 3, 80, 80))
    assert counter.real_calls > 1  # streamed (several tiles) while dropout was off
    calls = counter.real_calls
    s.train()
    with pytest.raises(NonLocalModuleError, match="'drop'.*dropout"):
        s(torch.zeros(1, 3, 80, 80))
    assert counter.real_calls == calls


def test_size_multiple_network_refuses_other_sizes():
    s = StreamingCNN(EvenOnly(), 16)
    with pytest.raises(StreamingError, match=r"divisible by \(2, 2\).*41x40"):
        s(torch.zeros(1, 3, 41, 40))


def test_other_construction_errors():
    with pytest.raises(StreamingError, match="in_channels"):
        StreamingCNN(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), 16)
    StreamingCNN(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), 16, in_channels=3)
    with pytest.raises(StreamingError, match="stitch.*nope"):
        StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 16, stitch=["nope"])
    with pytest.raises(StreamingError, match="feature map"):  # returns no (N, C, H, W) map
        StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(1)), 16)
