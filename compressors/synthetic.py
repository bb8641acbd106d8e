"""Inputs made from a model's signature when there is no ``--data`` (and ``--shape`` flags):
deterministic in the seed, plausible for the input's name (token ids, masks, positions)."""

from __future__ import annotations

import numpy as np

from modelpress.compressors.data import Dataset
from modelpress.compressors.model_inputs import InputSpec, format_shape
from modelpress.compressors.errors import InputError, did_you_mean

# Synthesized integer inputs (token ids, indices) take values in [0, SYNTHETIC_INT_HIGH): small
# enough for any vocabulary, and lower still when the input indexes a Gather table we can see.
SYNTHETIC_INT_HIGH = 100


def parse_shape_flags(values: list[str]) -> dict[str, tuple[int, ...]]:
    """``["input_ids=1x128", "pixel_values=1x3x224x224"]`` -> ``{name: (1, 128), ...}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        name, dims = name.strip(), dims.strip()
        example = "--shape input_ids=1x128"
        if not sep or not name or not dims:
            raise InputError(f"--shape {value!r}: expected NAME=DIMS with dims joined by 'x', e.g. {example}")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"--shape {value!r}: dims must be whole numbers joined by 'x', e.g. {example}") from None
        if any(d < 1 for d in shape):
            raise InputError(f"--shape {value!r}: every dim must be at least 1")
        if name in shapes:
            raise InputError(f"--shape {name!r} is given twice")
        shapes[name] = shape
    return shapes


def synthesize(
    inputs: list[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> Dataset:
    """Inputs made from the signature when there is no ``--data``, deterministic in ``seed``.

    Dynamic dims come from ``shapes`` (``--shape name=1x128``), except a leading dynamic batch dim,
    which defaults to 1. Values: floats standard normal; integers (token ids, indices) uniform in
    [0, 100), or below the size of the Gather table they index when the model shows one; inputs
    named like ``*mask*`` ones, ``*token_type*``/``*segment*`` zeros, ``*position*`` 0, 1, 2, ...
    along the last axis; booleans True. Enough feeds of the resulting batch to hold ``samples``.
    """
    shapes = dict(shapes or {})
    names = [spec.name for spec in inputs]
    for name in shapes:
        if name not in names:
            raise InputError(
                f"--shape {name}: the model has no input {name!r}{did_you_mean(name, names, ignore_case=True)}; "
                f"its inputs: {', '.join(spec.describe() for spec in inputs)}"
            )
    resolved = {spec.name: _resolve_shape(spec, shapes.get(spec.name)) for spec in inputs}
    first = resolved[inputs[0].name] if inputs else ()
    per_feed = first[0] if first else 1
    sliceable = bool(inputs) and all(
        spec.shape and not isinstance(spec.shape[0], int) and resolved[spec.name][0] == per_feed for spec in inputs
    )
    rng = np.random.default_rng(seed)
    feeds = [
        {spec.name: _synthetic_values(spec, resolved[spec.name], rng) for spec in inputs}
        for _ in range(max(1, -(-samples // per_feed)))
    ]
    given = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in resolved.items())
    return Dataset(feeds, None, per_feed * len(feeds), f"synthetic (seed {seed}; {given})", [per_feed] * len(feeds), sliceable)


def _resolve_shape(spec: InputSpec, given: tuple[int, ...] | None) -> tuple[int, ...]:
    flag = f"--shape {spec.name}=" + "x".join("N" if not isinstance(d, int) else str(d) for d in (spec.shape or ("N",)))
    if given is not None:
        if spec.shape is not None:
            if len(given) != len(spec.shape):
                raise InputError(
                    f"--shape {spec.name}={'x'.join(map(str, given))}: the model expects rank {len(spec.shape)} "
                    f"{format_shape(spec.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, given)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"--shape {spec.name}={'x'.join(map(str, given))}: dim {axis} is fixed to {want} by the model "
                        f"{format_shape(spec.shape)}"
                    )
        return tuple(given)
    if spec.shape is None:
        raise InputError(f"input {spec.name!r} declares no shape; give one with --shape {spec.name}=1x...")
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0:
            shape.append(1)  # a leading dynamic dim is the batch
        else:
            label = f" ({dim!r})" if dim else ""
            raise InputError(
                f"input {spec.name!r} {format_shape(spec.shape)}: dim {axis}{label} is dynamic; give its size with "
                f"{flag} (each N a number), or pass --data"
            )
    return tuple(shape)


def _synthetic_values(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    name = spec.name.lower()
    kind = spec.dtype.kind
    if kind == "b":
        return np.ones(shape, dtype=bool)
    if kind in "iuf" and "mask" in name:
        return np.ones(shape, dtype=spec.dtype)
    if kind in "iu":
        if "token_type" in name or "segment" in name:
            return np.zeros(shape, dtype=spec.dtype)
        if "position" in name and shape:
            return np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
        high = min(SYNTHETIC_INT_HIGH, spec.index_bound or SYNTHETIC_INT_HIGH)
        return rng.integers(0, max(1, high), size=shape).astype(spec.dtype)
    if kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
    raise InputError(f"input {spec.name!r} is a {spec.dtype} tensor, which cannot be synthesized; pass --data")
