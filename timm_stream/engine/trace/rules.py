"""The geometry rule of every operation the tracer accepts, one function per operation family.

A rule gets the intercepted :class:`Call` (arguments, meta output), assigns a :class:`~.records.Map` to
each input-dependent output, and returns the operation's size-independent signature key; it raises
:class:`Refused` for anything it cannot prove local. :func:`rule_for` says which rule an op name gets.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_leaves, tree_map_only

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


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in a nest of arguments or outputs (lists, tuples, dicts, named tuples)."""
    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def to_meta(t: Tensor) -> Tensor:
    return t if t.is_meta else t.detach().to("meta")


class Call:
    """One intercepted call, as seen by a geometry rule."""

    def __init__(self, tracer, func: Callable, name: str, args: tuple, kwargs: dict, out: Any):
        self.tracer, self.func, self.name = tracer, func, name
        self.args, self.kwargs, self.out = args, kwargs, out
        self.constant_output = False  # set by a rule whose output does not depend on the input

    def map_of(self, t: Any) -> Map | None:
        return self.tracer.map_of(t) if isinstance(t, Tensor) else None

    @property
    def input(self) -> Tensor:
        """The op's primary tensor: ``self`` of a method, the first argument or ``input=``."""
        if self.args and isinstance(self.args[0], Tensor):
            return self.args[0]
        for key in ("input", "self"):
            if isinstance(self.kwargs.get(key), Tensor):
                return self.kwargs[key]
        raise Refused("it takes an input-dependent tensor in a place the streaming engine does not follow")

    @property
    def input_map(self) -> Map:
        """The map of the primary tensor. A map anywhere else (``const[index_map]``,
        ``const.expand_as(map)``, ``index_select(const, 0, map)``) would lend the map's geometry to a
        tensor that reads other positions, so it is refused unless the rule handles it itself."""
        m = self.map_of(self.input)
        if m is None:
            raise Refused("it reads a tensor that does not come from the input at input-dependent positions "
                          "(or lays it out like a feature map)")
        return m

    def bind(self, names: Sequence[str], defaults: Sequence[Any]) -> dict:
        return bind(self.args, self.kwargs, names, defaults)

    def constant(self) -> tuple:
        """Mark the output as not input-dependent (a later op that combines it with a map checks that
        it does not vary over space)."""
        self.constant_output = True
        return ("constant",)


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
    if m is None or call.map_of(b["weight"]) is not None or call.map_of(b["bias"]) is not None:
        raise Refused("the convolution weight depends on the input (a dynamic convolution)")
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
            if pads[2 * j] < 0 or pads[2 * j + 1] < 0:
                # Found by tests/test_trace_property.py: a crop at the far end of an axis changes the
                # map's length in a way the tile plan does not follow (and crops every tile).
                raise Refused("negative padding crops the map at every tile's border, not only the image's",
                              "Crop the image before streaming, or the streamed output after it")
            g = axes[axis].shift(pads[2 * j])
            if b["mode"] in ("reflect", "replicate"):
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
    if call.map_of(call.input) is None:  # const.to(map), const.type_as(map): still a constant
        return call.constant()
    call.tracer.assign(call.out, call.input_map, allocates=call.name in ("clone", "contiguous", "_to_copy"))
    return ()


def _prelu(call: Call) -> tuple:
    m = call.input_map
    if call.map_of(call.args[1] if len(call.args) > 1 else call.kwargs.get("weight")) is not None:
        raise Refused("the PReLU weight depends on the input")
    call.tracer.assign(call.out, m)
    return ()


def _pointwise(call: Call) -> tuple:
    """Broadcasting position-wise op: all maps must sit on the same grid; other tensors must not vary
    over space (a tensor that does would be tied to absolute positions, e.g. a position embedding or a
    constant mask)."""
    outs = tensors(call.out)
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
        result = _combine(result, m.moved(dims), "combines")
    assert result is not None
    for t in tensors((call.args, call.kwargs)):
        if call.map_of(t) is not None:
            continue
        offset = out_ndim - t.dim()
        for d in result.dims:
            if d - offset >= 0 and t.shape[d - offset] != 1:
                raise Refused("it combines the feature map with a tensor that varies over space "
                              "(tied to absolute positions, e.g. a position embedding or a constant mask)")
    for out in outs:
        if any(out is a for a in tensors((call.args, call.kwargs))):
            call.tracer.write(out, result)  # in place: every alias of the target reads the new values
        else:
            call.tracer.assign(out, result)
    return ()


# Sizes no real dimension has: a rule that cannot read from the arguments where an op puts the spatial
# dims (reductions, splits: many overloads, positional or keyword dims) runs the op on a meta probe
# whose spatial dims have these sizes and reads where they reappear. Nothing is allocated.
_PROBE_SIZES = (9973, 9967)


def _spatial_dims_after(call: Call, m: Map) -> tuple[list[tuple[int, int] | None], tuple]:
    """Where each output of ``call`` keeps the spatial dims of its primary input (None for an output
    that reduced, split or cropped one of them), and the op's signature key: its output shapes with
    the spatial sizes hidden."""
    x = call.input
    shape = list(x.shape)
    shape[m.dims[0]], shape[m.dims[1]] = _PROBE_SIZES
    probe = torch.empty(shape, dtype=x.dtype, device="meta")
    args, kwargs = tree_map_only(Tensor, lambda t: probe if t is x else to_meta(t), (call.args, call.kwargs))
    try:
        probe_outs = tensors(call.func(*args, **kwargs))
    except Exception:  # the op does not run at other sizes: it depends on them
        raise Refused("it works on a spatial dimension in a way that depends on its size")
    real_outs = tensors(call.out)
    if len(probe_outs) != len(real_outs):
        raise Refused("it splits a feature map along a spatial dimension")
    result: list[tuple[int, int] | None] = []
    for p, real in zip(probe_outs, real_outs):
        found = tuple(i for size in _PROBE_SIZES for i, s in enumerate(p.shape) if s == size)
        if len(found) != 2 or any(real.shape[e] != x.shape[d] for d, e in zip(m.dims, found)):
            result.append(None)
        else:
            result.append((found[0], found[1]))
    key = tuple(tuple(-1 if s in _PROBE_SIZES else s for s in p.shape) for p in probe_outs)
    return result, key


def _reduction(call: Call) -> tuple:
    if call.name in ("max", "min") and isinstance(call.kwargs.get("other", call.args[1] if len(call.args) > 1
                                                                  else None), Tensor):
        return _pointwise(call)  # torch.max(a, b) is element-wise
    m = call.input_map
    where, key = _spatial_dims_after(call, m)
    for out, dims in zip(tensors(call.out), where):
        if dims is None:
            raise Refused("it reduces over the spatial dimensions (global pooling, e.g. squeeze-excitation "
                          "or a global attention gate)")
        call.tracer.assign(out, m.moved(dims))
    return (call.name, key)


def _split(call: Call) -> tuple:
    m = call.input_map
    for t in tensors((call.args[1:], call.kwargs)):
        if call.map_of(t) is not None:
            raise Refused("it selects positions with input-dependent indices")
    where, key = _spatial_dims_after(call, m)
    for out, dims in zip(tensors(call.out), where):
        if dims is None:
            raise Refused("it splits, narrows or selects a feature map along a spatial dimension")
        call.tracer.assign(out, m.moved(dims), allocates=call.name == "index_select")
    return (call.name, key)


def _along_dim(call: Call) -> tuple:
    m = call.input_map
    ndim = call.input.dim()
    bound = None
    # torch's own argument normalization (any mix of positional and keyword arguments), on the function
    # itself or, for a Tensor method, on its functional twin
    for target in (call.func, getattr(F, call.name, None), getattr(torch, call.name, None)):
        try:
            bound = normalize_function(target, call.args, call.kwargs, normalize_to_only_use_kwargs=True)
        except Exception:
            bound = None
        if bound is not None:
            break
    if bound is None:
        raise Refused("the streaming engine cannot tell along which dimension it works",
                      "Pass dim= explicitly")
    dim = bound.kwargs.get("dim", -1)
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
    if call.map_of(call.input) is None:  # const.view_as(map): a constant shaped like the map
        return call.constant()
    m = call.input_map
    in_shape, out_shape = tuple(call.input.shape), tuple(call.out.shape)
    new_dims = []
    for d in m.dims:
        # the same dim iff as many elements lie before it and it keeps its size
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
    x, out = call.input, call.out
    offset = out.dim() - x.dim()
    m = call.map_of(x)
    if m is None:  # const.expand_as(map)
        like = next(t for t in tensors((call.args[1:], call.kwargs)) if call.map_of(t) is not None)
        lm = call.map_of(like)
        if out.dim() == like.dim() and all(d - offset < 0 or x.shape[d - offset] == 1 for d in lm.dims):
            call.tracer.assign(out, lm, allocates=False)  # uniform over space: like map * 0 + const
            return ("uniform", offset)
        return call.constant()
    dims = (m.dims[0] + offset, m.dims[1] + offset)
    if any(out.shape[e] != x.shape[d] for d, e in zip(m.dims, dims)):
        raise Refused("it broadcasts a feature map over space")
    call.tracer.assign(out, m.moved(dims), allocates=False)
    return (offset,)


def _creation(call: Call) -> tuple:
    if call.name == "new_tensor":  # a constant from Python data, whatever tensor it is called on
        if call.map_of(call.args[1] if len(call.args) > 1 else call.kwargs.get("data")) is not None:
            raise Refused("it copies a feature map through Python data")
        return call.constant()
    m = call.input_map
    out = call.out
    if out.dim() == call.input.dim() and all(out.shape[d] == call.input.shape[d] for d in m.dims):
        # zeros_like(x) is x * 0: on the map's grid, with its receptive field. (An empty geometry
        # would let padding of the constant -- conv(ones_like(x)), a border mask -- go unnoticed.)
        call.tracer.assign(out, m)
        return (tuple(-1 if i in m.dims else s for i, s in enumerate(out.shape)),)
    return call.constant()  # a constant of another shape: checked where it meets a map


def _index_layout(call: Call, x: Tensor, m: Map, index: Any) -> tuple[tuple[int, int], int, tuple]:
    """Where ``x[index]`` puts the spatial dims of ``x``, how many dims it has, and a signature key.
    Refuses any index that picks spatial positions: an integer, a partial, strided or reversed slice,
    or an index tensor on a spatial dim, a boolean, several index tensors, input-dependent indices."""
    items = list(index) if isinstance(index, tuple) else [index]

    def consumed(it: Any) -> int:
        if it is None or it is Ellipsis:
            return 0
        if isinstance(it, bool) or (isinstance(it, Tensor) and it.dtype == torch.bool and it.dim() == 0):
            raise Refused("it indexes a feature map with a Python or 0-d boolean")
        if isinstance(it, Tensor) and it.dtype == torch.bool:
            return it.dim()
        return 1

    ellipses = [i for i, it in enumerate(items) if it is Ellipsis]
    rest = x.dim() - sum(consumed(it) for it in items)
    if ellipses:
        at = ellipses[0]
        items = items[:at] + [slice(None)] * rest + items[at + 1:]
    else:
        items = items + [slice(None)] * rest
    if sum(1 for it in items if isinstance(it, (Tensor, list, tuple))) > 1:
        raise Refused("it indexes a feature map with several index tensors (advanced indexing)")
    in_dim = out_dim = 0
    mapping: dict[int, int] = {}
    key: list = []
    for it in items:
        if it is None:
            out_dim += 1
            key.append(None)
        elif isinstance(it, slice):
            if in_dim in m.dims:
                size = x.shape[in_dim]
                try:
                    full = it.indices(size) == (0, size, 1)
                except TypeError:  # tensor-valued bounds
                    full = False
                if not full:
                    raise Refused("it slices a spatial dimension: cropping, striding or reversing a map picks "
                                  "positions relative to the tile, not the image")
                key.append(":")
            else:
                key.append((it.start, it.stop, it.step))
            mapping[in_dim] = out_dim
            in_dim += 1
            out_dim += 1
        elif isinstance(it, (Tensor, list, tuple)):
            if call.map_of(it) is not None:
                raise Refused("it indexes with input-dependent indices")
            t = it if isinstance(it, Tensor) else torch.as_tensor(it)
            span = t.dim() if t.dtype == torch.bool else 1
            if any(d in m.dims for d in range(in_dim, in_dim + span)):
                raise Refused("it indexes a spatial dimension: the index is a position in the tile, not the "
                              "image")
            key.append(("index", tuple(t.shape)))
            in_dim += span
            out_dim += 1 if t.dtype == torch.bool else t.dim()
        elif hasattr(it, "__index__"):  # an integer
            if in_dim in m.dims:
                raise Refused("it indexes a spatial dimension: the index is a position in the tile, not the "
                              "image")
            key.append(int(it))
            in_dim += 1
        else:
            raise Refused(f"it indexes a feature map with {type(it).__name__}")
    return (mapping[m.dims[0]], mapping[m.dims[1]]), out_dim, tuple(key)


def _getitem(call: Call) -> tuple:
    m = call.input_map
    dims, _, key = _index_layout(call, call.input, m, call.args[1])
    if any(call.out.shape[e] != call.input.shape[d] for d, e in zip(m.dims, dims)):
        raise Refused("it indexes a feature map in a way the streaming engine cannot follow")
    call.tracer.assign(call.out, m.moved(dims), allocates=False)
    return key


def _setitem(call: Call) -> tuple:
    """``x[index] = value``: the write must cover every spatial position alike (channel slices, a mask
    computed from the input) and the value must be a map on the same grid or uniform over space."""
    target, index, value = call.args[0], call.args[1], call.args[2]
    mt = call.map_of(target)
    if mt is None:
        raise Refused("it writes input-dependent values into a tensor that does not come from the input",
                      "Build the tensor from the input instead (e.g. torch.zeros_like(x))")
    mi = call.map_of(index)
    if mi is not None:  # x[mask] = v with a mask computed from the input: where(mask, v, x)
        if index.dtype != torch.bool or index.dim() != target.dim() or mi.dims != mt.dims \
                or any(index.shape[d] != target.shape[d] for d in mt.dims):
            raise Refused("it writes at input-dependent positions other than a full-size boolean mask")
        if isinstance(value, Tensor) and (call.map_of(value) is not None or value.numel() != 1):
            raise Refused("it writes a sequence of values at masked positions (their order depends on the tile)")
        result = mt.union(mi)
        key: tuple = ("mask",)
    else:
        dims, sub_ndim, key = _index_layout(call, target, mt, index)
        result = mt
        if isinstance(value, Tensor):
            offset = sub_ndim - value.dim()
            mv = call.map_of(value)
            if mv is not None:
                if tuple(d + offset for d in mv.dims) != dims \
                        or any(value.shape[d] != target.shape[e] for d, e in zip(mv.dims, mt.dims)):
                    raise Refused("it writes a feature map whose spatial dimensions do not line up")
                try:
                    result = mt.union(mv)
                except ValueError as exc:
                    raise Refused(str(exc))
            elif any(d - offset >= 0 and value.shape[d - offset] != 1 for d in dims):
                raise Refused("it writes a tensor that varies over space (tied to absolute positions)")
    call.tracer.write(target, result)
    return ("setitem",) + key


def _combine(result: Map | None, m: Map, verb: str) -> Map:
    """The map of a position-wise combination of ``result`` (None: nothing yet) and ``m``: both must
    put their spatial dims in the same places and lie on the same grid."""
    if result is None:
        return m
    if m.dims != result.dims:
        raise Refused(f"it {verb} feature maps whose spatial dimensions do not line up")
    try:
        return result.union(m)
    except ValueError as exc:
        raise Refused(str(exc))


def _cat(call: Call) -> tuple:
    tensors = list(call.args[0]) if call.args else list(call.kwargs["tensors"])
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", call.kwargs.get("axis", 0))
    ndim = tensors[0].dim()
    result: Map | None = None
    for m in (call.map_of(t) for t in tensors):
        if m is None:
            raise Refused("it concatenates a feature map with a tensor that does not come from the input")
        result = _combine(result, m, "concatenates")
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
