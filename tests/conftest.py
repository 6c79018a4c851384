"""Shared helpers for the streaming-engine tests.

Importable from the test modules (``from conftest import ...``): small local building blocks, a
builder for random local conv stacks from a plain-data spec, timm trunk extraction and exactness
assertions. Everything runs offline on the CPU.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, whatever a test creates

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from torch import nn

from timm_stream.engine import StreamingCNN
from timm_stream.testing import compare_streaming

# The tensors here are tiny: intra-op threads only add synchronization, which on a loaded 2-core
# machine made a 20x20 convolution ~100x slower (23 ms instead of 0.1 ms).
torch.set_num_threads(int(os.environ.get("TIMM_STREAM_TEST_THREADS", "1")))

# ---------------------------------------------------------------------------------------------
# hypothesis: no deadline (first examples pay for imports and tracing); `HYPOTHESIS_PROFILE=ci`
# makes runs reproducible, `thorough` multiplies every test's example count by 10 via EXAMPLES().

settings.register_profile("default", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True, database=None)
settings.register_profile("thorough", parent=settings.get_profile("default"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1


def EXAMPLES(n: int) -> int:  # noqa: N802 - reads like a constant at the call site
    return n * _SCALE


def pytest_configure(config):
    # torch warns about even 'same' kernels; the tests use them on purpose.
    config.addinivalue_line("filterwarnings", "ignore:Using padding='same':UserWarning")


# ---------------------------------------------------------------------------------------------
# Memory: `TIMM_STREAM_TEST_RSS=1 pytest ...` lists the tests that raised the process's peak RSS
# (ru_maxrss only grows, so each raise belongs to the test that ran). The suite is meant to stay
# under 3 GiB (an 8 GB laptop); this finds the test to blame when it does not.

_RSS_RAISES: list[tuple[float, float, str]] = []


def _peak_gib() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def pytest_runtest_protocol(item, nextitem):
    if os.environ.get("TIMM_STREAM_TEST_RSS"):
        item._rss_before = _peak_gib()


def pytest_runtest_teardown(item, nextitem):
    before = getattr(item, "_rss_before", None)
    if before is not None and _peak_gib() > before + 0.05:
        _RSS_RAISES.append((_peak_gib() - before, _peak_gib(), item.nodeid))


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("TIMM_STREAM_TEST_RSS"):
        terminalreporter.section("peak RSS raised by (GiB: raise, peak after)")
        for raised, peak, nodeid in sorted(_RSS_RAISES, reverse=True)[:15]:
            terminalreporter.write_line(f"+{raised:.2f}  {peak:.2f}  {nodeid}")
        terminalreporter.write_line(f"peak RSS of the test process: {_peak_gib():.2f} GiB")


EXACT = 1e-9  # float64 tolerance for "mathematically identical"
TRUNK_CHILDREN = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")


# ---------------------------------------------------------------------------------------------
# Small local building blocks


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels of an NCHW map (permute, F.layer_norm, permute back)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel trainable scale ``x * gamma.view(1, -1, 1, 1)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class Residual(nn.Module):
    """``act(main(x) + shortcut(x))`` with an identity shortcut when ``shortcut`` is None."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.main(x) + identity)


class Concat(nn.Module):
    """Channel concatenation of parallel branches."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class EvenOnly(nn.Module):
    """Two stride-2 branches whose outputs only line up on even sizes (like DLA's merges)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 2, 2, 0)

    def forward(self, x):
        return self.a(x) + self.b(x)


class ForwardCounter(nn.Module):
    """Identity that counts the calls it gets with real (non-meta) data."""

    def __init__(self):
        super().__init__()
        self.real_calls = 0

    def forward(self, x):
        if not x.is_meta:
            self.real_calls += 1
        return x


# ---------------------------------------------------------------------------------------------
# Random local conv stacks from a plain-data spec (so hypothesis prints and shrinks it readably)


def build_layer(spec: dict, cin: int) -> tuple[nn.Module, int]:
    """One layer of a stack from its spec; returns (module, output channels)."""
    kind = spec["kind"]
    if kind == "conv":
        cout = spec["cout"]
        conv = nn.Conv2d(cin, cout, spec["kernel"], stride=spec["stride"], padding=spec["padding"],
                         dilation=spec["dilation"], groups=spec["groups"], bias=spec["bias"],
                         padding_mode=spec["padding_mode"])
        return conv, cout
    if kind == "maxpool":
        return nn.MaxPool2d(spec["kernel"], spec["stride"], spec["padding"], dilation=spec["dilation"],
                            ceil_mode=spec["ceil_mode"]), cin
    if kind == "avgpool":
        return nn.AvgPool2d(spec["kernel"], spec["stride"], spec["padding"], ceil_mode=spec["ceil_mode"],
                            count_include_pad=spec["count_include_pad"]), cin
    if kind == "residual":
        cout, stride, dil, k = spec["cout"], spec["stride"], spec["dilation"], spec["kernel"]
        pad = tuple(d * (kk // 2) for d, kk in zip(dil, k))
        main = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, pad, dilation=dil, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, k, 1, pad, dilation=dil, bias=False), nn.BatchNorm2d(cout),
        )
        shortcut = None
        if stride != (1, 1) or cin != cout:  # timm-style downsample
            shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return Residual(main, shortcut), cout
    if kind == "concat":
        branches, total = [], 0
        for k, c in zip(spec["kernels"], spec["couts"]):
            branches.append(nn.Sequential(nn.Conv2d(cin, c, k, padding=(k[0] // 2, k[1] // 2)), nn.ReLU()))
            total += c
        if spec["pool_branch"]:
            branches.append(nn.MaxPool2d(3, 1, 1))
            total += cin
        return Concat(*branches), total
    if kind == "layerscale":
        return LayerScale(cin), cin
    if kind == "batchnorm":
        return nn.BatchNorm2d(cin), cin
    if kind == "layernorm2d":
        return LayerNorm2d(cin), cin
    if kind == "act":
        return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                "prelu": lambda: nn.PReLU(cin), "tanh": nn.Tanh}[spec["act"]](), cin
    raise ValueError(kind)


def build_stack(specs: Sequence[dict], in_channels: int) -> nn.Sequential:
    layers, c = OrderedDict(), in_channels
    for i, spec in enumerate(specs):
        layers[f"{spec['kind']}{i}"], c = build_layer(spec, c)
    return nn.Sequential(layers)


# hypothesis strategies for such specs

CHANNELS = st.sampled_from([2, 3, 4, 6])


def _pair(draw, values):
    return (draw(values), draw(values))


@st.composite
def conv_spec(draw, cin):
    cout = draw(CHANNELS)
    kernel = _pair(draw, st.integers(1, 5))
    stride = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)]))
    dilation = _pair(draw, st.sampled_from([1, 1, 2]))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate"]))
    if stride == (1, 1) and draw(st.booleans()):
        padding = "same"
    else:
        # from 'valid' to 'full' (wider padding, where outputs read only padding, has its own tests:
        # test_outputs_that_read_only_padding and the known limitation next to it)
        padding = tuple(draw(st.integers(0, d * (k - 1))) for k, d in zip(kernel, dilation))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0 and cout % g == 0]))
    return dict(kind="conv", cout=cout, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=draw(st.booleans()), padding_mode=padding_mode)


@st.composite
def pool_spec(draw):
    kernel = draw(st.integers(2, 3))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, kernel // 2))
    if draw(st.booleans()):
        return dict(kind="maxpool", kernel=kernel, stride=stride, padding=padding,
                    dilation=draw(st.sampled_from([1, 1, 2])), ceil_mode=draw(st.booleans()))
    return dict(kind="avgpool", kernel=kernel, stride=stride, padding=padding, ceil_mode=draw(st.booleans()),
                count_include_pad=draw(st.booleans()))


@st.composite
def residual_spec(draw):
    return dict(kind="residual", cout=draw(CHANNELS), stride=draw(st.sampled_from([(1, 1), (2, 2), (2, 1)])),
                kernel=draw(st.sampled_from([(3, 3), (1, 3), (3, 1), (5, 3)])),
                dilation=_pair(draw, st.sampled_from([1, 1, 2])))


@st.composite
def concat_spec(draw):
    n = draw(st.integers(1, 2))
    kernels = [draw(st.sampled_from([(1, 1), (3, 3), (1, 5), (5, 3)])) for _ in range(n)]
    return dict(kind="concat", kernels=kernels, couts=[draw(st.sampled_from([1, 2, 3])) for _ in range(n)],
                pool_branch=draw(st.booleans()))


SIMPLE = st.sampled_from([
    dict(kind="layerscale"), dict(kind="batchnorm"), dict(kind="layernorm2d"),
    dict(kind="act", act="relu"), dict(kind="act", act="gelu"), dict(kind="act", act="prelu"),
    dict(kind="act", act="silu"), dict(kind="act", act="tanh"),
])


def out_channels(spec, cin):
    if spec["kind"] in ("conv", "residual"):
        return spec["cout"]
    if spec["kind"] == "concat":
        return sum(spec["couts"]) + (cin if spec["pool_branch"] else 0)
    return cin


@st.composite
def local_stacks(draw):
    """A random local conv stack as plain data: (in_channels, [layer specs])."""
    cin = draw(st.sampled_from([1, 2, 3]))
    specs, c, strides = [], cin, 0
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "pool", "residual", "concat", "simple", "simple"]))
        if kind == "conv":
            spec = draw(conv_spec(c))
        elif kind == "pool":
            spec = draw(pool_spec())
        elif kind == "residual":
            spec = draw(residual_spec())
        elif kind == "concat":
            spec = draw(concat_spec())
        else:
            spec = draw(SIMPLE)
            # LayerNorm over 1 channel is constant, over 2 it is +-1 (then an earlier LayerNorm's scale
            # gets a gradient of rounding noise only, whose relative error means nothing); right after
            # another LayerNorm the same holds nearly (rel. error 1e-9..4e-8 on the un-tiled run's own
            # rounding), so that pair is not drawn either.
            if spec["kind"] == "layernorm2d" and (c < 3 or (specs and specs[-1].get("kind") == "layernorm2d")):
                continue
        stride = spec.get("stride", 1)
        step = max(stride) if isinstance(stride, tuple) else stride
        if step > 1 and strides >= 3:  # total stride at most 8: keeps small images meaningful
            continue
        strides += step > 1
        specs.append(spec)
        c = out_channels(spec, c)
    assume(specs)
    return cin, specs


# ---------------------------------------------------------------------------------------------
# timm trunks


def timm_trunk(name: str, **kwargs) -> nn.Sequential:
    """The feature trunk (stem + stages, no global pool / head) of a timm ResNet-family model."""
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    return nn.Sequential(OrderedDict((k, getattr(model, k)) for k in TRUNK_CHILDREN))


# ---------------------------------------------------------------------------------------------
# Exactness


def streaming_setter(s: StreamingCNN):
    return lambda value: setattr(s, "streaming", value)


def assert_exact(s: StreamingCNN, x: torch.Tensor, tol: float = EXACT, *, input_grad: bool = True,
                 every_param: bool = True):
    """Streamed vs un-tiled: output, input gradient and every trainable parameter's gradient."""
    c = compare_streaming(s, x, streaming_setter(s), input_grad=input_grad)
    assert c.output <= tol, f"output rel err {c.output:.3g}"
    if input_grad and x.is_floating_point():
        assert c.input_grad is not None and c.input_grad <= tol, f"input grad rel err {c.input_grad}"
    name, worst = c.worst_param()
    assert worst <= tol, f"gradient of {name}: rel err {worst:.3g}"
    if every_param:
        trainable = {n for n, p in s.named_parameters() if p.requires_grad}
        assert set(c.param_grads) == trainable, f"no gradient for {sorted(trainable - set(c.param_grads))}"
    return c
