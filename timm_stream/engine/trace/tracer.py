"""Interception and meta execution: :func:`trace` runs a function once on a shape-only ("meta") input
under a ``TorchFunctionMode``, keeps a :class:`~.records.Map` for every input-dependent tensor, and
hands each operation on one to its geometry rule (:mod:`.rules`)."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from ..errors import NonLocalModuleError, TraceError
from ..geometry import AxisGeometry, lcm
from .ops import CASTS, IDENTITY, NON_LOCAL, RANDOM, SAME_SHAPE, op_name
from .paths import ModulePaths
from .records import Map, OpRecord, Trace
from .rules import Call, Refused, bind, rule_for, tensors, to_meta

__all__ = ["trace"]


class _Tracer(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._maps: dict[int, tuple[Tensor, Map]] = {}
        self._aliases: dict[int, dict[int, Tensor]] = {}  # storage -> the maps that view it
        self.records: list[OpRecord] = []
        self.strides: tuple[set[int], set[int]] = ({1}, {1})
        self.path: list[str] = [""]
        self.elements = 0

    # -- bookkeeping
    def map_of(self, t: Tensor) -> Map | None:
        entry = self._maps.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def assign(self, t: Tensor, m: Map, allocates: bool = True) -> None:
        self._maps[id(t)] = (t, m)  # holding t keeps its id unique for the trace's lifetime
        self._aliases.setdefault(_storage(t), {})[id(t)] = t
        self.strides[0].add(m.axes[0].stride)
        self.strides[1].add(m.axes[1].stride)
        if allocates:
            self.elements += t.numel()

    def write(self, t: Tensor, m: Map) -> None:
        """An in-place op gave ``t`` new values of geometry ``m``: so did every view of its storage (a
        write through ``x[:, :2]`` or ``x.view(...)`` changes ``x``)."""
        if self.map_of(t) is None:
            raise Refused("it writes input-dependent values into a tensor that does not come from the input",
                          "Build the tensor from the input instead (e.g. torch.zeros_like(x))")
        self.assign(t, m, allocates=False)
        for other in self._aliases.get(_storage(t), {}).values():
            om = self.map_of(other)
            if other is not t and om is not None:
                try:
                    axes = (om.axes[0].union(m.axes[0]), om.axes[1].union(m.axes[1]))
                except ValueError as exc:
                    raise Refused(str(exc))
                self._maps[id(other)] = (other, Map(om.dims, axes))

    def refuse(self, op: str, reason: str, fix: str | None = None) -> None:
        raise NonLocalModuleError(self.path[-1], op, reason, fix)

    # -- interception
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in RANDOM:
            self.refuse(name, "it draws random numbers, so every tile would draw different ones",
                        "Disable dropout / stochastic depth in the streamed part (rate 0) or use eval mode")
        has_map = any(self.map_of(t) is not None for t in tensors((args, kwargs)))
        if name in NON_LOCAL and has_map:
            self.refuse(name, NON_LOCAL[name])
        out = self._run(func, name, args, kwargs, has_map)
        if not has_map or (not tensors(out) and name != "__setitem__"):  # x.shape, x.dim(), ...
            return out
        rule = rule_for(name)
        if rule is None:
            self.refuse(name, f"'{name}' is not an operation the streaming engine knows to be local",
                        "Keep it out of the streamed part (stream fewer stages)")
        call = Call(self, func, name, args, kwargs, out)
        try:
            key = rule(call)
        except Refused as refusal:
            self.refuse(name, refusal.reason, refusal.fix)
        if not call.constant_output and any(self.map_of(t) is None for t in tensors(out)):
            # A rule that leaves an input-dependent output untracked would let every later op on it
            # pass unchecked: refuse rather than guess.
            self.refuse(name, "the streaming engine cannot follow which positions its output reads")
        self.records.append(OpRecord(self.path[-1], name, key))
        return out

    def _run(self, func, name: str, args: tuple, kwargs: dict, has_map: bool):
        meta_args, meta_kwargs = tree_map_only(Tensor, to_meta, (args, kwargs))
        if name in IDENTITY:
            # device moves cannot run on meta tensors; only the dtype matters for the trace
            source = meta_args[0]
            dtype = CASTS.get(name)
            for a in list(meta_args[1:]) + list(meta_kwargs.values()):
                if isinstance(a, torch.dtype):
                    dtype = a
                elif isinstance(a, Tensor) and name in ("to", "type_as"):
                    dtype = a.dtype
            if name in ("clone", "_to_copy") or (name == "contiguous" and not source.is_contiguous()):
                return torch.empty_like(source, dtype=dtype)  # a copy: writes to it leave the source alone
            return source.to(dtype) if dtype is not None else source  # like torch: same tensor when no-op
        source = meta_args[0] if meta_args and isinstance(meta_args[0], Tensor) else None
        if source is not None and name in SAME_SHAPE and self.map_of(args[0]) is not None:
            # Shape-preserving ops: skip their (slow, Python-decomposed) meta kernels.
            if name.endswith("_") or (name in ("relu", "relu6", "hardtanh", "silu", "hardswish", "mish",
                                                "leaky_relu", "elu", "celu", "selu", "hardsigmoid")
                                      and (kwargs.get("inplace") or (len(args) > 1 and args[-1] is True))):
                return source
            return torch.empty_like(source)
        if name == "conv2d":
            _check_conv_channels(self.path[-1], args, kwargs)
        written = args[0] if _writes_first_argument(name) and args else kwargs.get("out")
        if has_map and any(not t.is_meta for t in tensors(written)):
            # the meta copy would take the write, the module's own tensor would not: refuse
            self.refuse(name, "it writes input-dependent values into a tensor held by the module")
        try:
            return func(*meta_args, **meta_kwargs)
        except NonLocalModuleError:
            raise
        except Exception as exc:
            raise TraceError(
                f"module '{self.path[-1] or '<root>'}' failed during shape tracing in '{name}': {exc}"
            ) from exc


def _writes_first_argument(name: str) -> bool:
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


def _storage(t: Tensor) -> int:
    """Identity of the memory behind ``t``: views (slices, reshapes, permutations) share it."""
    try:
        return t.untyped_storage()._cdata
    except Exception:  # pragma: no cover - tensors without storage
        return id(t)


def _check_conv_channels(path: str, args: tuple, kwargs: dict) -> None:
    """Meta convolutions only say 'Invalid channel dimensions'; give torch's usual message."""
    b = bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
              (None, None, None, 1, 0, 1, 1))
    x, weight, groups = b["input"], b["weight"], b["groups"]
    if isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() >= 3:
        expected = weight.shape[1] * groups
        if x.shape[-3] != expected:
            raise TraceError(
                f"module '{path or '<root>'}': Given groups={groups}, weight of size {list(weight.shape)}, "
                f"expected input{list(x.shape)} to have {expected} channels, but got {x.shape[-3]} channels "
                "instead")


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
    tracer.assign(x, Map((2, 3), (AxisGeometry(), AxisGeometry())), allocates=False)
    paths = ModulePaths(modules, tracer, path_prefix) if modules is not None else contextlib.nullcontext()
    with torch.no_grad(), paths, tracer:
        out = fn(x)
    m = tracer.map_of(out) if isinstance(out, Tensor) else None
    if m is None or out.dim() != 4 or m.dims != (2, 3):
        raise TraceError("the streamed module must return one (N, C, H, W) feature map computed from its "
                         f"input; it returned {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else ""))
    return Trace(
        input_shape=tuple(input_shape),
        output_shape=tuple(out.shape),
        output_dtype=out.dtype,
        axes=m.axes,
        align=(lcm(tracer.strides[0]), lcm(tracer.strides[1])),
        records=tuple(tracer.records),
        activation_elements=tracer.elements,
    )

