"""Lossless entropy coding of whole tensor payloads (numpy only); streams in ``entropy_streams``.

A *tensor payload* (the raw bytes of one tensor) is coded by ``encode_payload``, which tries the
methods that suit its element width and keeps the smallest: the bytes as symbols, 4-bit values as
nibbles, wider values as byte planes (plane k = byte k of every value: a float's exponent byte is
very predictable, its low mantissa bytes are not), mostly-zero tensors as a zero mask (bitmap or
zero-run lengths, whichever is smaller) plus the nonzero values, zlib for repetitive data, or raw.
Each symbol stream is coded by ``entropy_streams.encode_stream`` under its own order-0 model, with
the symbol table of ``entropy_tables``; this module re-exports that stream API for its callers.

Every decoder takes the exact size the container expects and the container's format ``version``
(3 written, 2 still read), validates every count before allocating, and raises ``CorruptStream``
(never anything else, never unbounded work) on bad input. All choices are deterministic.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# The stream API, re-exported: callers and tests import it from here.
from modelpress.kernels.entropy_streams import (  # noqa: F401
    ANS_STREAM, CONSTANT_STREAM, LANES_STREAM, MIN_CODED_SYMBOLS, RAW_STREAM, READABLE_VERSIONS,
    STREAM_KINDS, STREAM_VERSION, decode_stream, encode_stream, entropy_bits, estimate_stream, stream_layout,
)
from modelpress.kernels.entropy_tables import PRECISION, CorruptStream, quantize_counts  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Layouts: byte planes, nibbles
# ---------------------------------------------------------------------------------------------


def split_planes(raw: bytes | np.ndarray, itemsize: int) -> np.ndarray:
    """Little-endian values -> array (itemsize, n): row k is byte k of every value."""
    values = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.view(np.uint8).ravel()
    if values.size % itemsize:
        raise ValueError(f"{values.size} bytes are not a whole number of {itemsize}-byte values")
    return np.ascontiguousarray(values.reshape(-1, itemsize).T)


def join_planes(planes: np.ndarray | list[np.ndarray]) -> bytes:
    return np.ascontiguousarray(np.asarray(planes).T).tobytes()


def split_nibbles(raw: bytes | np.ndarray) -> np.ndarray:
    """Packed 4-bit values -> one symbol per nibble (low nibble first, as ONNX packs them)."""
    packed = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.ravel()
    return np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()


def join_nibbles(nibbles: np.ndarray) -> bytes:
    pairs = nibbles.reshape(-1, 2)
    if (pairs > 0x0F).any():
        raise CorruptStream("nibble symbol above 15")
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------
# Tensor payloads
# ---------------------------------------------------------------------------------------------

RAW, BYTES, NIBBLES, PLANES, SPARSE_BITMAP, SPARSE_RUNS, ZLIB = range(7)
METHOD_NAMES = {RAW: "raw", BYTES: "bytes", NIBBLES: "nibbles", PLANES: "byte-planes",
                SPARSE_BITMAP: "sparse-bitmap", SPARSE_RUNS: "sparse-runs", ZLIB: "zlib"}
# A run of zeros longer than 254 is written as 255-symbols (each adds 255) ended by the remainder.
_RUN_ESCAPE = 255
# A plan this much larger than the smallest may still win when it codes fewer symbols (decodes faster).
SPEED_SLACK = 0.004
# Sparse coding is tried once at least this share of the elements is zero.
SPARSE_MIN_ZERO_SHARE = 0.3
_ZLIB_SAMPLE = 1 << 18


@dataclass
class CodedPayload:
    method: int
    streams: list[bytes]
    # Order-0 entropy of the symbol streams the method codes (raw: of the best candidate's streams,
    # the bound coding could not reach; zlib: of the payload's bytes).
    entropy_bits: float

    @property
    def coded_bytes(self) -> int:
        return sum(len(s) for s in self.streams)


@dataclass
class _Plan:
    """A candidate method with its symbol streams, sized by estimate before anything is coded."""

    method: int
    streams: list[tuple[bytes, np.ndarray]]  # (prefix written before the coded stream, symbols)

    def __post_init__(self):
        sizes = [(len(prefix),) + estimate_stream(symbols) for prefix, symbols in self.streams]
        self.estimated_bytes = sum(size[0] + size[1] for size in sizes)
        self.entropy_bits = sum(size[2] for size in sizes)
        self.symbols = sum(symbols.size for _, symbols in self.streams)

    def code(self) -> CodedPayload:
        return CodedPayload(self.method, [prefix + encode_stream(symbols) for prefix, symbols in self.streams],
                            self.entropy_bits)


def encode_payload(raw: bytes | memoryview, bits: int, level: int = 9) -> CodedPayload:
    """Code one tensor's bytes; ``bits`` is its element width (4, 8, 16, 32, 64...). Smallest wins.

    Candidates are compared by estimated size (entropy + tables), and only the winner is coded.
    ``level`` is the zlib level of the zlib candidate (tried when a sample shows repetition).
    """
    values = np.frombuffer(raw, dtype=np.uint8)
    itemsize = _itemsize(bits, values.size)
    plans = [_dense(values, bits, itemsize)]
    if _zero_share(values, itemsize) >= SPARSE_MIN_ZERO_SHARE:
        plans += _sparse(values, itemsize)
    smallest = min(plan.estimated_bytes for plan in plans)
    # Decode time grows with the number of coded symbols: among the plans within SPEED_SLACK of the
    # smallest, the one with the fewest symbols wins (on 90 %-sparse uint4 indices a zero bitmap +
    # the nonzero bytes is 0.2 % larger than nibbles but decodes 3x faster).
    near = [plan for plan in plans if plan.estimated_bytes <= smallest * (1 + SPEED_SLACK)]
    best = min(near, key=lambda plan: (plan.symbols, plan.estimated_bytes)).code()
    candidate_zlib = _zlib(raw, level, best.coded_bytes)
    if candidate_zlib is not None:
        best = candidate_zlib
    if best.coded_bytes >= values.size:
        return CodedPayload(RAW, [bytes(raw)], best.entropy_bits)
    return best


def _itemsize(bits: int, length: int) -> int:
    """Bytes per element for plane and sparse coding (1 for sub-byte types or a ragged length)."""
    return bits // 8 if bits >= 16 and length % (bits // 8) == 0 else 1


def _dense(values: np.ndarray, bits: int, itemsize: int) -> _Plan:
    if itemsize > 1:
        return _Plan(PLANES, [(b"", plane) for plane in split_planes(values, itemsize)])
    as_bytes = _Plan(BYTES, [(b"", values)])
    if bits == 4:
        as_nibbles = _Plan(NIBBLES, [(b"", split_nibbles(values))])
        return min(as_bytes, as_nibbles, key=lambda plan: plan.estimated_bytes)
    return as_bytes


def _nonzero(values: np.ndarray, itemsize: int) -> np.ndarray:
    """Element-wise 'any byte nonzero' (so -0.0 counts as a value, keeping the bytes exact)."""
    if itemsize in (1, 2, 4, 8):
        return values.view(f"<u{itemsize}") != 0
    return values.reshape(-1, itemsize).any(axis=1)


def _zero_share(values: np.ndarray, itemsize: int) -> float:
    if values.size == 0:
        return 0.0
    sample = values[: (1 << 20) // itemsize * itemsize]  # the first MiB tells whether to try
    return 1.0 - float(np.count_nonzero(_nonzero(sample, itemsize))) / (sample.size // itemsize)


def zero_runs(mask: np.ndarray) -> np.ndarray:
    """Zero-run lengths before each nonzero element, then the trailing run, as escaped byte symbols."""
    positions = np.flatnonzero(mask)
    runs = np.diff(np.concatenate([[-1], positions, [mask.size]])) - 1
    escapes = runs // _RUN_ESCAPE
    total = int(escapes.sum()) + runs.size
    symbols = np.full(total, _RUN_ESCAPE, dtype=np.uint8)
    ends = np.cumsum(escapes + 1) - 1  # each run ends with its remainder symbol
    symbols[ends] = (runs % _RUN_ESCAPE).astype(np.uint8)
    return symbols


def mask_from_runs(symbols: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``zero_runs``; CorruptStream unless the runs describe exactly ``size`` elements."""
    if symbols.size == 0 or symbols[-1] == _RUN_ESCAPE:
        raise CorruptStream("zero runs do not end with a run length")
    ends = np.flatnonzero(symbols != _RUN_ESCAPE)
    sums = np.cumsum(symbols, dtype=np.int64)[ends]
    runs = np.diff(np.concatenate([[0], sums]))
    positions = np.cumsum(runs[:-1] + 1) - 1
    if int(runs.sum()) + len(runs) - 1 != size:
        raise CorruptStream("zero runs do not add up to the tensor size")
    mask = np.zeros(size, dtype=bool)
    mask[positions] = True
    return mask


def _sparse(values: np.ndarray, itemsize: int) -> list[_Plan]:
    mask = _nonzero(values, itemsize)
    nonzero = values.reshape(-1, itemsize)[mask].ravel()
    value_streams = _dense(nonzero, 8 * itemsize, itemsize).streams if itemsize > 1 else [(b"", nonzero)]
    runs = zero_runs(mask)
    return [
        _Plan(SPARSE_BITMAP, [(b"", np.packbits(mask, bitorder="little"))] + value_streams),
        _Plan(SPARSE_RUNS, [(_leb128(runs.size), runs)] + value_streams),
    ]


def _leb128(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low first, high bit set on all but the last byte."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _run_count(stream: memoryview, version: int) -> tuple[int, int]:
    """(symbols in a sparse-runs stream, where its coded stream starts): a u64 in version 2, a
    LEB128 varint (at most 10 bytes, no redundant zero bytes) since version 3."""
    if version == 2:
        if len(stream) < 8:
            raise CorruptStream("zero-run count cut short")
        return int.from_bytes(stream[:8], "little"), 8
    value = 0
    for i in range(min(10, len(stream))):
        value |= (stream[i] & 0x7F) << (7 * i)
        if stream[i] < 0x80:
            if i and stream[i] == 0:
                raise CorruptStream("zero-run count has a redundant byte")
            return value, i + 1
    raise CorruptStream("zero-run count cut short")


def payload_streams(raw: bytes | memoryview, bits: int, method: int) -> list[tuple[int, np.ndarray]]:
    """(prefix bytes, symbols) of each coded stream ``method`` makes of a payload, in stream order
    (none for ``raw`` and ``zlib``): what a size report compares the coded streams against."""
    values = np.frombuffer(raw, dtype=np.uint8)
    itemsize = _itemsize(bits, values.size)
    if method in (SPARSE_BITMAP, SPARSE_RUNS):
        plan = next(plan for plan in _sparse(values, itemsize) if plan.method == method)
    elif method == PLANES:
        plan = _Plan(PLANES, [(b"", plane) for plane in split_planes(values, itemsize)])
    elif method in (BYTES, NIBBLES):
        plan = _Plan(method, [(b"", values if method == BYTES else split_nibbles(values))])
    else:
        return []
    return [(len(prefix), symbols) for prefix, symbols in plan.streams]


def _zlib(raw: bytes | memoryview, level: int, to_beat: int) -> CodedPayload | None:
    """zlib wins on repetitive payloads (tiled or shared values); a sample decides whether to try."""
    sample = raw[:_ZLIB_SAMPLE]
    # The probe runs at level 1: level 9 took ~1 s per 256 KB sample of sparse nibbles (lazy
    # matching on long runs), and beats level 1 by well under the 25 % margin allowed here.
    if not len(sample) or len(zlib.compress(sample, 1)) / len(sample) * len(raw) > to_beat * 1.25:
        return None
    packed = zlib.compress(raw, level)
    if len(packed) >= to_beat:
        return None
    return CodedPayload(ZLIB, [packed], entropy_bits(np.frombuffer(raw, np.uint8)))


def stream_count(method: int, bits: int, length: int) -> int:
    """How many streams a payload coded with ``method`` has (for container validation)."""
    itemsize = _itemsize(bits, length)
    if method == PLANES:
        return itemsize
    if method in (SPARSE_BITMAP, SPARSE_RUNS):
        return 1 + itemsize  # the zero mask, then the nonzero values (as planes when wider than a byte)
    return 1


def decode_payload(method: int, streams: list[memoryview | bytes], length: int, bits: int,
                   version: int = STREAM_VERSION) -> bytes:
    """Inverse of ``encode_payload`` for a payload of exactly ``length`` bytes, written under the
    .mpk format ``version`` (3, or 2 for artifacts of earlier releases)."""
    if version not in READABLE_VERSIONS:
        raise CorruptStream(f"stream format version {version} is not one of {READABLE_VERSIONS}")
    itemsize = _itemsize(bits, length)
    if method not in METHOD_NAMES:
        raise CorruptStream(f"unknown coding method {method}")
    if len(streams) != stream_count(method, bits, length):
        raise CorruptStream(f"{METHOD_NAMES[method]} payload has {len(streams)} streams")
    if method == RAW:
        if len(streams[0]) != length:
            raise CorruptStream("raw payload has the wrong length")
        return bytes(streams[0])
    if method == ZLIB:
        return _unzlib(streams[0], length)
    if method == BYTES:
        return decode_stream(streams[0], length, version).tobytes()
    if method == NIBBLES:
        return join_nibbles(decode_stream(streams[0], 2 * length, version))
    if method == PLANES:
        if itemsize < 2:
            raise CorruptStream("byte planes need values of two bytes or more")
        out = np.empty((length // itemsize, itemsize), dtype=np.uint8)
        for k, stream in enumerate(streams):
            out[:, k] = decode_stream(stream, length // itemsize, version)
        return out.tobytes()
    elements = length // itemsize
    if method == SPARSE_BITMAP:
        bits_of_mask = np.unpackbits(decode_stream(streams[0], -(-elements // 8), version), bitorder="little")
        if bits_of_mask[elements:].any():
            raise CorruptStream("zero mask has bits past the tensor's end")
        mask = bits_of_mask[:elements].view(bool)
    else:
        runs, start = _run_count(memoryview(streams[0]).cast("B"), version)
        if runs > elements + elements // _RUN_ESCAPE + 1:
            raise CorruptStream(f"{runs} zero-run symbols cannot describe {elements} elements")
        mask = mask_from_runs(decode_stream(memoryview(streams[0])[start:], runs, version), elements)
    nonzero = int(np.count_nonzero(mask))
    if itemsize == 1:  # bytes and packed 4-bit indices: no plane interleaving (the common, hot case)
        values = decode_stream(streams[1], nonzero, version)
        if nonzero and not values.all():
            raise CorruptStream("a value the zero mask marks as nonzero is zero")
        out = np.zeros(elements, dtype=np.uint8)
        out[np.flatnonzero(mask)] = values  # 2x faster than boolean-mask assignment on 12M elements
        return out.tobytes()
    values = np.empty((nonzero, itemsize), dtype=np.uint8)
    for k, stream in enumerate(streams[1:]):
        values[:, k] = decode_stream(stream, nonzero, version)
    if not _nonzero(values.ravel(), itemsize).all():
        raise CorruptStream("a value the zero mask marks as nonzero is zero")
    out = np.zeros((elements, itemsize), dtype=np.uint8)
    out[np.flatnonzero(mask)] = values
    return out.tobytes()


def _unzlib(packed: memoryview | bytes, length: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        out = decompressor.decompress(bytes(packed), length + 1)
    except zlib.error as exc:
        raise CorruptStream(f"zlib payload does not decompress ({exc})") from None
    if len(out) != length or not decompressor.eof or decompressor.unused_data or decompressor.unconsumed_tail:
        raise CorruptStream("zlib payload has the wrong length")
    return out
