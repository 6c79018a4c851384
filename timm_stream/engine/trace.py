"""Derive a module's streaming geometry by running it once on shape-only ("meta") tensors.

:func:`trace` runs ``fn(x)`` with ``x`` on the meta device under a ``TorchFunctionMode``: no data is
computed and nothing is allocated, so tracing costs the same for a 64 px and a 65536 px input. Every
torch call is intercepted; for each tensor that depends on the input (a *map*) the tracer keeps which
dimensions are spatial and the :class:`~.geometry.AxisGeometry` of each spatial axis. Calls on
parameters and constants only (weight standardization, layer-scale reshapes) run untouched.

Each operation on a map is either a known local operation, whose geometry rule is below, or refused
with a :class:`~.errors.NonLocalModuleError` naming the module that issued it. Nothing unknown is let
through: a wrong answer is worse than an error. The known operations are

* windows: ``conv2d`` (any kernel shape, stride, padding incl. ``'same'``, dilation, groups),
  ``max_pool2d`` / ``avg_pool2d`` / ``lp_pool2d`` (incl. ``ceil_mode``), ``pad`` (not circular);
* position-wise: every ATen op tagged pointwise (activations, arithmetic, comparisons...), eval-mode
  ``batch_norm``, ``layer_norm`` / ``rms_norm`` over non-spatial dims, ``linear`` on a non-spatial
  last dim, reductions and softmax over non-spatial dims, disabled dropout;
* layout: permutations, reshapes that keep both spatial dims intact, channel slicing / splitting /
  concatenation, dtype casts and copies.

The trace also records a signature per operation (module path, op, non-spatial parameters). Two traces
at input sizes of different parity must have equal signatures; otherwise the module computes something
that depends on the input size (timm's ``Conv2dSame``), which would differ between a tile and the image.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from .errors import NonLocalModuleError, TraceError
from .geometry import AxisGeometry, lcm

__all__ = ["Trace", "OpRecord", "trace", "check_size_independent"]


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
class _Map:
    """An input-dependent tensor: which of its dims are (H, W), and their geometry."""

    dims: tuple[int, int]
    axes: tuple[AxisGeometry, AxisGeometry]

    def moved(self, dims: Sequence[int]) -> "_Map":
        return _Map((dims[0], dims[1]), self.axes)

    def union(self, other: "_Map") -> "_Map":
        return _Map(self.dims, (self.axes[0].union(other.axes[0]), self.axes[1].union(other.axes[1])))


class _Refused(Exception):
    """Raised by a rule; turned into a NonLocalModuleError carrying the module path."""

    def __init__(self, reason: str, fix: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


# ----------------------------------------------------------------------------------------------
# Operation names and classes

_DUNDER = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub", "__rsub__": "rsub",
    "__isub__": "sub_", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_", "__truediv__": "div",
    "__rtruediv__": "div", "__itruediv__": "div_", "__div__": "div", "__rdiv__": "div", "__pow__": "pow",
    "__rpow__": "pow", "__ipow__": "pow_", "__neg__": "neg", "__abs__": "abs", "__and__": "bitwise_and",
    "__or__": "bitwise_or", "__xor__": "bitwise_xor", "__invert__": "bitwise_not", "__eq__": "eq",
    "__ne__": "ne", "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
    "__floordiv__": "floor_divide", "__rfloordiv__": "floor_divide", "__mod__": "remainder",
    "__rmod__": "remainder", "__matmul__": "matmul", "__rmatmul__": "matmul",
}

_RANDOM = frozenset({
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
    "randperm", "normal", "normal_", "uniform_", "exponential_", "geometric_", "log_normal_",
    "cauchy_", "random_", "multinomial", "poisson", "native_dropout",
})

# Element-wise activations, by name: ATen's pointwise tags differ between torch versions (torch 2.11
# does not tag leaky_relu, 2.14 does), and the registry must not depend on which one checked it.
_ACTIVATIONS = frozenset({"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu",
                          "celu_", "selu", "selu_", "gelu", "gelu_", "silu", "silu_", "mish", "mish_",
                          "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh",
                          "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus"})
# Position-wise ops ATen does not tag as pointwise (or whose extra tensors do not broadcast).
_EXTRA_POINTWISE = _ACTIVATIONS | {"copy_", "softsign", "tanhshrink", "logsigmoid", "masked_fill",
                                   "masked_fill_", "type_as", "nan_to_num", "clip", "clip_"}

_NON_LOCAL = {
    "adaptive_avg_pool1d": "adaptive pooling averages a window that depends on the input size",
    "adaptive_avg_pool2d": "adaptive pooling averages a window that depends on the input size",
    "adaptive_avg_pool3d": "adaptive pooling averages a window that depends on the input size",
    "adaptive_max_pool1d": "adaptive pooling pools a window that depends on the input size",
    "adaptive_max_pool2d": "adaptive pooling pools a window that depends on the input size",
    "adaptive_max_pool3d": "adaptive pooling pools a window that depends on the input size",
    "group_norm": "GroupNorm normalizes each group with statistics of the whole feature map",
    "instance_norm": "InstanceNorm normalizes with statistics of the whole feature map",
    "interpolate": "resampling maps positions by a scale that is not a fixed stride",
    "upsample": "resampling maps positions by a scale that is not a fixed stride",
    "upsample_nearest": "resampling maps positions by a scale that is not a fixed stride",
    "upsample_bilinear": "resampling maps positions by a scale that is not a fixed stride",
    "grid_sample": "sampling at computed coordinates is not local",
    "conv_transpose1d": "transposed convolutions are not supported in the streamed part",
    "conv_transpose2d": "transposed convolutions are not supported in the streamed part",
    "conv_transpose3d": "transposed convolutions are not supported in the streamed part",
    "pixel_shuffle": "pixel (un)shuffle is not supported in the streamed part",
    "pixel_unshuffle": "pixel (un)shuffle is not supported in the streamed part",
    "roll": "rolling wraps the feature map around its border",
    "flip": "flipping reverses positions across the whole feature map",
    "matmul": "matrix products mix spatial positions (attention)",
    "bmm": "matrix products mix spatial positions (attention)",
    "einsum": "einsum may mix spatial positions",
    "scaled_dot_product_attention": "attention mixes all spatial positions",
}

# Ops whose output has the shape and dtype of their first argument.
_SAME_SHAPE = _ACTIVATIONS | {"batch_norm", "layer_norm", "rms_norm"}
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
          "bfloat16": torch.bfloat16}
_IDENTITY = frozenset({"contiguous", "clone", "detach", "detach_", "requires_grad_", "cpu", "cuda",
                       "to", "type", "type_as", "pin_memory", "data", "float", "double", "half",
                       "bfloat16", "_to_copy", "alias"})
_PERMUTATIONS = frozenset({"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim",
                           "moveaxis", "t", "T", "mT", "H", "mH", "adjoint"})
_RESHAPES = frozenset({"view", "reshape", "_reshape_alias", "flatten", "unflatten", "squeeze",
                       "squeeze_", "unsqueeze", "unsqueeze_", "view_as", "reshape_as", "_unsafe_view"})
_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
_CREATIONS = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like",
                        "full_like", "empty_like", "new_tensor"})
_REDUCTIONS = frozenset({"mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "std",
                         "var", "std_mean", "var_mean", "logsumexp", "norm", "prod", "any", "all",
                         "argmax", "argmin", "median", "nanmedian", "count_nonzero", "aminmax",
                         "vector_norm", "linalg_vector_norm", "mode", "kthvalue"})
_SHAPE_KEEPING_ALONG_DIM = frozenset({"softmax", "log_softmax", "softmin", "cumsum", "cumprod",
                                      "cummax", "cummin", "logcumsumexp", "normalize", "glu", "sort",
                                      "argsort", "topk"})
_SPLITS = frozenset({"split", "chunk", "tensor_split", "split_with_sizes", "narrow", "index_select",
                     "unbind", "select", "unsafe_split", "unsafe_chunk", "hsplit", "vsplit"})
_CATS = frozenset({"cat", "concat", "concatenate", "stack"})
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                       "feature_alpha_dropout", "dropout_", "rrelu", "rrelu_"})


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # property access such as x.shape or x.T: name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return _DUNDER.get(name, name)


@functools.lru_cache(maxsize=None)
def _is_pointwise(name: str) -> bool:
    if name in _EXTRA_POINTWISE:
        return True
    for candidate in (name, name.rstrip("_")):
        op = getattr(torch.ops.aten, candidate, None) if candidate else None
        if op is None or not hasattr(op, "overloads"):
            continue
        try:
            if any(torch.Tag.pointwise in getattr(op, ov).tags for ov in op.overloads()):
                return True
        except Exception:  # pragma: no cover - exotic op packets
            continue
    return False


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: Sequence[Any]) -> dict:
    bound = dict(zip(names, defaults))
    for name, value in zip(names, args):
        bound[name] = value
    for name, value in kwargs.items():
        if name in bound:
            bound[name] = value
    return bound


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _to_meta(t: Tensor) -> Tensor:
    return t if t.is_meta else t.detach().to("meta")


# ----------------------------------------------------------------------------------------------
# The tracer


class _Call:
    """One intercepted call, as seen by a geometry rule."""

    def __init__(self, tracer: "_Tracer", func: Callable, name: str, args: tuple, kwargs: dict, out: Any):
        self.tracer, self.func, self.name = tracer, func, name
        self.args, self.kwargs, self.out = args, kwargs, out

    def map_of(self, t: Any) -> _Map | None:
        return self.tracer.map_of(t) if isinstance(t, Tensor) else None

    @property
    def input(self) -> Tensor:
        return self.args[0]

    @property
    def input_map(self) -> _Map:
        m = self.map_of(self.args[0])
        if m is None:  # a map passed as keyword, or not first: find it
            for t in _tensors((self.args, self.kwargs)):
                m = self.map_of(t)
                if m is not None:
                    return m
            raise AssertionError("rule called without an input-dependent tensor")
        return m

    def bind(self, names: Sequence[str], defaults: Sequence[Any]) -> dict:
        return _bind(self.args, self.kwargs, names, defaults)


class _Tracer(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._maps: dict[int, tuple[Tensor, _Map]] = {}
        self.records: list[OpRecord] = []
        self.strides: tuple[set[int], set[int]] = ({1}, {1})
        self.path: list[str] = [""]
        self.elements = 0

    # -- bookkeeping
    def map_of(self, t: Tensor) -> _Map | None:
        entry = self._maps.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def assign(self, t: Tensor, m: _Map, allocates: bool = True) -> None:
        self._maps[id(t)] = (t, m)  # holding t keeps its id unique for the trace's lifetime
        self.strides[0].add(m.axes[0].stride)
        self.strides[1].add(m.axes[1].stride)
        if allocates:
            self.elements += t.numel()

    def refuse(self, op: str, reason: str, fix: str | None = None) -> None:
        raise NonLocalModuleError(self.path[-1], op, reason, fix)

    # -- interception
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _RANDOM:
            self.refuse(name, "it draws random numbers, so every tile would draw different ones",
                        "Disable dropout / stochastic depth in the streamed part (rate 0) or use eval mode")
        has_map = any(self.map_of(t) is not None for t in _tensors((args, kwargs)))
        if name in _NON_LOCAL and has_map:
            self.refuse(name, _NON_LOCAL[name])
        out = self._run(func, name, args, kwargs)
        if not has_map or not any(True for _ in _tensors(out)):
            return out
        rule = _RULES.get(name)
        if rule is None:
            if _is_pointwise(name):
                rule = _pointwise
            elif name in _REDUCTIONS:
                rule = _reduction
            else:
                self.refuse(name, f"'{name}' is not an operation the streaming engine knows to be local",
                            "Keep it out of the streamed part (stream fewer stages)")
        call = _Call(self, func, name, args, kwargs, out)
        try:
            key = rule(call)
        except _Refused as refusal:
            self.refuse(name, refusal.reason, refusal.fix)
        self.records.append(OpRecord(self.path[-1], name, key))
        return out

    def _run(self, func, name: str, args: tuple, kwargs: dict):
        meta_args, meta_kwargs = tree_map_only(Tensor, _to_meta, (args, kwargs))
        if name in _IDENTITY:
            # device moves cannot run on meta tensors; only the dtype matters for the trace
            source = meta_args[0]
            dtype = _CASTS.get(name)
            for a in list(meta_args[1:]) + list(meta_kwargs.values()):
                if isinstance(a, torch.dtype):
                    dtype = a
                elif isinstance(a, Tensor) and name in ("to", "type_as"):
                    dtype = a.dtype
            return source.to(dtype) if dtype is not None else source
        source = meta_args[0] if meta_args and isinstance(meta_args[0], Tensor) else None
        if source is not None and name in _SAME_SHAPE and self.map_of(args[0]) is not None:
            # Shape-preserving ops: skip their (slow, Python-decomposed) meta kernels.
            if name.endswith("_") or (name in ("relu", "relu6", "hardtanh", "silu", "hardswish", "mish",
                                                "leaky_relu", "elu", "celu", "selu", "hardsigmoid")
                                      and (kwargs.get("inplace") or (len(args) > 1 and args[-1] is True))):
                return source
            return torch.empty_like(source)
        if name == "conv2d":
            _check_conv_channels(self.path[-1], args, kwargs)
        if name in self._META_INPLACE_GUARD and isinstance(args[0], Tensor) and not args[0].is_meta:
            if any(self.map_of(t) is not None for t in _tensors((args[1:], kwargs))):
                self.refuse(name, "it writes input-dependent values into a tensor held by the module")
        try:
            return func(*meta_args, **meta_kwargs)
        except NonLocalModuleError:
            raise
        except Exception as exc:
            raise TraceError(
                f"module '{self.path[-1] or '<root>'}' failed during shape tracing in '{name}': {exc}"
            ) from exc

    _META_INPLACE_GUARD = frozenset({"copy_", "__setitem__", "add_", "mul_", "sub_", "div_",
                                     "index_copy_", "index_add_", "masked_scatter_", "scatter_"})


def _check_conv_channels(path: str, args: tuple, kwargs: dict) -> None:
    """Meta convolutions only say 'Invalid channel dimensions'; give torch's usual message."""
    b = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
              (None, None, None, 1, 0, 1, 1))
    x, weight, groups = b["input"], b["weight"], b["groups"]
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() >= 3:
        expected = weight.shape[1] * groups
        if x.shape[-3] != expected:
            raise TraceError(
                f"module '{path or '<root>'}': Given groups={groups}, weight of size {list(weight.shape)}, "
                f"expected input{list(x.shape)} to have {expected} channels, but got {x.shape[-3]} channels "
                "instead")


# ----------------------------------------------------------------------------------------------
# Geometry rules. Each assigns maps to the call's outputs and returns the op's signature key.


def _spatial_last_two(call: _Call, m: _Map) -> None:
    ndim = call.input.dim()
    if m.dims != (ndim - 2, ndim - 1):
        raise _Refused("its window would slide over non-spatial dimensions")


def _conv2d(call: _Call) -> tuple:
    b = call.bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  (None, None, None, 1, 0, 1, 1))
    m = call.map_of(b["input"])
    if m is None:
        raise _Refused("the convolution weight depends on the input")
    _spatial_last_two(call, m)
    kernel = tuple(b["weight"].shape[-2:])
    stride, dilation = _pair(b["stride"]), _pair(b["dilation"])
    padding = b["padding"]
    if isinstance(padding, str):
        if padding == "valid":
            before = (0, 0)
        else:  # 'same' (stride 1 only, checked by torch): PyTorch puts the odd pixel after
            before = tuple((dilation[i] * (kernel[i] - 1)) // 2 for i in range(2))
        padding_key: Any = padding
    else:
        before = _pair(padding)
        padding_key = before
    axes = tuple(m.axes[i].window(kernel[i], stride[i], before[i], dilation[i]) for i in range(2))
    call.tracer.assign(call.out, _Map(m.dims, axes))
    return (kernel, stride, padding_key, dilation, b["groups"])


def _pool(call: _Call, names: Sequence[str], defaults: Sequence[Any]) -> tuple:
    b = call.bind(names, defaults)
    m = call.map_of(b["input"])
    _spatial_last_two(call, m)
    if b.get("return_indices"):
        raise _Refused("max-pooling indices are positions inside the tile, not the image")
    kernel = _pair(b["kernel_size"])
    stride = kernel if b["stride"] is None or b["stride"] == [] or b["stride"] == () else _pair(b["stride"])
    padding, dilation = _pair(b.get("padding", 0)), _pair(b.get("dilation", 1))
    axes = tuple(m.axes[i].window(kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
    outs = list(_tensors(call.out))
    call.tracer.assign(outs[0], _Map(m.dims, axes))
    extra = tuple((k, b[k]) for k in ("ceil_mode", "count_include_pad", "divisor_override", "norm_type") if k in b)
    return (kernel, stride, padding, dilation) + extra


def _max_pool2d(call: _Call) -> tuple:
    return _pool(call, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                 (None, None, None, 0, 1, False, False))


def _avg_pool2d(call: _Call) -> tuple:
    return _pool(call, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                        "divisor_override"), (None, None, None, 0, False, True, None))


def _lp_pool2d(call: _Call) -> tuple:
    return _pool(call, ("input", "norm_type", "kernel_size", "stride", "ceil_mode"), (None, None, None, None, False))


def _pad(call: _Call) -> tuple:
    b = call.bind(("input", "pad", "mode", "value"), (None, None, "constant", None))
    m = call.map_of(b["input"])
    ndim = b["input"].dim()
    pads = tuple(int(p) for p in b["pad"])
    axes = list(m.axes)
    for axis, dim in enumerate(m.dims):
        j = ndim - 1 - dim  # pads are given for the last dims first
        if 2 * j + 1 < len(pads) and (pads[2 * j] or pads[2 * j + 1]):
            if b["mode"] == "circular":
                raise _Refused("circular padding wraps the far border of the image around")
            g = axes[axis].shift(pads[2 * j])
            if b["mode"] in ("reflect", "replicate") and not g.empty:
                # Padding copies values from inside the border, up to twice (reflect) or once
                # (replicate) the padding away: a tile at the border must hold them, computed
                # correctly, and (reflect) be wider than the padding. Wider than needed inside.
                r = max(pads[2 * j], pads[2 * j + 1]) * (2 if b["mode"] == "reflect" else 1) * g.stride
                g = AxisGeometry(g.stride, g.lo - r, g.hi + r)
            axes[axis] = g
    call.tracer.assign(call.out, _Map(m.dims, (axes[0], axes[1])))
    return (pads, b["mode"], b["value"])


def _constant_pad_nd(call: _Call) -> tuple:
    b = call.bind(("input", "pad", "value"), (None, None, 0))
    call.kwargs = {"input": b["input"], "pad": b["pad"], "mode": "constant", "value": b["value"]}
    call.args = ()
    return _pad(call)


def _batch_norm(call: _Call) -> tuple:
    b = call.bind(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                  (None, None, None, None, None, False, 0.1, 1e-5))
    m = call.map_of(b["input"])
    if m is None:
        raise _Refused("batch-norm statistics depend on the input")
    if b["training"]:
        raise _Refused("BatchNorm in training mode normalizes with statistics of the whole batch and "
                       "feature map", "Put it in eval mode (StreamingCNN freezes the norms it contains)")
    if 1 in m.dims:
        raise _Refused("batch norm would normalize over a spatial dimension")
    call.tracer.assign(call.out, m)
    return ()


def _layer_norm(call: _Call) -> tuple:
    b = call.bind(("input", "normalized_shape", "weight", "bias", "eps"), (None, None, None, None, 1e-5))
    m = call.map_of(b["input"])
    shape = b["normalized_shape"]
    count = 1 if isinstance(shape, int) else len(shape)
    ndim = b["input"].dim()
    if any(d >= ndim - count for d in m.dims):
        raise _Refused("it normalizes over the spatial dimensions")
    call.tracer.assign(call.out, m)
    return (tuple(shape) if not isinstance(shape, int) else (shape,),)


def _local_response_norm(call: _Call) -> tuple:
    m = call.input_map
    if 1 in m.dims:
        raise _Refused("it normalizes across a spatial dimension")
    call.tracer.assign(call.out, m)
    return tuple(a for a in call.args[1:] if not isinstance(a, Tensor))


def _linear(call: _Call) -> tuple:
    m = call.input_map
    if call.map_of(call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")) is not None:
        raise _Refused("the linear weight depends on the input")
    if call.input.dim() - 1 in m.dims:
        raise _Refused("it mixes positions along a spatial dimension (linear over the last dim)")
    call.tracer.assign(call.out, m)
    return ()


def _dropout(call: _Call) -> tuple:
    b = call.bind(("input", "p", "training", "inplace"), (None, 0.5, True, False))
    if call.name.startswith("rrelu"):
        b = call.bind(("input", "lower", "upper", "training", "inplace"), (None, 1 / 8, 1 / 3, False, False))
        b["p"] = 1.0
    if b["training"] and b["p"] > 0:
        raise _Refused("in training it draws a random mask per tile, unlike the un-tiled run",
                       "Set its rate to 0 in the streamed part or put it in eval mode")
    m = call.input_map
    call.tracer.assign(call.out, m, allocates=False)
    return (b["p"] if b["training"] else 0.0,)


def _identity(call: _Call) -> tuple:
    m = call.input_map
    call.tracer.assign(call.out, m, allocates=call.name in ("clone", "contiguous"))
    return ()


def _prelu(call: _Call) -> tuple:
    m = call.input_map
    if call.map_of(call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")) is not None:
        raise _Refused("the PReLU weight depends on the input")
    call.tracer.assign(call.out, m)
    return ()


def _pointwise(call: _Call) -> tuple:
    """Broadcasting position-wise op: all maps must sit on the same grid; other tensors must not vary
    over space (a tensor that does would be tied to absolute positions, e.g. a position embedding)."""
    outs = [t for t in _tensors(call.out)]
    out_ndim = outs[0].dim()
    out_shape = outs[0].shape
    result: _Map | None = None
    for t in _tensors((call.args, call.kwargs)):
        offset = out_ndim - t.dim()
        m = call.map_of(t)
        if m is None:
            continue
        dims = (m.dims[0] + offset, m.dims[1] + offset)
        if any(t.shape[d] != out_shape[d + offset] for d in m.dims):
            raise _Refused("a feature map is broadcast over space (a global feature, e.g. from global pooling)")
        moved = m.moved(dims)
        if result is None:
            result = moved
        elif result.dims != moved.dims:
            raise _Refused("it combines feature maps whose spatial dimensions do not line up")
        else:
            try:
                result = result.union(moved)
            except ValueError as exc:
                raise _Refused(str(exc))
    assert result is not None
    for t in _tensors((call.args, call.kwargs)):
        if call.map_of(t) is not None:
            continue
        offset = out_ndim - t.dim()
        for d in result.dims:
            if d - offset >= 0 and t.shape[d - offset] != 1:
                raise _Refused("it combines the feature map with a tensor that varies over space "
                               "(tied to absolute positions, e.g. a position embedding)")
    inplace = any(out is a for out in outs for a in call.args if isinstance(a, Tensor))
    for out in outs:
        call.tracer.assign(out, result, allocates=not inplace)
    return ()


def _dims_arg(call: _Call, position: int, default: Any = None) -> Any:
    if len(call.args) > position:
        return call.args[position]
    return call.kwargs.get("dim", call.kwargs.get("axis", default))


def _reduction(call: _Call) -> tuple:
    m = call.input_map
    x = call.input
    ndim = x.dim()
    if call.name in ("max", "min") and len(call.args) > 1 and isinstance(call.args[1], Tensor):
        return _pointwise(call)  # torch.max(a, b) is element-wise
    position = 2 if call.name in ("norm",) else 1
    dim = _dims_arg(call, position)
    if isinstance(dim, str) or (call.name == "norm" and len(call.args) > 1 and call.args[1] is not None
                                 and not isinstance(call.args[1], (int, float, str)) and position == 1):
        dim = None
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0 and call.name != "sum"):
        reduced = set(range(ndim))
    else:
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
        reduced = {_normalize_dim(int(d), ndim) for d in dims}
    if reduced & set(m.dims):
        raise _Refused("it reduces over the spatial dimensions (global pooling, e.g. squeeze-excitation "
                       "or a global attention gate)")
    for out in _tensors(call.out):
        if out.dim() == ndim:
            new_dims = m.dims
        else:
            new_dims = tuple(d - sum(1 for r in reduced if r < d) for d in m.dims)
        call.tracer.assign(out, m.moved(new_dims))
    return (tuple(sorted(reduced)),)


def _along_dim(call: _Call) -> tuple:
    m = call.input_map
    ndim = call.input.dim()
    if call.name == "normalize":
        dim = _bind(call.args, call.kwargs, ("input", "p", "dim"), (None, 2.0, 1))["dim"]
    elif call.name == "glu":
        dim = _dims_arg(call, 1, -1)
    elif call.name == "topk":
        dim = _bind(call.args, call.kwargs, ("input", "k", "dim"), (None, None, -1))["dim"]
    elif call.name in ("sort", "argsort"):
        dim = _dims_arg(call, 1, -1)
    else:
        dim = _dims_arg(call, 1)
        if dim is None:  # legacy implicit softmax dim
            dim = 0 if ndim in (0, 1, 3) else 1
    dim = _normalize_dim(int(dim), ndim)
    if dim in m.dims:
        raise _Refused("it normalizes or accumulates along a spatial dimension")
    for out in _tensors(call.out):
        call.tracer.assign(out, m)
    return (dim,)


def _permutation(call: _Call) -> tuple:
    m = call.input_map
    ndim = call.input.dim()
    # Apply the same op to a probe whose sizes name its dims, and read where they went.
    probe = torch.empty(tuple(range(2, ndim + 2)), device="meta")
    moved = call.func(probe, *call.args[1:], **call.kwargs)
    where = {size - 2: pos for pos, size in enumerate(moved.shape)}
    new_dims = (where[m.dims[0]], where[m.dims[1]])
    call.tracer.assign(call.out, m.moved(new_dims), allocates=False)
    return tuple(moved.shape)


def _reshape(call: _Call) -> tuple:
    m = call.input_map
    in_shape, out_shape = tuple(call.input.shape), tuple(call.out.shape)
    new_dims = []
    for d in m.dims:
        before = math.prod(in_shape[:d])
        found = None
        for e in range(len(out_shape)):
            if math.prod(out_shape[:e]) == before and out_shape[e] == in_shape[d]:
                found = e
                break
        if found is None:
            raise _Refused("it reshapes a spatial dimension (flattening or folding the feature map)")
        new_dims.append(found)
    call.tracer.assign(call.out, m.moved(new_dims), allocates=False)
    hide = lambda shape, dims: tuple(-1 if i in dims else s for i, s in enumerate(shape))  # noqa: E731
    return (hide(in_shape, m.dims), hide(out_shape, new_dims))


def _expand(call: _Call) -> tuple:
    m = call.input_map
    offset = call.out.dim() - call.input.dim()
    dims = (m.dims[0] + offset, m.dims[1] + offset)
    if any(call.out.shape[e] != call.input.shape[d] for d, e in zip(m.dims, dims)):
        raise _Refused("it broadcasts a feature map over space")
    call.tracer.assign(call.out, m.moved(dims), allocates=False)
    return (offset,)


def _creation(call: _Call) -> tuple:
    # A tensor made *like* a map has the map's layout but reads no pixel: a constant map.
    m = call.input_map
    out = call.out
    if out.dim() == call.input.dim() and all(out.shape[d] == call.input.shape[d] for d in m.dims):
        const = tuple(AxisGeometry.constant(a.stride) for a in m.axes)
        call.tracer.assign(out, _Map(m.dims, (const[0], const[1])))
    elif any(out.shape[d] != 1 for d in range(out.dim())[-2:]) and out.dim() >= 2:
        pass  # a spatially sized constant not tied to the map's grid is caught when combined
    return (tuple(s if i not in m.dims else -1 for i, s in enumerate(out.shape)),)


def _getitem(call: _Call) -> tuple:
    m = call.input_map
    index = call.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    ndim = call.input.dim()
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis and not isinstance(it, bool))
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - consumed) + items[at + 1:]
    else:
        items = items + [slice(None)] * (ndim - consumed)
    in_dim = out_dim = 0
    mapping: dict[int, int] = {}
    key = []
    for it in items:
        if it is None:
            out_dim += 1
            key.append(None)
            continue
        if isinstance(it, slice):
            full = it.start in (None, 0) and it.stop is None and it.step in (None, 1)
            if in_dim in m.dims and not full:
                raise _Refused("it slices a spatial dimension (cropping depends on the tile)")
            mapping[in_dim] = out_dim
            key.append((it.start, it.stop, it.step) if in_dim not in m.dims else ":")
            in_dim += 1
            out_dim += 1
        elif isinstance(it, int):
            if in_dim in m.dims:
                raise _Refused("it indexes a spatial dimension")
            key.append(it)
            in_dim += 1
        elif isinstance(it, (Tensor, list)) and (not isinstance(it, Tensor) or it.dim() <= 1):
            if in_dim in m.dims:
                raise _Refused("it indexes a spatial dimension")
            mapping[in_dim] = out_dim
            key.append("index")
            in_dim += 1
            out_dim += 1
        else:
            raise _Refused("advanced indexing of a feature map")
    call.tracer.assign(call.out, m.moved((mapping[m.dims[0]], mapping[m.dims[1]])), allocates=False)
    return tuple(key)


def _split(call: _Call) -> tuple:
    m = call.input_map
    ndim = call.input.dim()
    defaults = {"narrow": 0, "index_select": 0, "select": 0, "hsplit": 1, "vsplit": 0}
    if call.name in ("narrow", "index_select", "select"):
        dim = _dims_arg(call, 1, 0)
    elif call.name in ("hsplit", "vsplit"):
        dim = defaults[call.name]
    else:
        dim = _dims_arg(call, 2, 0)
    if call.name == "unbind":
        dim = _dims_arg(call, 1, 0)
    dim = _normalize_dim(int(dim), ndim)
    if dim in m.dims:
        raise _Refused("it splits a feature map along a spatial dimension")
    removes = call.name in ("unbind", "select")
    new_dims = tuple(d - (1 if removes and d > dim else 0) for d in m.dims)
    for out in _tensors(call.out):
        call.tracer.assign(out, m.moved(new_dims), allocates=call.name == "index_select")
    return (call.name, dim)


def _cat(call: _Call) -> tuple:
    tensors = list(call.args[0]) if call.args else list(call.kwargs["tensors"])
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", call.kwargs.get("axis", 0))
    ndim = tensors[0].dim()
    result: _Map | None = None
    for m in (call.map_of(t) for t in tensors):
        if m is None:
            raise _Refused("it concatenates a feature map with a tensor that does not come from the input")
        if result is None:
            result = m
        elif m.dims != result.dims:
            raise _Refused("it concatenates feature maps whose spatial dimensions do not line up")
        else:
            try:
                result = result.union(m)
            except ValueError as exc:
                raise _Refused(str(exc))
    assert result is not None
    if call.name == "stack":
        dim = _normalize_dim(int(dim), ndim + 1)
        result = result.moved(tuple(d + (1 if d >= dim else 0) for d in result.dims))
    else:
        dim = _normalize_dim(int(dim), ndim)
        if dim in result.dims:
            raise _Refused("it concatenates feature maps along a spatial dimension")
    call.tracer.assign(call.out, result)
    return (dim, len(tensors))


def _setitem(call: _Call) -> tuple:
    target, index, value = call.args[0], call.args[1], call.args[2]
    mt, mv = call.map_of(target), call.map_of(value) if isinstance(value, Tensor) else None
    if mt is None:
        raise _Refused("it writes input-dependent values into a constant tensor")
    items = index if isinstance(index, tuple) else (index,)
    full_spatial = all(not isinstance(it, slice) or (it.start is None and it.stop is None) for it in items)
    if not full_spatial and len(items) > min(mt.dims):
        raise _Refused("it writes into part of the spatial extent of a feature map")
    result = mt if mv is None else mt.union(mv)
    call.tracer.assign(target, result, allocates=False)
    return ("setitem",)


_RULES: dict[str, Callable[[_Call], tuple]] = {
    "conv2d": _conv2d,
    "max_pool2d": _max_pool2d,
    "max_pool2d_with_indices": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "lp_pool2d": _lp_pool2d,
    "pad": _pad,
    "constant_pad_nd": _constant_pad_nd,
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "rms_norm": _layer_norm,
    "local_response_norm": _local_response_norm,
    "linear": _linear,
    "prelu": _prelu,
    "__getitem__": _getitem,
    "__setitem__": _setitem,
    **{n: _dropout for n in _DROPOUTS},
    **{n: _identity for n in _IDENTITY},
    **{n: _permutation for n in _PERMUTATIONS},
    **{n: _reshape for n in _RESHAPES},
    **{n: _expand for n in _EXPANDS},
    **{n: _creation for n in _CREATIONS},
    **{n: _along_dim for n in _SHAPE_KEEPING_ALONG_DIM},
    **{n: _split for n in _SPLITS},
    **{n: _cat for n in _CATS},
}


# ----------------------------------------------------------------------------------------------
# Entry points


class _ModulePaths:
    """Keeps the tracer's current module path up to date through forward hooks."""

    def __init__(self, root: nn.Module, tracer: _Tracer, prefix: str = ""):
        self.root, self.tracer, self.prefix = root, tracer, prefix
        self.handles: list = []

    def __enter__(self) -> "_ModulePaths":
        for name, module in self.root.named_modules():
            path = f"{self.prefix}.{name}".strip(".") if self.prefix else name
            self.handles.append(module.register_forward_pre_hook(self._push(path)))
            self.handles.append(module.register_forward_hook(self._pop, always_call=True))
        return self

    def _push(self, path: str):
        def hook(module, args):
            self.tracer.path.append(path)
        return hook

    def _pop(self, module, args, output):
        if len(self.tracer.path) > 1:
            self.tracer.path.pop()

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def trace(fn: Callable[[Tensor], Tensor], input_shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
          modules: nn.Module | None = None, path_prefix: str = "") -> Trace:
    """Run ``fn`` on a meta tensor of ``input_shape`` (N, C, H, W) and derive its geometry.

    ``modules``: the module tree whose submodule paths name the culprit in errors.
    Raises :class:`NonLocalModuleError` for any operation that is not local, :class:`TraceError` if
    ``fn`` cannot run on shapes alone, and never touches the module's parameters or buffers.
    """
    if len(input_shape) != 4:
        raise TraceError(f"expected an input shape (N, C, H, W), got {tuple(input_shape)}")
    tracer = _Tracer()
    x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    tracer.assign(x, _Map((2, 3), (AxisGeometry(), AxisGeometry())), allocates=False)
    paths = _ModulePaths(modules, tracer, path_prefix) if modules is not None else None
    with torch.no_grad():
        if paths is not None:
            paths.__enter__()
        try:
            with tracer:
                out = fn(x)
        finally:
            if paths is not None:
                paths.__exit__(None, None, None)
    m = tracer.map_of(out) if isinstance(out, Tensor) else None
    if m is None or out.dim() != 4 or m.dims != (2, 3):
        raise TraceError("the streamed module must return one (N, C, H, W) feature map computed from its "
                         f"input; it returned {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else ""))
    if m.axes[0].empty or m.axes[1].empty:
        raise TraceError("the streamed module's output does not depend on its input")
    return Trace(
        input_shape=tuple(input_shape),
        output_shape=tuple(out.shape),
        output_dtype=out.dtype,
        axes=m.axes,
        align=(lcm(tracer.strides[0]), lcm(tracer.strides[1])),
        records=tuple(tracer.records),
        activation_elements=tracer.elements,
    )


def check_size_independent(reference: Trace, other: Trace) -> None:
    """Raise if two traces at different input sizes ran different operations: the module then computes
    something that depends on the input size (e.g. 'same' padding computed at run time), and a tile
    would be computed differently from the image."""
    for a, b in zip(reference.records, other.records):
        if a != b:
            raise NonLocalModuleError(
                a.module, a.op,
                f"it depends on the input size (at {reference.input_shape[2:]} it ran {a.op}{a.key}, "
                f"at {other.input_shape[2:]} {b.op}{b.key}), e.g. padding computed at run time like "
                "timm's Conv2dSame",
                "Use static padding (timm: a non-tf_ variant or pad_type='') in the streamed part",
            )
    if len(reference.records) != len(other.records):
        longer = reference if len(reference.records) > len(other.records) else other
        extra = longer.records[min(len(reference.records), len(other.records))]
        raise NonLocalModuleError(extra.module, extra.op,
                                  "it runs different operations depending on the input size")
