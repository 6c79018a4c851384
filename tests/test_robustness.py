"""Ordinary PyTorch workflows on stream models and the engine, and what is refused (issue 9): in-place
changes between forward and backward, pickling, module replacement, inference tensors, normalize_input
for any in_chans, and the errors that name the fix. Every exactness check runs several tiles."""
from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn

import timm_stream  # noqa: F401 - registers stream_<arch>
from timm_stream import NonLocalModuleError, StreamingCNN, StreamingError
from timm_stream.testing import assert_several_tiles, compare_streaming, randomize_, relative_error

EXACT = 1e-9
SIZE = (150, 130)


def stream_model(**kwargs) -> nn.Module:
    model = timm.create_model("stream_test_resnet", tile_size=96, num_classes=3, **kwargs)
    return randomize_(model).double().eval()


def image(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_model_exact(model, x):
    assert_several_tiles(model, x.shape[-2:])
    c = compare_streaming(model, x, lambda v: setattr(model, "streaming", v))
    assert c.worst <= EXACT, c
    assert model.streaming
    return c


# ------------------------------------------------------------------ item 2: version counters


def test_parameter_changed_in_place_between_forward_and_backward_is_refused():
    model = stream_model()
    x = image(1, 3, *SIZE)
    assert_several_tiles(model, SIZE)
    for streaming in (False, True):  # un-tiled autograd refuses it: so must streaming
        model.streaming = streaming
        loss = model(x).sum()
        with torch.no_grad():
            model.conv1[0].weight.mul_(1.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            loss.backward()
    assert "conv1.0.weight" in str(info.value) and "Streaming recomputes tiles" in str(info.value)
    # a fresh forward after the change is fine
    model(x).sum().backward()


def test_buffer_changed_in_place_in_an_inner_piece_is_refused():
    # A running statistic of a piece that keeps no graph (only backward's recomputation reads it).
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, 1, 1), bn=nn.BatchNorm2d(4), act=nn.ReLU(),
                                    down=nn.Conv2d(4, 4, 3, 2, 1)))
    s = StreamingCNN(randomize_(net).double(), 24, stitch="none", keep_last_tile=False)
    x = image(1, 3, 60, 50).requires_grad_()
    assert_several_tiles(s, (60, 50))
    out = s(x)
    net.bn.running_var.add_(0.5)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: 'bn\.running_var'"):
        out.sum().backward()


# ------------------------------------------------------------------ item 4: pickling


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_stream_models_pickle_to_identical_outputs(how):
    model = stream_model()
    x = image(1, 3, *SIZE)
    assert_several_tiles(model, SIZE)
    expected = model(x)
    if how == "pickle":
        restored = pickle.loads(pickle.dumps(model))  # the test's own bytes
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)  # the test's own bytes
    else:
        restored = copy.deepcopy(model)
    assert type(restored) is type(model) and restored.streaming
    assert torch.equal(restored(x), expected)
    assert_model_exact(restored, x)
    # the restored engine runs the restored model's modules, not the original's
    with torch.no_grad():
        restored.conv1[0].weight.mul_(2)
    assert not torch.equal(restored(x), expected) and torch.equal(model(x), expected)


def test_streaming_cnn_pickles():
    net = randomize_(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 2, 3, 2, 1))).double()
    s = StreamingCNN(net, 24)
    x = image(1, 3, 60, 50)
    restored = pickle.loads(pickle.dumps(s))
    assert torch.equal(restored(x), s(x)) and restored.plan((60, 50)).num_tiles > 1


# ------------------------------------------------------------------ item 5: module replacement


def test_replaced_top_level_child_is_what_streams():
    model = stream_model()
    x = image(1, 3, *SIZE)
    before = model(x).detach()
    model.layer1 = randomize_(copy.deepcopy(model.layer1), seed=7)
    assert_model_exact(model, x)
    assert relative_error(model(x), before) > 1e-3  # the replacement is used
    # a replacement that is not local is refused at the next call, naming it
    model.layer2 = nn.Sequential(model.layer2, nn.GroupNorm(2, model.layer2[-1].conv2.out_channels).double())
    with pytest.raises(NonLocalModuleError, match=r"layer2\.1"):
        model(x)


def test_replaced_tail_stage_is_what_runs():
    # the un-tiled tail (stages after stream_stages) is looked up by name too
    model = stream_model(stream_stages=2)
    model.layer4 = randomize_(copy.deepcopy(model.layer4), seed=9)
    base = timm.create_model("test_resnet", num_classes=3).double().eval()
    base.load_state_dict(model.state_dict())
    x = image(1, 3, *SIZE)
    assert_several_tiles(model, SIZE)
    with torch.no_grad():
        assert relative_error(model(x), base(x)) <= EXACT


def test_convert_sync_batchnorm_reaches_the_streamed_part():
    model = stream_model()
    x = image(1, 3, *SIZE)
    expected = model(x).detach()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces bn1 and every block's norms
    model.eval()
    assert relative_error(model(x), expected) <= EXACT
    assert_model_exact(model, x)
    streamed_norms = [m for m in model.streamer.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert streamed_norms and all(isinstance(m, nn.SyncBatchNorm) for m in streamed_norms)


def test_streaming_cnn_sees_replaced_children():
    net = randomize_(nn.Sequential(OrderedDict(a=nn.Conv2d(3, 4, 3, 1, 1), act=nn.ReLU(),
                                               b=nn.Conv2d(4, 2, 3, 2, 1)))).double()
    s = StreamingCNN(net, 24)
    x = image(1, 3, 60, 50)
    before = s(x).detach()
    s.module.b = randomize_(nn.Conv2d(4, 2, 5, 2, 2), seed=3).double()  # a larger receptive field
    assert s.plan((60, 50)).receptive_field != (0, 0)
    c = compare_streaming(s, x, lambda v: setattr(s, "streaming", v))
    assert c.worst <= EXACT and relative_error(s(x), before) > 1e-3


# ------------------------------------------------------------------ item 6: inference tensors


def _grads_with(module, x, streaming):
    """Output and parameter gradients of ``module`` on ``x`` itself (no clone: a clone made outside
    inference mode would be a normal tensor)."""
    module.streaming = streaming
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(torch.ones_like(out))
    return out.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_uint8_image_made_in_inference_mode_trains_like_untiled():
    model = stream_model(normalize_input=True)
    with torch.inference_mode():
        x = torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8)
    assert x.is_inference()
    assert_several_tiles(model, SIZE)
    (out0, g0), (out1, g1) = (_grads_with(model, x, streaming) for streaming in (False, True))
    assert relative_error(out1, out0) <= EXACT and g0 and set(g0) == set(g1)
    assert max(relative_error(g1[n], g0[n]) for n in g0) <= EXACT


def test_inference_input_of_a_streaming_cnn_with_preprocess():
    net = randomize_(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 2, 3, 2, 1))).double()
    s = StreamingCNN(net, 24, preprocess=lambda t: t.double() / 255, stitch="none")
    with torch.inference_mode():
        x = torch.randint(0, 256, (2, 3, 60, 50), dtype=torch.uint8)
    assert_several_tiles(s, (60, 50))
    (out0, g0), (out1, g1) = (_grads_with(s, x, streaming) for streaming in (False, True))
    assert relative_error(out1, out0) <= EXACT and len(g0) == 4
    assert max(relative_error(g1[n], g0[n]) for n in g0) <= EXACT


# ------------------------------------------------------------------ item 7: normalize_input, any in_chans


@pytest.mark.parametrize("in_chans", [1, 4])
def test_normalize_input_with_other_channel_counts(in_chans):
    with pytest.raises(ValueError, match=rf"in_chans={in_chans}: pass yours .*pretrained_cfg_overlay"):
        timm.create_model("stream_test_resnet", tile_size=96, in_chans=in_chans, normalize_input=True)
    mean, std = tuple(0.1 * (i + 2) for i in range(in_chans)), tuple(0.2 + 0.05 * i for i in range(in_chans))
    model = stream_model(in_chans=in_chans, normalize_input=True,
                         pretrained_cfg_overlay=dict(mean=mean, std=std))
    assert timm.data.resolve_model_data_config(model)["mean"] == mean
    x = torch.randint(0, 256, (1, in_chans, *SIZE), dtype=torch.uint8)
    assert_several_tiles(model, SIZE)
    base = timm.create_model("test_resnet", in_chans=in_chans, num_classes=3).double().eval()
    base.load_state_dict(model.state_dict())
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    with torch.no_grad():
        assert relative_error(model(x), base((x.double() / 255 - m) / s)) <= EXACT


def test_one_statistic_is_used_for_every_channel():
    model = stream_model(in_chans=2, normalize_input=True, pretrained_cfg_overlay=dict(mean=(0.5,), std=(0.25,)))
    assert model.streamer.preprocess.mean == (0.5, 0.5) and model.streamer.preprocess.std == (0.25, 0.25)


# ------------------------------------------------------------------ item 8: errors that name the fix


def test_uint8_image_without_normalize_input_names_the_fix():
    model = stream_model()
    x = torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8)
    for streaming in (True, False):
        model.streaming = streaming
        with pytest.raises(StreamingError, match=r"torch\.uint8.*normalize_input=True.*preprocess="):
            model(x)


def test_float_image_into_a_normalize_input_model_is_refused():
    # /255 of a float image in 0..1 (or of uint16 pixels) would be silently wrong
    model = stream_model(normalize_input=True)
    for streaming in (True, False):
        model.streaming = streaming
        for dtype in (torch.float64, torch.int16):
            with pytest.raises(TypeError, match=rf"normalize_input=True expects uint8 .*got {dtype}"):
                model(torch.zeros(1, 3, *SIZE, dtype=dtype))


def test_float16_image_into_float32_model_names_both_dtypes():
    model = timm.create_model("stream_test_resnet", tile_size=96, num_classes=3)
    with pytest.raises(StreamingError, match=r"torch\.float16 but the module's parameters are torch\.float32"):
        model(torch.randn(1, 3, *SIZE).half())
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU()).double()  # the engine itself, float32 image
    with pytest.raises(StreamingError, match=r"torch\.float32 but the module's parameters are torch\.float64"):
        StreamingCNN(net, 24)(torch.randn(1, 3, 40, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per operation: accepted
        model(torch.randn(1, 3, *SIZE).half())


@pytest.mark.parametrize("how", ["backward", "grad"])
def test_double_backward_is_refused_naming_streaming(how):
    model = stream_model()
    x = image(1, 3, *SIZE).requires_grad_()
    assert_several_tiles(model, SIZE)
    loss = model(x).square().sum()
    with pytest.raises(RuntimeError, match=r"double backward .*streamed module.*model\.streaming = False"):
        if how == "backward":
            loss.backward(create_graph=True)
        else:
            torch.autograd.grad(loss, x, create_graph=True)
    model.streaming = False  # the alternative the message names works
    (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    g.square().sum().backward()


def test_jit_script_and_fx_are_refused_with_the_alternative():
    model = stream_model()
    with pytest.raises(RuntimeError, match="cannot be scripted.*Script the base timm model"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="cannot be traced with torch.fx.*Trace the base timm model"):
        torch.fx.symbolic_trace(model)
    s = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU()), 24)
    with pytest.raises(StreamingError, match="cannot be scripted.*module"):
        torch.jit.script(s)
    with pytest.raises(StreamingError, match="cannot be traced with torch.fx"):
        torch.fx.symbolic_trace(s)


# ------------------------------------------------------------------ one reading of tile_size


@pytest.mark.parametrize("tile_size", [[64.5, 64], (64, True), [0, 64], "64"])
def test_tile_size_is_read_in_one_place_everywhere(tile_size):
    from timm_stream.engine import normalize_tile_size
    from timm_stream.lightning import StreamingClassifier

    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        normalize_tile_size(tile_size)
    with pytest.raises(ValueError, match="tile_size must be a positive int"):  # no silent int() in Lightning
        StreamingClassifier(model_name="stream_test_resnet", tile_size=tile_size)
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        StreamingCNN(nn.Conv2d(3, 4, 3), tile_size)
    assert normalize_tile_size([64, 80]) == (64, 80) and normalize_tile_size(96) == (96, 96)
