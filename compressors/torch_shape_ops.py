"""ONNX shape, layout, indexing and constant ops as torch functions (registered into ``torch_ops.OPS``).

Shapes travel as int64 tensors, as in ONNX, and are read back with ``ints`` where torch needs Python
ints. ``Gather`` is also the k-means lookup: codebook rows picked by indices, so gradients reach a
trainable codebook.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from modelpress.compressors.torch_ops import CHECKS, Call, Tensor, UnsupportedCase, axes_of, ints, op, torch_dtype


# --------------------------------------------------------------------------- shapes and layout


@op("Identity")
def _identity(call: Call, x: Tensor) -> Tensor:
    return x


@op("Dropout")
def _dropout(call: Call, x: Tensor, *_: Tensor) -> tuple[Tensor, ...]:
    """Inference semantics: the input unchanged (and an all-true mask when asked for)."""
    return (x, torch.ones_like(x, dtype=torch.bool))[: call.n_outputs]


@op("Shape")
def _shape(call: Call, x: Tensor) -> Tensor:
    rank = x.dim()
    start, end = call.attr("start", 0), call.attr("end", rank)
    return torch.tensor(list(x.shape)[slice(start, end)], dtype=torch.int64)


@op("Size")
def _size(call: Call, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


@op("Reshape")
def _reshape(call: Call, x: Tensor, shape: Tensor) -> Tensor:
    target = ints(shape)
    if not call.attr("allowzero", 0):  # 0 copies the input's dimension at that position
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def _flatten(call: Call, x: Tensor) -> Tensor:
    axis = call.attr("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def _transpose(call: Call, x: Tensor) -> Tensor:
    return x.permute(call.attr("perm") or list(reversed(range(x.dim()))))


@op("Squeeze")
def _squeeze(call: Call, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = axes_of(call, axes)
    return x.squeeze() if not dims else x.squeeze(tuple(d % x.dim() for d in dims))


@op("Unsqueeze")
def _unsqueeze(call: Call, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = axes_of(call, axes)
    rank = x.dim() + len(dims)
    for d in sorted(d % rank for d in dims):  # axes refer to the output's positions
        x = x.unsqueeze(d)
    return x


@op("Concat")
def _concat(call: Call, *xs: Tensor) -> Tensor:
    return torch.cat([x for x in xs if x is not None], dim=call.attr("axis"))


@op("Split")
def _split(call: Call, x: Tensor, split: Tensor | None = None) -> tuple[Tensor, ...]:
    axis = call.attr("axis", 0)
    sizes = ints(split) or call.attr("split")
    if not sizes:  # equal parts; with ``num_outputs`` (opset 18) the last one may be smaller
        parts = call.attr("num_outputs", call.n_outputs)
        sizes = -(-x.shape[axis] // parts)
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(call: Call, x: Tensor, starts=None, ends=None, axes=None, steps=None) -> Tensor:
    if call.opset < 10:
        starts_v, ends_v, axes_v, steps_v = call.attr("starts"), call.attr("ends"), call.attr("axes"), None
    else:
        starts_v, ends_v, axes_v, steps_v = ints(starts), ints(ends), ints(axes), ints(steps)
    axes_v = axes_v if axes_v is not None else list(range(len(starts_v)))
    steps_v = steps_v or [1] * len(starts_v)
    for start, end, axis, step in zip(starts_v, ends_v, axes_v, steps_v):
        axis %= x.dim()
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = [slice(None)] * axis + [slice(start, end, step)]
            x = x[tuple(index)]
        else:  # torch has no negative-step slicing: gather the indices instead
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            x = x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))
    return x


@op("Gather")
def _gather(call: Call, data: Tensor, indices: Tensor) -> Tensor:
    """Also the k-means lookup: rows of a (trainable) codebook picked by cast indices."""
    axis = call.attr("axis", 0) % data.dim()
    index = indices.long()
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = data.index_select(axis, index.reshape(-1))
    return picked.reshape(data.shape[:axis] + index.shape + data.shape[axis + 1:])


@op("GatherElements")
def _gather_elements(call: Call, data: Tensor, indices: Tensor) -> Tensor:
    axis = call.attr("axis", 0) % data.dim()
    index = indices.long()
    return torch.gather(data, axis, torch.where(index < 0, index + data.shape[axis], index))


@op("Expand")
def _expand(call: Call, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape))))


@op("Tile")
def _tile(call: Call, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(ints(repeats))


@op("Range")
def _range(call: Call, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("Pad")
def _pad(call: Call, x: Tensor, pads=None, value=None, axes=None) -> Tensor:
    if call.opset < 11:
        pads_v, fill = call.attr("pads"), call.attr("value", 0.0)
    else:
        pads_v, fill = ints(pads), (0 if value is None else value.item())
    dims = [a % x.dim() for a in ints(axes)] if axes is not None else list(range(x.dim()))
    n = len(dims)
    full = [0] * (2 * x.dim())
    for i, d in enumerate(dims):
        full[d], full[x.dim() + d] = pads_v[i], pads_v[n + i]
    torch_pads: list[int] = []
    for d in reversed(range(x.dim())):  # torch lists (begin, end) from the last dimension back
        torch_pads += [full[d], full[x.dim() + d]]
    mode = call.attr("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    # torch pads the last 1-3 dims of an input with one leading (batch) dim more: fold every dim
    # before the first padded one into that batch dim (a [batch, samples] audio input pads its last).
    padded = [d for d in range(x.dim()) if full[d] or full[x.dim() + d]]
    if not padded:
        return x
    k = x.dim() - padded[0]
    if k > 3:
        raise UnsupportedCase(f"{mode} padding of {k} trailing dims (torch pads at most 3)")
    lead = x.shape[: x.dim() - k]
    out = F.pad(x.reshape(-1, *x.shape[x.dim() - k:]), torch_pads[: 2 * k],
                mode={"reflect": "reflect", "edge": "replicate"}[mode])
    return out.reshape(*lead, *out.shape[1:])


def _check_pad(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    if attrs.get("mode", "constant") not in ("constant", "reflect", "edge"):
        return f"mode {attrs['mode']!r} is not supported"
    return None


CHECKS["Pad"] = _check_pad


# --------------------------------------------------------------------------- constants and types


@op("Cast")
def _cast(call: Call, x: Tensor) -> Tensor:
    return x.to(torch_dtype(call.attr("to")))


@op("CastLike")
def _cast_like(call: Call, x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


@op("Constant")
def _constant(call: Call) -> Tensor:
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in call.attrs:
            return torch.tensor(call.attrs[key], dtype=dtype)
    return call.attr("value")


@op("ConstantOfShape")
def _constant_of_shape(call: Call, shape: Tensor) -> Tensor:
    value = call.attr("value")
    if value is None:
        return torch.zeros(ints(shape), dtype=torch.float32)
    return torch.full(ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _check_constant(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    if any(key in attrs for key in ("value_string", "value_strings", "sparse_value")):
        return "string and sparse constants are not supported"
    return None


CHECKS["Constant"] = _check_constant


@op("Resize")
def _resize(call: Call, x: Tensor, roi=None, scales=None, sizes=None) -> Tensor:
    """Nearest upsampling by whole factors (YOLO's and PP-OCR's FPN): each pixel repeated. For whole
    factors ``asymmetric``/``floor`` and the default ``half_pixel``/``round_prefer_floor`` both pick
    that pixel; anything else is refused by ``_check_resize`` or here."""
    if sizes is not None and sizes.numel():
        factors = [out / size for out, size in zip(ints(sizes), x.shape)]
    else:
        factors = [float(v) for v in scales.reshape(-1).tolist()]
    if any(f != int(f) or f < 1 for f in factors):
        raise UnsupportedCase(f"Resize {call.name!r}: factors {factors} are not whole upsampling factors")
    for axis, factor in enumerate(factors):
        if factor != 1:
            x = x.repeat_interleave(int(factor), dim=axis)
    return x


def _check_resize(attrs: dict[str, Any], facts: dict[str, Any]) -> str | None:
    mode = attrs.get("mode", "nearest")
    pair = (attrs.get("coordinate_transformation_mode", "half_pixel"), attrs.get("nearest_mode", "round_prefer_floor"))
    if mode != "nearest" or pair not in {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                                         ("asymmetric", "round_prefer_floor")}:
        return f"mode {mode!r} with {pair} is not supported (nearest upsampling by whole factors only)"
    return None


CHECKS["Resize"] = _check_resize
