"""ONNX layer ops as torch functions: Conv, ConvTranspose, pooling, normalization (inference mode).

Registered into ``torch_ops.OPS``. ONNX pads are ``[x1_begin, x2_begin, ..., x1_end, x2_end]`` and may
be asymmetric; torch's layer functions take one symmetric padding, so asymmetric pads are applied
with ``F.pad`` first (with -inf for max pooling, and an explicit count for average pooling).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from modelpress.compressors.torch_ops import CHECKS, Call, Tensor, op
from modelpress.kernels.im2col import same_pads

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pads(call: Call, spatial, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """(begins, ends) per spatial axis from ``pads`` or ``auto_pad``."""
    nd = len(kernel)
    auto = call.attr("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * nd, [0] * nd
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(spatial, kernel, strides, dilations, auto == "SAME_UPPER")
    pads = call.attr("pads") or [0] * (2 * nd)
    return list(pads[:nd]), list(pads[nd:])


def _torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX begins/ends as torch's F.pad list: (begin, end) pairs from the last axis back."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _window(call: Call, kernel) -> tuple[list[int], list[int]]:
    nd = len(kernel)
    return list(call.attr("strides") or [1] * nd), list(call.attr("dilations") or [1] * nd)


@op("Conv")
def _conv(call: Call, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    kernel = list(w.shape[2:])
    strides, dilations = _window(call, kernel)
    begins, ends = _pads(call, x.shape[2:], kernel, strides, dilations)
    if begins != ends:
        x, begins = F.pad(x, _torch_pads(begins, ends)), [0] * len(kernel)
    return _CONV[len(kernel)](x, w, b, strides, begins, dilations, call.attr("group", 1))


@op("ConvTranspose")
def _conv_transpose(call: Call, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    kernel = list(w.shape[2:])
    strides, dilations = _window(call, kernel)
    begins, ends = _pads(call, x.shape[2:], kernel, strides, dilations)
    output_padding = list(call.attr("output_padding") or [0] * len(kernel))
    y = _CONV_T[len(kernel)](x, w, b, strides, 0, output_padding, call.attr("group", 1), dilations)
    # Unpadded transposed convolution, then the pads cropped off each side.
    crop = [slice(None), slice(None)] + [slice(p, y.shape[2 + i] - q) for i, (p, q) in enumerate(zip(begins, ends))]
    return y[tuple(crop)]


def _check_conv_transpose(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    if "output_shape" in attrs:
        return "the output_shape attribute is not supported (give pads instead)"
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad {attrs['auto_pad']} is not supported"
    return None


CHECKS["ConvTranspose"] = _check_conv_transpose


@op("MaxPool")
def _max_pool(call: Call, x: Tensor) -> Tensor:
    kernel = list(call.attr("kernel_shape"))
    strides, dilations = _window(call, kernel)
    begins, ends = _pads(call, x.shape[2:], kernel, strides, dilations)
    if begins != ends or any(p > k // 2 for p, k in zip(begins, kernel)):
        x, begins = F.pad(x, _torch_pads(begins, ends), value=-math.inf), [0] * len(kernel)
    return _MAX_POOL[len(kernel)](x, kernel, strides, begins, dilations, ceil_mode=bool(call.attr("ceil_mode", 0)))


def _check_max_pool(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    if any(facts["outputs_used"][1:]):
        return "the Indices output is not supported"
    return None


CHECKS["MaxPool"] = _check_max_pool


@op("AveragePool")
def _average_pool(call: Call, x: Tensor) -> Tensor:
    kernel = list(call.attr("kernel_shape"))
    nd = len(kernel)
    strides, _ = _window(call, kernel)
    begins, ends = _pads(call, x.shape[2:], kernel, strides, [1] * nd)
    ceil = bool(call.attr("ceil_mode", 0))
    if not any(begins + ends) and not ceil:
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return pool(x, kernel, strides)
    # General case: window sums over the zero-padded input divided by the cells each window counts
    # (the real input, plus the pads when count_include_pad; never the ceil-mode overhang).
    squeeze = nd == 1
    if squeeze:  # avg_pool1d has no divisor_override
        x, kernel, strides, begins, ends = x.unsqueeze(2), [1] + kernel, [1] + strides, [0] + begins, [0] + ends
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    mask = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
    pad_value = 1.0 if call.attr("count_include_pad", 0) else 0.0
    padded_mask = F.pad(mask, _torch_pads(begins, ends), value=pad_value)
    sums = pool(F.pad(x, _torch_pads(begins, ends)), kernel, strides, 0, ceil, True, 1)
    counts = pool(padded_mask, kernel, strides, 0, ceil, True, 1)
    y = sums / counts
    return y.squeeze(2) if squeeze else y


def _check_average_pool(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    if any(d != 1 for d in attrs.get("dilations") or []):
        return "dilations other than 1 are not supported"
    return None


CHECKS["AveragePool"] = _check_average_pool


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(call: Call, x: Tensor) -> Tensor:
    dims = tuple(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if call.op_type == "GlobalAveragePool" else x.amax(dims, keepdim=True)


@op("BatchNormalization")
def _batch_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Inference mode: the stored mean and variance, never batch statistics."""
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=call.attr("epsilon", 1e-5))


def _check_batch_norm(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    if attrs.get("training_mode", 0) or any(facts["outputs_used"][1:]):
        return "training mode (running-statistics outputs) is not supported"
    return None


CHECKS["BatchNormalization"] = _check_batch_norm


@op("LayerNormalization")
def _layer_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor | None = None):
    axis = call.attr("axis", -1) % x.dim()
    eps = call.attr("epsilon", 1e-5)
    normalized = tuple(x.shape[axis:])
    if call.n_outputs == 1 and tuple(scale.shape) == normalized and (bias is None or bias.shape == scale.shape):
        return F.layer_norm(x, normalized, scale, bias, eps)
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    inv_std = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    y = centered * inv_std * scale
    y = y if bias is None else y + bias
    return (y, mean, inv_std)[: call.n_outputs]


@op("InstanceNormalization")
def _instance_norm(call: Call, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=call.attr("epsilon", 1e-5))


@op("LRN")
def _lrn(call: Call, x: Tensor) -> Tensor:
    """ONNX's window over channels is [c - floor((size-1)/2), c + ceil((size-1)/2)]; torch's
    local_response_norm puts the longer half before c, so an even size would differ: summed here."""
    size = call.attr("size")
    alpha, beta, bias = call.attr("alpha", 1e-4), call.attr("beta", 0.75), call.attr("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = F.pad(x * x, [0, 0] * (x.dim() - 2) + [before, after])  # pads dim 1 (channels) only
    channels = x.shape[1]
    window = sum(squares[:, i : i + channels] for i in range(size))
    return x / (bias + alpha / size * window) ** beta
