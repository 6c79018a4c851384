"""The tracer: geometry of known layers (derived by hand and measured with autograd), refusal of
everything non-local with the culprit's module path, and acceptance of local idioms."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLES, LayerNorm2d, LayerScale, Residual, assert_exact, build_stack, local_stacks
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from timm_stream.engine import NonLocalModuleError, StreamingCNN, trace
from timm_stream.testing import randomize_


def axes_of(module: nn.Module, shape=(1, 3, 64, 64), **kwargs):
    t = trace(module, shape, modules=module, **kwargs)
    return t.axes


# ---------------------------------------------------------------------------------------------
# Geometry of known layers, by hand


@pytest.mark.parametrize("module, expected, out_hw", [
    # conv 7x7 stride 2 pad 3 (ResNet stem): output j reads [2j-3, 2j+3]
    (nn.Conv2d(3, 4, 7, 2, 3), ((2, -3, 3), (2, -3, 3)), (32, 32)),
    # dilation 2, kernel 3, pad 2: [j-2, j+2]; dilation 3 kernel 3 pad 0: [j, j+6]
    (nn.Conv2d(3, 4, 3, padding=2, dilation=2), ((1, -2, 2), (1, -2, 2)), (64, 64)),
    (nn.Conv2d(3, 4, 3, dilation=3), ((1, 0, 6), (1, 0, 6)), (58, 58)),
    # non-square kernel (3, 5), stride (1, 2), padding (1, 0)
    (nn.Conv2d(3, 4, (3, 5), (1, 2), (1, 0)), ((1, -1, 1), (2, 0, 4)), (64, 30)),
    # 'same' with an even kernel: PyTorch pads 1 before and 2 after -> [j-1, j+2]
    (nn.Conv2d(3, 4, 4, padding="same"), ((1, -1, 2), (1, -1, 2)), (64, 64)),
    # 'same' with kernel (2, 5) and dilation (3, 1): total 3 -> 1 before; total 4 -> 2 before
    (nn.Conv2d(3, 4, (2, 5), padding="same", dilation=(3, 1)), ((1, -1, 2), (1, -2, 2)), (64, 64)),
    # static asymmetric padding as timm's tf-style models use it: ZeroPad2d((left, right, top, bottom))
    (nn.Sequential(nn.ZeroPad2d((0, 1, 2, 0)), nn.Conv2d(3, 4, 3, 2)), ((2, -2, 0), (2, 0, 2)), (32, 32)),
    # max pool 3/2/1 with ceil_mode: [2j-1, 2j+1], 33 outputs from 64 (ceil((64+2-3)/2)+1 = 33)
    (nn.MaxPool2d(3, 2, 1, ceil_mode=True), ((2, -1, 1), (2, -1, 1)), (33, 33)),
    (nn.MaxPool2d(2, 2, ceil_mode=True), ((2, 0, 1), (2, 0, 1)), (32, 32)),
    (nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False), ((2, 0, 2), (2, 0, 2)), (32, 32)),
    (nn.MaxPool2d((3, 1), (2, 1), (1, 0), dilation=(2, 1)), ((2, -1, 3), (1, 0, 0)), (31, 64)),
    # stem then pool: [4j-5, 4j+5]
    (nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.MaxPool2d(3, 2, 1)), ((4, -5, 5), (4, -5, 5)), (16, 16)),
    # residual: the union of the branches (3x3 main branch, 1x1 stride-2 shortcut)
    (Residual(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1)),
              nn.Conv2d(3, 4, 1, 2)), ((2, -3, 3), (2, -3, 3)), (32, 32)),
])
def test_known_layer_geometry(module, expected, out_hw):
    t = trace(module, (1, 3, 64, 64), modules=module)
    assert tuple((a.stride, a.lo, a.hi) for a in t.axes) == expected
    assert t.output_shape[2:] == out_hw
    with torch.no_grad():  # and torch agrees on the output size
        assert module(torch.zeros(1, 3, 64, 64)).shape[2:] == out_hw


def test_align_is_lcm_of_intermediate_strides():
    module = nn.Sequential(nn.Conv2d(3, 4, 3, (2, 1), 1), nn.Conv2d(4, 4, 3, (3, 2), 1))
    t = trace(module, (1, 3, 96, 96), modules=module)
    assert t.stride == (6, 2) and t.align == (6, 2)
    s = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1)), 64, stitch="none")
    assert s.geometry.align == (4, 4) and s.geometry.stride == (4, 4)
    # halo: receptive field [4j-3, 4j+3] needs 3 px before and 3-(4-1)=0 after an output's pixels
    assert s.geometry.halo == ((3, 0), (3, 0))


# ---------------------------------------------------------------------------------------------
# Geometry measured with autograd on random conv chains


@st.composite
def conv_chains(draw):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        p = tuple(draw(st.integers(0, dd * (kk - 1))) for kk, dd in zip(k, d))
        layers.append((k, s, p, d))
    return layers


@settings(max_examples=EXAMPLES(60))
@given(conv_chains(), st.integers(0, 2**31 - 1))
def test_traced_geometry_matches_measured_receptive_field(layers, seed):
    convs = [nn.Conv2d(2, 2, k, s, p, d, bias=False) for k, s, p, d in layers]
    module = randomize_(nn.Sequential(*convs), seed).double()
    (gh, gw) = axes_of(module, (1, 2, 128, 128), dtype=torch.float64)
    size = (gh.size + 4 * gh.stride, gw.size + 4 * gw.stride)
    x = torch.randn(1, 2, *size, dtype=torch.float64, requires_grad=True)
    out = module(x)
    # an output whose receptive field lies inside the image
    i, j = -(gh.lo // gh.stride) + 1, -(gw.lo // gw.stride) + 1
    assume(i < out.shape[2] and j < out.shape[3])
    out[0, :, i, j].sum().backward()
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1)).flatten()
    cols = torch.nonzero(x.grad[0].abs().sum(0).sum(0)).flatten()
    assert (rows.min().item(), rows.max().item()) == (i * gh.stride + gh.lo, i * gh.stride + gh.hi)
    assert (cols.min().item(), cols.max().item()) == (j * gw.stride + gw.lo, j * gw.stride + gw.hi)


@settings(max_examples=EXAMPLES(60))
@given(local_stacks(), st.integers(0, 2**31 - 1), st.integers(16, 48), st.integers(16, 48))
def test_every_dependency_lies_in_the_traced_receptive_field(stack, seed, height, width):
    """Outputs at the borders and inside depend (by autograd) only on pixels in
    [j*stride + lo, j*stride + hi] -- padding that copies pixels (reflect, replicate) included."""
    cin, specs = stack
    module = randomize_(build_stack(specs, cin), seed).double().eval()
    x = torch.randn(1, cin, height, width, dtype=torch.float64, requires_grad=True)
    try:
        out = module(x)
    except RuntimeError:  # image too small for this stack
        assume(False)
    gh, gw = StreamingCNN(module, 10**6, stitch="none", in_channels=cin).geometry.axes
    oh, ow = out.shape[2:]
    for i in sorted({0, 1, oh // 2, oh - 2, oh - 1} & set(range(oh))):
        for j in sorted({0, ow // 2, ow - 1}):
            (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
            support = grad[0].abs().sum(0)
            rows = torch.nonzero(support.sum(1)).flatten()
            cols = torch.nonzero(support.sum(0)).flatten()
            if len(rows):
                assert i * gh.stride + gh.lo <= rows.min() and rows.max() <= i * gh.stride + gh.hi, (i, rows)
                assert j * gw.stride + gw.lo <= cols.min() and cols.max() <= j * gw.stride + gw.hi, (j, cols)


# ---------------------------------------------------------------------------------------------
# Refusals: each names the module that issued the non-local operation


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class Whitening(nn.Module):
    """Batch statistics in training, named so that no norm freezing recognizes it."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, training=self.training)


class DropPath(nn.Module):
    def forward(self, x):
        keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(0.9)
        return x * keep / 0.9


class Conv2dSameLike(nn.Conv2d):
    """Pads at run time from the input size (TF 'SAME' with stride 2, like timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class FlattenBack(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.flatten(2).view(n, c, h, w)


class SpatialMatmul(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(w))

    def forward(self, x):
        return x @ self.mix


class Attention(nn.Module):
    def forward(self, x):
        q = x.permute(0, 2, 3, 1)  # (N, H, W, C): attention over W
        return F.scaled_dot_product_attention(q, q, q).permute(0, 3, 1, 2)


class Unknown(nn.Module):
    def forward(self, x):
        return torch.diff(x, dim=1)


class Block(nn.Module):
    """A timm-like block: conv, then the module under test as ``.inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.conv(x))


def wrapped(inner: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), stage=nn.Sequential(Block(inner))))


REFUSED = [
    ("groupnorm", lambda: nn.GroupNorm(2, 4), "group_norm", "GroupNorm"),
    ("instancenorm", lambda: nn.InstanceNorm2d(4), "instance_norm", "InstanceNorm"),
    ("squeeze_excite", lambda: SqueezeExcite(4), "mean", "spatial"),
    ("adaptive_avg", lambda: nn.AdaptiveAvgPool2d(1), "adaptive_avg_pool2d", "adaptive"),
    ("adaptive_max", lambda: nn.AdaptiveMaxPool2d((2, 2)), "adaptive_max_pool2d", "adaptive"),
    ("train_batchnorm", lambda: Whitening(4), "batch_norm", "training"),
    ("dropout", lambda: nn.Dropout(0.1), "dropout", "random"),
    ("dropout2d", lambda: nn.Dropout2d(0.2), "dropout2d", "random"),
    ("drop_path", lambda: DropPath(), "bernoulli_", "random"),
    ("runtime_same_padding", lambda: Conv2dSameLike(4, 4, 3, 2), "pad", "input size"),
    ("circular", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "pad", "circular"),
    ("flatten", lambda: FlattenBack(), "flatten", "spatial"),
    ("matmul", lambda: SpatialMatmul(64), "matmul", "matrix"),
    ("attention", lambda: Attention(), "scaled_dot_product_attention", "attention"),
    ("unknown_op", lambda: Unknown(), "diff", "not an operation"),
    ("softmax_spatial", lambda: SpatialSoftmax(), "softmax", "spatial"),
    ("crop", lambda: CropOne(), "__getitem__", "slices a spatial"),
    ("upsample", lambda: nn.Upsample(scale_factor=2), "interpolate", "resampling"),
]


class SpatialSoftmax(nn.Module):
    def forward(self, x):
        return x.softmax(dim=-1)


class CropOne(nn.Module):
    def forward(self, x):
        return x[:, :, 1:, :]


@pytest.mark.parametrize("label, make, op, reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_non_local_modules_are_refused_with_their_path(label, make, op, reason):
    module = wrapped(make())
    with pytest.raises(NonLocalModuleError) as info:
        StreamingCNN(module, 256)
    err = info.value
    assert err.module_path == "stage.0.inner", str(err)
    assert "'stage.0.inner'" in str(err)
    assert err.operation == op and f"({op})" in str(err)
    assert reason.lower() in str(err).lower()
    assert isinstance(err, ValueError)


def test_train_mode_batchnorm_refused_by_tracer_but_frozen_by_streaming():
    bn = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), norm=nn.BatchNorm2d(4))).train()
    with pytest.raises(NonLocalModuleError, match="'norm'.*training mode"):
        trace(bn, (2, 3, 32, 32), modules=bn)
    StreamingCNN(bn, 16)  # StreamingCNN puts the norms it contains in eval mode
    assert not bn.norm.training and bn.conv.training


def test_batchnorm_on_a_parameter_is_not_the_input_path():
    class NormalizedWeightConv(nn.Conv2d):  # batch-norm statistics of the weight: input independent
        def forward(self, x):
            w = F.batch_norm(self.weight.view(1, self.out_channels, -1), None, None, training=True)
            return F.conv2d(x, w.view_as(self.weight), self.bias, self.stride, self.padding)

    s = StreamingCNN(nn.Sequential(NormalizedWeightConv(3, 4, 3, padding=1), nn.ReLU()), 24)
    assert_exact(randomize_(s, 0).double(), torch.randn(2, 3, 50, 41, dtype=torch.float64))


def test_disabled_dropout_is_accepted():
    """Rate 0 in training, or any rate in eval: the identity, so it adds nothing to the receptive field
    and streams exactly (training with a rate > 0 is refused: see REFUSED)."""
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.0), nn.Dropout(0.5).eval(), nn.Conv2d(4, 4, 3))
    s = StreamingCNN(randomize_(module, 0).double(), 12, stitch="none")
    assert tuple((a.stride, a.lo, a.hi) for a in s.geometry.axes) == ((1, 0, 4), (1, 0, 4))
    assert module[1].training and not module[2].training  # the engine left the modes alone
    assert s.plan((30, 31), torch.float64).num_tiles > 4
    assert_exact(s, torch.randn(2, 3, 30, 31, dtype=torch.float64))


def test_timm_conv2d_same_is_refused():
    from timm.layers import create_conv2d

    conv = create_conv2d(4, 4, 3, stride=2, padding="same")  # dynamic 'SAME' padding: Conv2dSame
    with pytest.raises(NonLocalModuleError, match=r"'stage\.0\.inner'.*input size"):
        StreamingCNN(wrapped(conv), 128)


# ---------------------------------------------------------------------------------------------
# Local idioms are accepted, and streamed exactly


class PixelLayerNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SplitCat(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.Conv2d(c - c // 2, c - c // 2, 1)

    def forward(self, x):
        a, b = torch.split(x, [x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
        c, d = x.chunk(2, dim=1)
        return torch.cat([self.a(a), self.b(b), c * d], dim=1)


class ChannelShuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class StdConv(nn.Conv2d):
    """Weight standardization computed on the weight (timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.var(dim=(1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class InplaceReLUResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y += x  # in-place residual add, then in-place activation (as timm's BasicBlock)
        return self.act(y)


ACCEPTED = [
    ("pixel_layernorm", lambda: PixelLayerNorm(4), None),
    ("layernorm2d", lambda: LayerNorm2d(4), None),
    ("split_cat", lambda: SplitCat(4), (1, -1, 1)),
    ("softmax2d_over_channels", lambda: nn.Softmax2d(), None),
    ("channel_shuffle", lambda: ChannelShuffle(), None),
    ("layer_scale", lambda: LayerScale(4), None),
    ("weight_standardization", lambda: StdConv(4, 4, 3, padding=1), (1, -1, 1)),
    ("prelu", lambda: nn.PReLU(4), None),
    ("inplace_relu_residual", lambda: InplaceReLUResidual(4), (1, -1, 1)),
    # reflect / replicate padding copy pixels from up to 2p / p inside the border: [j-1-2, j+1+2]
    ("reflect", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (1, -3, 3)),
    ("replicate", lambda: nn.Conv2d(4, 4, (5, 3), padding=(2, 1), padding_mode="replicate"), (1, -4, 4)),
    ("maxpool_ceil", lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, -1, 1)),
    ("avgpool_ceil", lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, -1, 1)),
    ("avgpool_ceil_pad", lambda: nn.AvgPool2d(2, 2, ceil_mode=True), (2, 0, 1)),
]


@pytest.mark.parametrize("label, make, rows", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_local_idioms_are_accepted_and_exact(label, make, rows):
    inner = make()
    module = randomize_(nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), inner=inner)), 7)
    geometry_inner = trace(inner.eval(), (1, 4, 64, 64), modules=inner).axes[0]
    if rows is not None:  # the block's own receptive field, by hand
        assert (geometry_inner.stride, geometry_inner.lo, geometry_inner.hi) == rows
    else:  # position-wise
        assert (geometry_inner.stride, geometry_inner.lo, geometry_inner.hi) == (1, 0, 0)
    s = StreamingCNN(module.double(), (12, 14), stitch="none")
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    assert s.plan((37, 45), torch.float64).num_tiles > 4
    assert_exact(s, x)


ACTIVATIONS = [nn.ReLU(inplace=True), nn.ReLU6(), nn.LeakyReLU(0.1, inplace=True), nn.LeakyReLU(0.2), nn.ELU(),
               nn.ELU(inplace=True), nn.CELU(), nn.SELU(), nn.GELU(), nn.SiLU(inplace=True), nn.Mish(),
               nn.Hardswish(), nn.Hardsigmoid(), nn.Hardtanh(), nn.Sigmoid(), nn.Tanh(), nn.Softplus(),
               nn.PReLU(4)]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda m: repr(m))
def test_every_elementwise_activation_is_accepted_and_exact(activation):
    """Whatever ATen tags as pointwise in the installed torch (leaky_relu is untagged in some)."""
    net = randomize_(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), activation, nn.Conv2d(4, 4, 3, 1, 1)), 0).double()
    s = StreamingCNN(net, 24)
    assert s.plan((50, 41)).pieces[0].num_tiles > 1
    assert_exact(s, torch.randn(2, 3, 50, 41, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Position-dependent operations (issue 9, item 1): an op whose effect depends on ABSOLUTE positions
# (a row index, a crop, a constant mask, a position code) would pick different pixels in a tile than
# in the image. Each is refused with the module's path; the local variants of the same idioms are
# accepted and exact.


class Positional(nn.Module):
    """``forward`` is a plain function of the feature map (named in the test id)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _write_row(x):  # the example: a whole image row zeroed
    x = x.clone()
    x[:, :, 5] = 0
    return x


def _write_column_slice(x):  # the second example
    x = x.clone()
    x[..., 5:6] = 0
    return x


def _write_constant_mask(x):
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    mask[..., 3, 3] = True
    x = x.clone()
    x[mask] = 0
    return x


def _write_position_code(x):  # a write of a constant that varies over space
    x = x.clone()
    x[:, :1] = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
    return x


def _arange_expand_as(x):  # a position code laid out like the map (accepted before: expand_as lent x's map)
    return x + torch.arange(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)


def _arange_type_as(x):  # the same through type_as (accepted before: type_as lent x's map)
    code = torch.arange(x.shape[-1], device=x.device).view(1, 1, 1, -1).expand(x.shape)
    return x + code.type_as(x)


def _arange_view_as(x):  # and through view_as
    return x + torch.arange(x.numel(), dtype=x.dtype, device=x.device).view_as(x)


def _new_tensor_code(x):  # new_tensor copies constant data (accepted before as a constant map)
    code = torch.arange(x.shape[-1], device=x.device).expand(x.shape)
    return x + x.new_tensor(code)


def _boolean_index_pool(x):  # x[True] adds a dim: the old index walk lost the spatial dims
    pooled = x[True].mean((3, 4))[0]
    return x * pooled[:, :, None, None]


def _kthvalue_spatial(x):  # kthvalue(k, dim): the old rule read k as the dim
    return x - x.kthvalue(1, 3, keepdim=True).values


def _vector_norm_spatial(x):  # vector_norm(x, ord, dim): likewise
    return x / torch.linalg.vector_norm(x, 1, 3, keepdim=True)


def _std_all(x):  # std(unbiased): the old rule read the bool as dim 0
    return x - x.std(False)


def _index_two_tensors(x):  # two index tensors broadcast into one dim
    idx = torch.tensor([0, 1], device=x.device)
    return x[idx, idx].unsqueeze(0)


POSITIONAL_REFUSED = [
    ("write_row", _write_row, "__setitem__", "spatial dimension"),
    ("write_column_slice", _write_column_slice, "__setitem__", "slices a spatial"),
    ("write_constant_mask", _write_constant_mask, "__setitem__", "spatial dimension"),
    ("write_position_code", _write_position_code, "__setitem__", "varies over space"),
    ("strided_slice", lambda x: x[:, :, ::2].repeat_interleave(2, 2)[:, :, : x.shape[2]], "__getitem__",
     "slices a spatial"),
    ("reversed_index", lambda x: x[..., list(range(x.shape[-1] - 1, -1, -1))], "__getitem__", "spatial"),
    ("boolean_index", _boolean_index_pool, "__getitem__", "boolean"),
    ("two_index_tensors", _index_two_tensors, "__getitem__", "several index tensors"),
    ("narrow_spatial", lambda x: F.pad(x.narrow(dim=3, start=1, length=x.shape[3] - 1), (0, 1)), "narrow",
     "spatial"),
    ("split_spatial_keyword", lambda x: torch.cat(x.split(x.shape[2] // 2 + 1, dim=2)[::-1], 2), "split",
     "spatial"),
    ("select_spatial", lambda x: x.select(-1, 0).unsqueeze(-1).expand_as(x), "select", "spatial"),
    ("kthvalue_spatial", _kthvalue_spatial, "kthvalue", "spatial"),
    ("vector_norm_spatial", _vector_norm_spatial, "linalg_vector_norm", "spatial"),
    ("std_all", _std_all, "std", "spatial"),
    ("sort_spatial_keyword", lambda x: x.sort(dim=-2).values, "sort", "spatial"),
    ("masked_fill_constant", lambda x: x.masked_fill(torch.eye(x.shape[-1], dtype=torch.bool), 0.0),
     "masked_fill", "varies over space"),
    ("where_constant", lambda x: torch.where(torch.eye(x.shape[-1], dtype=torch.bool), x, 0.0), "where",
     "varies over space"),
    ("arange_add", lambda x: x + torch.arange(x.shape[-1], dtype=x.dtype), "add", "varies over space"),
    ("arange_expand_as", _arange_expand_as, "add", "varies over space"),
    ("arange_type_as", _arange_type_as, "add", "varies over space"),
    ("arange_view_as", _arange_view_as, "add", "varies over space"),
    ("new_tensor_code", _new_tensor_code, "add", "varies over space"),
    ("constant_gather", lambda x: torch.arange(64.0)[x.argmax(1, keepdim=True)] + x, "__getitem__",
     "does not come from the input"),
    ("index_put", lambda x: x.clone().index_put_((torch.tensor([0]),) * 4, torch.tensor(0.0)), "index_put_",
     "not an operation"),
    ("index_fill", lambda x: x.index_fill(2, torch.tensor([3]), 0.0), "index_fill", "not an operation"),
    ("scatter", lambda x: x.clone().scatter_(3, torch.zeros(x.shape[:3] + (1,), dtype=torch.long), 0.0),
     "scatter_", "not an operation"),
    ("tril", lambda x: x.tril(), "tril", "not an operation"),
    ("triu", lambda x: torch.triu(x, 1), "triu", "not an operation"),
    ("diagonal", lambda x: x.diagonal(dim1=2, dim2=3).unsqueeze(-1).expand_as(x), "diagonal",
     "not an operation"),
    ("unfold", lambda x: F.pad(x.unfold(3, 2, 1)[..., 0], (0, 1)), "unfold", "not an operation"),
    ("as_strided", lambda x: x.as_strided(x.shape, x.stride()), "as_strided", "not an operation"),
    ("crop_by_negative_padding", lambda x: F.pad(x, (0, 0, 0, -2)), "pad", "negative padding"),
    ("crop_start_by_negative_padding", lambda x: F.pad(x, (-1, 1)), "pad", "negative padding"),
    ("flip", lambda x: x.flip(3), "flip", "flipping"),
    ("roll", lambda x: x.roll(1, 2), "roll", "wraps"),
]


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # new_tensor(tensor), on purpose
@pytest.mark.parametrize("label, fn, op, reason", POSITIONAL_REFUSED, ids=[r[0] for r in POSITIONAL_REFUSED])
def test_position_dependent_operations_are_refused_with_their_path(label, fn, op, reason):
    with pytest.raises(NonLocalModuleError) as info:
        StreamingCNN(wrapped(Positional(fn)), 256)
    err = info.value
    assert err.module_path == "stage.0.inner", str(err)
    assert err.operation == op, str(err)
    assert reason.lower() in str(err).lower(), str(err)


class WideBranch(nn.Module):
    """A map with a wider receptive field than its input, to be written into a copy of the input."""

    def __init__(self, fn):
        super().__init__()
        self.wide = nn.Conv2d(4, 4, 5, padding=2)
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.wide)


def _setitem_channels_from_wider_map(x, wide):  # y[:, :2] = ... makes y as wide as the written map
    y = x.clone()
    y[:, :2] = wide(x)[:, :2]
    return y


def _copy_into_view(x, wide):  # a write through a view widens the viewed tensor
    y = x.clone()
    y[:, 1:3].copy_(wide(x)[:, :2])
    return y


def _add_into_narrowed_view(x, wide):
    y = x * 1
    y.narrow(1, 0, 2).add_(wide(x)[:, 2:])
    return y


def _write_into_permuted_view(x, wide):
    y = x.clone()
    y.permute(0, 2, 3, 1)[..., 0] = wide(x)[:, 0]
    return y


def _border_mask(x, wide):  # conv of a constant map: zero padding makes it position dependent at the border
    return x + wide(torch.ones_like(x))


def _constant_map_like(x, wide):
    return torch.cat([wide(x), torch.zeros_like(x), x.new_full(x.shape, 2.0)], 1)[:, :4] + x.new_ones(x.shape)


def _mask_from_input(x, wide):  # a mask computed from the input is position-wise
    y = wide(x).clone()
    y[x > 0.3] = -1.0
    return y


def _uniform_constant_expanded(x, wide):
    bias = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
    return wide(x) * bias.expand_as(x)


def _full_slices(x, wide):  # full slices written out: every position alike
    return wide(x)[:, :, : x.shape[2], -x.shape[3]:] + x[:, :, 0:, ::1]


def _reduce_channels_keyword(x, wide):
    y = wide(x)
    return y - y.mean(dim=1, keepdim=True) + torch.amax(y, dim=-3, keepdim=True) * x.std(1, keepdim=True)


LOCAL_VARIANTS = [
    ("setitem_channels_from_wider_map", _setitem_channels_from_wider_map),
    ("copy_into_view", _copy_into_view),
    ("add_into_narrowed_view", _add_into_narrowed_view),
    ("write_into_permuted_view", _write_into_permuted_view),
    ("border_mask", _border_mask),
    ("constant_map_like", _constant_map_like),
    ("mask_from_input", _mask_from_input),
    ("uniform_constant_expanded", _uniform_constant_expanded),
    ("full_slices", _full_slices),
    ("reduce_channels_keyword", _reduce_channels_keyword),
]


@pytest.mark.parametrize("label, fn", LOCAL_VARIANTS, ids=[v[0] for v in LOCAL_VARIANTS])
def test_local_variants_of_positional_idioms_are_exact(label, fn):
    module = randomize_(nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), inner=WideBranch(fn))), 3)
    s = StreamingCNN(module.double(), (12, 14), stitch="none")
    assert s.plan((37, 45), torch.float64).num_tiles > 4
    assert_exact(s, torch.randn(2, 3, 37, 45, dtype=torch.float64))


class ScratchOut(nn.Module):
    """Writes a map into a tensor the module holds (``out=``): the trace would only write a meta copy."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scratch", torch.empty(0))

    def forward(self, x):
        torch.mul(x, 2.0, out=self.scratch)
        return x + 1


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_writes_into_module_tensors_are_refused():
    with pytest.raises(NonLocalModuleError, match=r"'stage\.0\.inner' \(mul\).*held by the module"):
        StreamingCNN(wrapped(ScratchOut()), 256)


def test_an_output_no_rule_tracked_is_refused(monkeypatch):
    """The tracer's safety net: a rule that forgets to give its output a map would let every later op on
    it pass unchecked (e.g. a global pooling), so the op is refused instead."""
    from timm_stream.engine.trace import rules

    monkeypatch.setitem(rules.RULES, "tanh", lambda call: ())  # a rule that tracks nothing
    with pytest.raises(NonLocalModuleError, match=r"'stage\.0\.inner' \(tanh\).*cannot follow"):
        StreamingCNN(wrapped(nn.Tanh()), 256)
