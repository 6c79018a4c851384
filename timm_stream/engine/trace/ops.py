"""Operation names and the classes the tracer sorts them into (tables only; the geometry rule of each
class is in :mod:`.rules`)."""
from __future__ import annotations

import functools
from typing import Callable

import torch

DUNDER = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub", "__rsub__": "rsub",
    "__isub__": "sub_", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_", "__truediv__": "div",
    "__rtruediv__": "div", "__itruediv__": "div_", "__div__": "div", "__rdiv__": "div", "__pow__": "pow",
    "__rpow__": "pow", "__ipow__": "pow_", "__neg__": "neg", "__abs__": "abs", "__and__": "bitwise_and",
    "__or__": "bitwise_or", "__xor__": "bitwise_xor", "__invert__": "bitwise_not", "__eq__": "eq",
    "__ne__": "ne", "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
    "__floordiv__": "floor_divide", "__rfloordiv__": "floor_divide", "__mod__": "remainder",
    "__rmod__": "remainder", "__matmul__": "matmul", "__rmatmul__": "matmul",
}

RANDOM = frozenset({
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
    "randperm", "normal", "normal_", "uniform_", "exponential_", "geometric_", "log_normal_",
    "cauchy_", "random_", "multinomial", "poisson", "native_dropout",
})

# Element-wise activations, by name: ATen's pointwise tags differ between torch versions (torch 2.11
# does not tag leaky_relu, 2.14 does), and the registry must not depend on which one checked it.
ACTIVATIONS = frozenset({"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu",
                          "celu_", "selu", "selu_", "gelu", "gelu_", "silu", "silu_", "mish", "mish_",
                          "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh",
                          "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus"})
# Position-wise ops ATen does not tag as pointwise (or whose extra tensors do not broadcast).
EXTRA_POINTWISE = ACTIVATIONS | {"copy_", "softsign", "tanhshrink", "logsigmoid", "masked_fill",
                                   "masked_fill_", "type_as", "nan_to_num", "clip", "clip_"}

NON_LOCAL = {
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
SAME_SHAPE = ACTIVATIONS | {"batch_norm", "layer_norm", "rms_norm"}
CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
          "bfloat16": torch.bfloat16}
IDENTITY = frozenset({"contiguous", "clone", "detach", "detach_", "requires_grad_", "cpu", "cuda",
                       "to", "type", "type_as", "pin_memory", "data", "float", "double", "half",
                       "bfloat16", "_to_copy", "alias"})
PERMUTATIONS = frozenset({"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim",
                           "moveaxis", "t", "T", "mT", "H", "mH", "adjoint"})
RESHAPES = frozenset({"view", "reshape", "_reshape_alias", "flatten", "unflatten", "squeeze",
                       "squeeze_", "unsqueeze", "unsqueeze_", "view_as", "reshape_as", "_unsafe_view"})
EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
CREATIONS = frozenset({"new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like",
                        "full_like", "empty_like", "new_tensor"})
REDUCTIONS = frozenset({"mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "std",
                         "var", "std_mean", "var_mean", "logsumexp", "norm", "prod", "any", "all",
                         "argmax", "argmin", "median", "nanmedian", "count_nonzero", "aminmax",
                         "vector_norm", "linalg_vector_norm", "mode", "kthvalue"})
SHAPE_KEEPING_ALONG_DIM = frozenset({"softmax", "log_softmax", "softmin", "cumsum", "cumprod",
                                      "cummax", "cummin", "logcumsumexp", "normalize", "glu", "sort",
                                      "argsort", "topk"})
SPLITS = frozenset({"split", "chunk", "tensor_split", "split_with_sizes", "narrow", "index_select",
                     "unbind", "select", "unsafe_split", "unsafe_chunk", "hsplit", "vsplit"})
CATS = frozenset({"cat", "concat", "concatenate", "stack"})
DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                       "feature_alpha_dropout", "dropout_", "rrelu", "rrelu_"})


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # property access such as x.shape or x.T: name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return DUNDER.get(name, name)


@functools.lru_cache(maxsize=None)
def is_pointwise(name: str) -> bool:
    if name in EXTRA_POINTWISE:
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

