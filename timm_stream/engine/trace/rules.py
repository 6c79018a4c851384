"""The geometry rule of every operation the tracer accepts, one function per operation family.

A rule gets the intercepted :class:`Call` (arguments, meta output), assigns a :class:`~.records.Map` to
each input-dependent output, and returns the operation's size-independent signature key; it raises
:class:`Refused` for anything it cannot prove local. :func:`rule_for` says which rule an op name gets.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..geometry import AxisGeometry
from .ops import (CATS, CREATIONS, DROPOUTS, EXPANDS, IDENTITY, PERMUTATIONS, REDUCTIONS, RESHAPES,
                  SHAPE_KEEPING_ALONG_DIM, SPLITS, is_pointwise)
from .records import Map

class Refused(Exception):
    """Raised by a rule; turned into a NonLocalModuleError carrying the module path."""

    def __init__(self, reason: str, fix: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: Sequence[Any]) -> dict:
    bound = dict(zip(names, defaults))
    for name, value in zip(names, args):
        bound[name] = value
    for name, value in kwargs.items():
        if name in bound:
            bound[name] = value
    return bound


def pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return (int(value[0]), int(value[0]))
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


def tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item)


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def to_meta(t: Tensor) -> Tensor:
    return t if t.is_meta else t.detach().to("meta")



class Call:
    """One intercepted call, as seen by a geometry rule."""

    def __init__(self, tracer, func: Callable, name: str, args: tuple, kwargs: dict, out: Any):
        self.tracer, self.func, self.name = tracer, func, name
        self.args, self.kwargs, self.out = args, kwargs, out

    def map_of(self, t: Any) -> Map | None:
        return self.tracer.map_of(t) if isinstance(t, Tensor) else None

    @property
    def input(self) -> Tensor:
        return self.args[0]

    @property
    def input_map(self) -> Map:
        m = self.map_of(self.args[0])
        if m is None:  # a map passed as keyword, or not first: find it
            for t in tensors((self.args, self.kwargs)):
                m = self.map_of(t)
                if m is not None:
                    return m
            raise AssertionError("rule called without an input-dependent tensor")
        return m

    def bind(self, names: Sequence[str], defaults: Sequence[Any]) -> dict:
        return bind(self.args, self.kwargs, names, defaults)


# ----------------------------------------------------------------------------------------------
# Geometry rules. Each assigns maps to the call's outputs and returns the op's signature key.


def _spatial_last_two(call: Call, m: Map) -> None:
    ndim = call.input.dim()
    if m.dims != (ndim - 2, ndim - 1):
        raise Refused("its window would slide over non-spatial dimensions")


def _conv2d(call: Call) -> tuple:
    b = call.bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  (None, None, None, 1, 0, 1, 1))
    m = call.map_of(b["input"])
    if m is None:
        raise Refused("the convolution weight depends on the input")
    _spatial_last_two(call, m)
    kernel = tuple(b["weight"].shape[-2:])
    stride, dilation = pair(b["stride"]), pair(b["dilation"])
    padding = b["padding"]
    if isinstance(padding, str):
        if padding == "valid":
            before = (0, 0)
        else:  # 'same' (stride 1 only, checked by torch): PyTorch puts the odd pixel after
            before = tuple((dilation[i] * (kernel[i] - 1)) // 2 for i in range(2))
        padding_key: Any = padding
    else:
        before = pair(padding)
        padding_key = before
    axes = tuple(m.axes[i].window(kernel[i], stride[i], before[i], dilation[i]) for i in range(2))
    call.tracer.assign(call.out, Map(m.dims, axes))
    return (kernel, stride, padding_key, dilation, b["groups"])


def _pool(call: Call, names: Sequence[str], defaults: Sequence[Any]) -> tuple:
    b = call.bind(names, defaults)
    m = call.map_of(b["input"])
    _spatial_last_two(call, m)
    if b.get("return_indices"):
        raise Refused("max-pooling indices are positions inside the tile, not the image")
    kernel = pair(b["kernel_size"])
    stride = kernel if b["stride"] is None or b["stride"] == [] or b["stride"] == () else pair(b["stride"])
    padding, dilation = pair(b.get("padding", 0)), pair(b.get("dilation", 1))
    axes = tuple(m.axes[i].window(kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
    outs = list(tensors(call.out))
    call.tracer.assign(outs[0], Map(m.dims, axes))
    extra = tuple((k, b[k]) for k in ("ceil_mode", "count_include_pad", "divisor_override", "norm_type") if k in b)
    return (kernel, stride, padding, dilation) + extra


def _max_pool2d(call: Call) -> tuple:
    return _pool(call, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                 (None, None, None, 0, 1, False, False))


def _avg_pool2d(call: Call) -> tuple:
    return _pool(call, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                        "divisor_override"), (None, None, None, 0, False, True, None))


def _lp_pool2d(call: Call) -> tuple:
    return _pool(call, ("input", "norm_type", "kernel_size", "stride", "ceil_mode"), (None, None, None, None, False))


def _pad(call: Call) -> tuple:
    b = call.bind(("input", "pad", "mode", "value"), (None, None, "constant", None))
    m = call.map_of(b["input"])
    ndim = b["input"].dim()
    pads = tuple(int(p) for p in b["pad"])
    axes = list(m.axes)
    for axis, dim in enumerate(m.dims):
        j = ndim - 1 - dim  # pads are given for the last dims first
        if 2 * j + 1 < len(pads) and (pads[2 * j] or pads[2 * j + 1]):
            if b["mode"] == "circular":
                raise Refused("circular padding wraps the far border of the image around")
            g = axes[axis].shift(pads[2 * j])
            if b["mode"] in ("reflect", "replicate") and not g.empty:
                # Padding copies values from inside the border, up to twice (reflect) or once
                # (replicate) the padding away: a tile at the border must hold them, computed
                # correctly, and (reflect) be wider than the padding. Wider than needed inside.
                r = max(pads[2 * j], pads[2 * j + 1]) * (2 if b["mode"] == "reflect" else 1) * g.stride
                g = AxisGeometry(g.stride, g.lo - r, g.hi + r)
            axes[axis] = g
    call.tracer.assign(call.out, Map(m.dims, (axes[0], axes[1])))
    return (pads, b["mode"], b["value"])


def _constant_pad_nd(call: Call) -> tuple:
    b = call.bind(("input", "pad", "value"), (None, None, 0))
    call.kwargs = {"input": b["input"], "pad": b["pad"], "mode": "constant", "value": b["value"]}
    call.args = ()
    return _pad(call)


def _batch_norm(call: Call) -> tuple:
    b = call.bind(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                  (None, None, None, None, None, False, 0.1, 1e-5))
    m = call.map_of(b["input"])
    if m is None:
        raise Refused("batch-norm statistics depend on the input")
    if b["training"]:
        raise Refused("BatchNorm in training mode normalizes with statistics of the whole batch and "
                       "feature map", "Put it in eval mode (StreamingCNN freezes the norms it contains)")
    if 1 in m.dims:
        raise Refused("batch norm would normalize over a spatial dimension")
    call.tracer.assign(call.out, m)
    return ()


def _layer_norm(call: Call) -> tuple:
    b = call.bind(("input", "normalized_shape", "weight", "bias", "eps"), (None, None, None, None, 1e-5))
    m = call.map_of(b["input"])
    shape = b["normalized_shape"]
    count = 1 if isinstance(shape, int) else len(shape)
    ndim = b["input"].dim()
    if any(d >= ndim - count for d in m.dims):
        raise Refused("it normalizes over the spatial dimensions")
    call.tracer.assign(call.out, m)
    return (tuple(shape) if not isinstance(shape, int) else (shape,),)


def _local_response_norm(call: Call) -> tuple:
    m = call.input_map
    if 1 in m.dims:
        raise Refused("it normalizes across a spatial dimension")
    call.tracer.assign(call.out, m)
    return tuple(a for a in call.args[1:] if not isinstance(a, Tensor))


def _linear(call: Call) -> tuple:
    m = call.input_map
    if call.map_of(call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")) is not None:
        raise Refused("the linear weight depends on the input")
    if call.input.dim() - 1 in m.dims:
        raise Refused("it mixes positions along a spatial dimension (linear over the last dim)")
    call.tracer.assign(call.out, m)
    return ()


def _dropout(call: Call) -> tuple:
    b = call.bind(("input", "p", "training", "inplace"), (None, 0.5, True, False))
    if call.name.startswith("rrelu"):
        b = call.bind(("input", "lower", "upper", "training", "inplace"), (None, 1 / 8, 1 / 3, False, False))
        b["p"] = 1.0
    if b["training"] and b["p"] > 0:
        raise Refused("in training it draws a random mask per tile, unlike the un-tiled run",
                       "Set its rate to 0 in the streamed part or put it in eval mode")
    m = call.input_map
    call.tracer.assign(call.out, m, allocates=False)
    return (b["p"] if b["training"] else 0.0,)


def _identity(call: Call) -> tuple:
    m = call.input_map
    call.tracer.assign(call.out, m, allocates=call.name in ("clone", "contiguous"))
    return ()


def _prelu(call: Call) -> tuple:
    m = call.input_map
    if call.map_of(call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")) is not None:
        raise Refused("the PReLU weight depends on the input")
    call.tracer.assign(call.out, m)
    return ()


def _pointwise(call: Call) -> tuple:
    """Broadcasting position-wise op: all maps must sit on the same grid; other tensors must not vary
    over space (a tensor that does would be tied to absolute positions, e.g. a position embedding)."""
    outs = [t for t in tensors(call.out)]
    out_ndim = outs[0].dim()
    out_shape = outs[0].shape
    result: Map | None = None
    for t in tensors((call.args, call.kwargs)):
        offset = out_ndim - t.dim()
        m = call.map_of(t)
        if m is None:
            continue
        dims = (m.dims[0] + offset, m.dims[1] + offset)
        if any(t.shape[d] != out_shape[d + offset] for d in m.dims):
            raise Refused("a feature map is broadcast over space (a global feature, e.g. from global pooling)")
        moved = m.moved(dims)
        if result is None:
            result = moved
        elif result.dims != moved.dims:
            raise Refused("it combines feature maps whose spatial dimensions do not line up")
        else:
            try:
                result = result.union(moved)
            except ValueError as exc:
                raise Refused(str(exc))
    assert result is not None
    for t in tensors((call.args, call.kwargs)):
        if call.map_of(t) is not None:
            continue
        offset = out_ndim - t.dim()
        for d in result.dims:
            if d - offset >= 0 and t.shape[d - offset] != 1:
                raise Refused("it combines the feature map with a tensor that varies over space "
                               "(tied to absolute positions, e.g. a position embedding)")
    inplace = any(out is a for out in outs for a in call.args if isinstance(a, Tensor))
    for out in outs:
        call.tracer.assign(out, result, allocates=not inplace)
    return ()


def _dims_arg(call: Call, position: int, default: Any = None) -> Any:
    if len(call.args) > position:
        return call.args[position]
    return call.kwargs.get("dim", call.kwargs.get("axis", default))


def _reduction(call: Call) -> tuple:
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
        reduced = {normalize_dim(int(d), ndim) for d in dims}
    if reduced & set(m.dims):
        raise Refused("it reduces over the spatial dimensions (global pooling, e.g. squeeze-excitation "
                       "or a global attention gate)")
    for out in tensors(call.out):
        if out.dim() == ndim:
            new_dims = m.dims
        else:
            new_dims = tuple(d - sum(1 for r in reduced if r < d) for d in m.dims)
        call.tracer.assign(out, m.moved(new_dims))
    return (tuple(sorted(reduced)),)


def _along_dim(call: Call) -> tuple:
    m = call.input_map
    ndim = call.input.dim()
    if call.name == "normalize":
        dim = bind(call.args, call.kwargs, ("input", "p", "dim"), (None, 2.0, 1))["dim"]
    elif call.name == "glu":
        dim = _dims_arg(call, 1, -1)
    elif call.name == "topk":
        dim = bind(call.args, call.kwargs, ("input", "k", "dim"), (None, None, -1))["dim"]
    elif call.name in ("sort", "argsort"):
        dim = _dims_arg(call, 1, -1)
    else:
        dim = _dims_arg(call, 1)
        if dim is None:  # legacy implicit softmax dim
            dim = 0 if ndim in (0, 1, 3) else 1
    dim = normalize_dim(int(dim), ndim)
    if dim in m.dims:
        raise Refused("it normalizes or accumulates along a spatial dimension")
    for out in tensors(call.out):
        call.tracer.assign(out, m)
    return (dim,)


def _permutation(call: Call) -> tuple:
    m = call.input_map
    ndim = call.input.dim()
    # Apply the same op to a probe whose sizes name its dims, and read where they went.
    probe = torch.empty(tuple(range(2, ndim + 2)), device="meta")
    moved = call.func(probe, *call.args[1:], **call.kwargs)
    where = {size - 2: pos for pos, size in enumerate(moved.shape)}
    new_dims = (where[m.dims[0]], where[m.dims[1]])
    call.tracer.assign(call.out, m.moved(new_dims), allocates=False)
    return tuple(moved.shape)


def _reshape(call: Call) -> tuple:
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
            raise Refused("it reshapes a spatial dimension (flattening or folding the feature map)")
        new_dims.append(found)
    call.tracer.assign(call.out, m.moved(new_dims), allocates=False)
    hide = lambda shape, dims: tuple(-1 if i in dims else s for i, s in enumerate(shape))  # noqa: E731
    return (hide(in_shape, m.dims), hide(out_shape, new_dims))


def _expand(call: Call) -> tuple:
    m = call.input_map
    offset = call.out.dim() - call.input.dim()
    dims = (m.dims[0] + offset, m.dims[1] + offset)
    if any(call.out.shape[e] != call.input.shape[d] for d, e in zip(m.dims, dims)):
        raise Refused("it broadcasts a feature map over space")
    call.tracer.assign(call.out, m.moved(dims), allocates=False)
    return (offset,)


def _creation(call: Call) -> tuple:
    # A tensor made *like* a map has the map's layout but reads no pixel: a constant map.
    m = call.input_map
    out = call.out
    if out.dim() == call.input.dim() and all(out.shape[d] == call.input.shape[d] for d in m.dims):
        const = tuple(AxisGeometry.constant(a.stride) for a in m.axes)
        call.tracer.assign(out, Map(m.dims, (const[0], const[1])))
    elif any(out.shape[d] != 1 for d in range(out.dim())[-2:]) and out.dim() >= 2:
        pass  # a spatially sized constant not tied to the map's grid is caught when combined
    return (tuple(s if i not in m.dims else -1 for i, s in enumerate(out.shape)),)


def _getitem(call: Call) -> tuple:
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
                raise Refused("it slices a spatial dimension (cropping depends on the tile)")
            mapping[in_dim] = out_dim
            key.append((it.start, it.stop, it.step) if in_dim not in m.dims else ":")
            in_dim += 1
            out_dim += 1
        elif isinstance(it, int):
            if in_dim in m.dims:
                raise Refused("it indexes a spatial dimension")
            key.append(it)
            in_dim += 1
        elif isinstance(it, (Tensor, list)) and (not isinstance(it, Tensor) or it.dim() <= 1):
            if in_dim in m.dims:
                raise Refused("it indexes a spatial dimension")
            mapping[in_dim] = out_dim
            key.append("index")
            in_dim += 1
            out_dim += 1
        else:
            raise Refused("advanced indexing of a feature map")
    call.tracer.assign(call.out, m.moved((mapping[m.dims[0]], mapping[m.dims[1]])), allocates=False)
    return tuple(key)


def _split(call: Call) -> tuple:
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
    dim = normalize_dim(int(dim), ndim)
    if dim in m.dims:
        raise Refused("it splits a feature map along a spatial dimension")
    removes = call.name in ("unbind", "select")
    new_dims = tuple(d - (1 if removes and d > dim else 0) for d in m.dims)
    for out in tensors(call.out):
        call.tracer.assign(out, m.moved(new_dims), allocates=call.name == "index_select")
    return (call.name, dim)


def _cat(call: Call) -> tuple:
    tensors = list(call.args[0]) if call.args else list(call.kwargs["tensors"])
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", call.kwargs.get("axis", 0))
    ndim = tensors[0].dim()
    result: Map | None = None
    for m in (call.map_of(t) for t in tensors):
        if m is None:
            raise Refused("it concatenates a feature map with a tensor that does not come from the input")
        if result is None:
            result = m
        elif m.dims != result.dims:
            raise Refused("it concatenates feature maps whose spatial dimensions do not line up")
        else:
            try:
                result = result.union(m)
            except ValueError as exc:
                raise Refused(str(exc))
    assert result is not None
    if call.name == "stack":
        dim = normalize_dim(int(dim), ndim + 1)
        result = result.moved(tuple(d + (1 if d >= dim else 0) for d in result.dims))
    else:
        dim = normalize_dim(int(dim), ndim)
        if dim in result.dims:
            raise Refused("it concatenates feature maps along a spatial dimension")
    call.tracer.assign(call.out, result)
    return (dim, len(tensors))


def _setitem(call: Call) -> tuple:
    target, index, value = call.args[0], call.args[1], call.args[2]
    mt, mv = call.map_of(target), call.map_of(value) if isinstance(value, Tensor) else None
    if mt is None:
        raise Refused("it writes input-dependent values into a constant tensor")
    items = index if isinstance(index, tuple) else (index,)
    full_spatial = all(not isinstance(it, slice) or (it.start is None and it.stop is None) for it in items)
    if not full_spatial and len(items) > min(mt.dims):
        raise Refused("it writes into part of the spatial extent of a feature map")
    result = mt if mv is None else mt.union(mv)
    call.tracer.assign(target, result, allocates=False)
    return ("setitem",)


RULES: dict[str, Callable[[Call], tuple]] = {
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
    **{n: _dropout for n in DROPOUTS},
    **{n: _identity for n in IDENTITY},
    **{n: _permutation for n in PERMUTATIONS},
    **{n: _reshape for n in RESHAPES},
    **{n: _expand for n in EXPANDS},
    **{n: _creation for n in CREATIONS},
    **{n: _along_dim for n in SHAPE_KEEPING_ALONG_DIM},
    **{n: _split for n in SPLITS},
    **{n: _cat for n in CATS},
}




def rule_for(name: str) -> Callable[[Call], tuple] | None:
    """The rule for an operation on a map, or None when the op is not known to be local."""
    rule = RULES.get(name)
    if rule is None:
        if is_pointwise(name):
            return _pointwise
        if name in REDUCTIONS:
            return _reduction
    return rule
