"""The engine and the plugin on a CUDA device, with the input left on the host.

Skipped where torch sees no CUDA device (the CPU suite covers the same contracts with the module on the
CPU). Run them on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import EXACT, assert_exact, streaming_setter, timm_trunk

from timm_stream.engine import StreamingCNN
from timm_stream.testing import compare_streaming, randomize_, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 exactness is judged on true fp32 arithmetic; TF32 convolutions round the inputs to
    10-bit mantissas, and different tilings then round differently."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def resnet18_trunk(dtype: torch.dtype) -> torch.nn.Module:
    return randomize_(timm_trunk("resnet18"), seed=0).to(CUDA, dtype)


def several_tiles(s: StreamingCNN, size) -> None:
    assert s.plan(size, torch.float32).pieces[0].num_tiles > 1


@pytest.mark.parametrize("dtype, tol", [(torch.float64, EXACT), (torch.float32, 1e-4)])
def test_host_input_cuda_module_is_exact(dtype, tol):
    """Input (and its gradient) on the host, every tile moved to the device on its own."""
    s = StreamingCNN(resnet18_trunk(dtype), 320)
    size = (2 * 330 + 17, 451)
    several_tiles(s, size)
    x = torch.randn((2, 3) + size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    c = assert_exact(s, x, tol)
    assert c.input_grad is not None
    s.streaming = True
    inp = x.clone().requires_grad_()
    out = s(inp)
    out.sum().backward()
    assert out.device.type == "cuda" and inp.grad.device.type == "cpu"
    assert all(p.grad.device.type == "cuda" for p in s.parameters())


def test_uint8_host_image_preprocessed_per_tile():
    s = StreamingCNN(resnet18_trunk(torch.float64), 320, preprocess=lambda t: t.double().div(255))
    size = (700, 520)
    several_tiles(s, size)
    x = torch.randint(0, 256, (1, 3) + size, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    c = compare_streaming(s, x, streaming_setter(s), input_grad=False)
    assert c.worst <= EXACT, c
    assert x.device.type == "cpu" and x.dtype == torch.uint8  # never converted or moved as a whole


def test_autocast_bfloat16_on_cuda():
    """bf16 keeps ~3 significant digits, so streamed and un-tiled bf16 runs differ by rounding alone
    (5e-2 on the input gradient of a randomized resnet18). What must hold: tiling adds no error of its
    own, i.e. against the float32 result the streamed bf16 run is about as close as the un-tiled one."""
    s = StreamingCNN(resnet18_trunk(torch.float32), 320)
    size = (700, 520)
    several_tiles(s, size)
    x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(3))
    results = {}
    for streaming, dtype in ((False, None), (False, torch.bfloat16), (True, torch.bfloat16)):
        s.streaming = streaming
        s.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext():
            out = s(inp)
            loss = out.float().square().mean()
        loss.backward()
        results[streaming, dtype] = [out.detach(), inp.grad] + [p.grad for p in s.parameters()]
    reference, untiled, streamed = (results[k] for k in [(False, None), (False, torch.bfloat16),
                                                         (True, torch.bfloat16)])
    assert streamed[0].dtype == untiled[0].dtype == torch.bfloat16
    names = ["output", "input grad"] + [n for n, _ in s.named_parameters()]
    for name, ref, u, t in zip(names, reference, untiled, streamed):
        untiled_error, streamed_error = relative_error(u, ref), relative_error(t, ref)
        assert streamed_error <= 1.5 * untiled_error + 1e-3, (name, streamed_error, untiled_error)


def test_stream_model_on_cuda_with_uint8_input():
    import timm

    import timm_stream  # noqa: F401

    model = timm.create_model("stream_test_resnet", tile_size=160, num_classes=3, normalize_input=True)
    randomize_(model, seed=0)
    model.to(CUDA).train()
    x = torch.randint(0, 256, (2, 3, 400, 330), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    assert model.stream_plan(x.shape[-2:]).pieces[0].num_tiles > 1
    outputs, grads = [], []
    for streaming in (True, False):
        model.streaming = streaming
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert outputs[0].device.type == "cuda" and outputs[0].shape == (2, 3)
    assert relative_error(outputs[0], outputs[1]) <= 1e-4
    assert set(grads[0]) == set(grads[1])
    for name in grads[1]:
        assert relative_error(grads[0][name], grads[1][name]) <= 1e-3, name


def test_tile_feed_overlaps_copies_and_stays_exact():
    """Host tiles go through pinned memory on a side stream (engine/transfer.py): same numbers as the
    un-tiled run, and the copies run on a stream other than the compute's."""
    from timm_stream.engine.transfer import TileFeed

    feed = TileFeed(CUDA)
    region = torch.arange(12.0).view(1, 1, 3, 4)[:, :, 1:, 1:]  # a strided host view, as a tile is
    handle = feed.submit(region)
    assert handle[1] is not None and feed.stream != torch.cuda.current_stream(CUDA)
    assert torch.equal(feed.take(handle).cpu(), region)
