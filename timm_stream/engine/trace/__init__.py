"""Derive a module's streaming geometry by running it once on shape-only ("meta") tensors.

:func:`trace` runs ``fn(x)`` with ``x`` on the meta device under a ``TorchFunctionMode``: no data is
computed and nothing is allocated, so tracing costs the same for a 64 px and a 65536 px input. Every
torch call is intercepted; for each tensor that depends on the input (a *map*) the tracer keeps which
dimensions are spatial and the :class:`~.geometry.AxisGeometry` of each spatial axis. Calls on
parameters and constants only (weight standardization, layer-scale reshapes) run untouched.

Each operation on a map is either a known local operation, whose geometry rule is in :mod:`.rules`,
or refused with a :class:`~.errors.NonLocalModuleError` naming the module that issued it. Nothing
unknown is let through: a wrong answer is worse than an error. The known operations are

* windows: ``conv2d`` (any kernel shape, stride, padding incl. ``'same'``, dilation, groups),
  ``max_pool2d`` / ``avg_pool2d`` / ``lp_pool2d`` (incl. ``ceil_mode``), ``pad`` (not circular, not
  negative);
* position-wise: every ATen op tagged pointwise (activations, arithmetic, comparisons, masks computed
  from the input...), eval-mode ``batch_norm``, ``layer_norm`` / ``rms_norm`` over non-spatial dims,
  ``linear`` on a non-spatial last dim, reductions and softmax over non-spatial dims, disabled dropout,
  ``zeros_like``-style constants (which keep the receptive field of the map they are made like);
* layout: permutations, reshapes that keep both spatial dims intact, channel indexing / slicing /
  splitting / concatenation, ``x[...] = v`` and in-place ops that treat every position alike (a
  write through a view widens every alias of its storage), dtype casts and copies.

Whatever depends on *absolute* positions is refused, since a tile's row 5 is not the image's row 5:
integer, partial, strided or reversed indexing of H or W (read or write), constant tensors that vary
over space (masks, position codes), boolean or several index tensors, cropping.

The trace also records a signature per operation (module path, op, non-spatial parameters). Two traces
at input sizes of different parity must have equal signatures; otherwise the module computes something
that depends on the input size (timm's ``Conv2dSame``), which would differ between a tile and the image.

The package keeps one concern per file: :mod:`.ops` (operation names and classes), :mod:`.tracer`
(interception and meta execution), :mod:`.rules` (one geometry rule per operation family),
:mod:`.paths` (module paths for errors), :mod:`.check` (the size-independence check) and
:mod:`.records` (what a trace returns).
"""
from __future__ import annotations

from .check import check_size_independent
from .records import OpRecord, Trace
from .tracer import trace

__all__ = ["Trace", "OpRecord", "trace", "check_size_independent"]
