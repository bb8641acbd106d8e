"""The ``.mpk`` container: a runnable ONNX file, entropy coded, restorable byte for byte.

before: the serialized ONNX bytes.
after:  an artifact holding (1) the ONNX bytes with every large tensor payload cut out (the
"skeleton", LZMA2 compressed) and (2) each cut payload coded on its own by ``kernels.entropy``.
Nothing is re-serialized: decoding splices the payloads back at their recorded offsets, so the
bytes come back identical by construction, and a SHA-256 of the ONNX bytes proves it.

Layout (format version 3, little-endian; the full spec is docs/mpk-format.md; version 2 artifacts,
which differ only inside the coded streams, still decode):

    header    72 bytes: magic | version | flags | tensor_count | onnx_length | block_length
              | table_length | onnx_sha256
    block     block_length bytes: raw LZMA2 of (table + skeleton), where the table holds one
              entry per coded tensor, in file order, and the skeleton is the ONNX bytes minus
              the coded payloads. One block, so the tensor names in the table compress against
              the same names in the graph, and no xz framing is paid for (small models ship a
              few KB, where ~60 bytes of framing and ~90 bytes per table entry show).
    streams   the coded streams of every tensor, in table order
    trailer   crc32 of everything before it

This module works on bytes only (no files). Decoding is hostile-input safe: the CRC is checked
first, every declared length is checked against the bytes actually present and against format
caps before anything is allocated, and any damage is an ``InputError`` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

from modelpress.compressors.encode.wire import TensorSpan, WireError, tensor_spans
from modelpress.compressors.errors import InputError
from modelpress.kernels import entropy

MAGIC = b"\x89MPK\r\n\x1a\n"  # PNG-style: a text-mode transfer or a truncated upload shows at once
VERSION = 3
# Versions ``unpack`` reads: 2 differs from 3 only inside the coded streams (byte-aligned symbol
# tables of exact counts, whole ans words, u64 zero-run counts), so its artifacts keep decoding.
READABLE_VERSIONS = (2, 3)
# A protobuf message cannot reach 2 GiB, so no ONNX file (without external data) is larger.
MAX_ONNX_BYTES = 2**31 - 1
# Payloads smaller than this stay in the skeleton, where LZMA2 codes them in context.
MIN_CODED_BYTES = 512
MAX_RANK = 64
# LZMA2 dictionary: the next power of two at or above the model size, within these bounds, so the
# decoder's memory follows the model and never exceeds 8 MiB whatever a header claims. The large
# tensors are cut out of the skeleton, so matches further back than 8 MiB are rare and worth little.
MIN_DICT_BYTES, MAX_DICT_BYTES = 1 << 12, 1 << 23
# A table entry is at most 33 + 8*64 + 65535 + 8*9 bytes; no real table comes near this cap.
MAX_TABLE_BYTES = 64 << 20

_HEADER = struct.Struct("<8sHHIQQQ32s")
# start, length, data_type, method, stream_count, rank, name_length, entropy_bits
_ENTRY = struct.Struct("<QQIBBBHQ")

# ONNX TensorProto.DataType -> (name, bits per element). Packing of 2- and 6-bit types is coded as bytes.
DTYPES = {
    1: ("float32", 32), 2: ("uint8", 8), 3: ("int8", 8), 4: ("uint16", 16), 5: ("int16", 16),
    6: ("int32", 32), 7: ("int64", 64), 8: ("string", 8), 9: ("bool", 8), 10: ("float16", 16),
    11: ("float64", 64), 12: ("uint32", 32), 13: ("uint64", 64), 14: ("complex64", 64),
    15: ("complex128", 128), 16: ("bfloat16", 16), 17: ("float8e4m3fn", 8), 18: ("float8e4m3fnuz", 8),
    19: ("float8e5m2", 8), 20: ("float8e5m2fnuz", 8), 21: ("uint4", 4), 22: ("int4", 4),
    23: ("float4e2m1", 4), 24: ("float8e8m0", 8), 25: ("uint2", 8), 26: ("int2", 8),
    27: ("float6e2m3", 8), 28: ("float6e3m2", 8),
}


def dtype_of(data_type: int) -> tuple[str, int]:
    return DTYPES.get(data_type, (f"type {data_type}", 8))


@dataclass
class _Entry:
    span: TensorSpan
    method: int
    entropy_bits: int
    streams: list  # bytes when packing, memoryviews when unpacking


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def pack(onnx_bytes: bytes, level: int = 9) -> tuple[bytes, dict]:
    """Code a serialized ONNX model; returns (artifact, statistics).

    ``level`` is the xz preset of the skeleton and the zlib level of the zlib fallback (0-9).
    """
    if len(onnx_bytes) > MAX_ONNX_BYTES:
        raise InputError("models of 2 GiB or more keep their weights as external data, which .mpk does not hold")
    try:
        spans = [s for s in tensor_spans(onnx_bytes) if s.length >= MIN_CODED_BYTES]
    except WireError as exc:
        raise InputError(f"the ONNX bytes are not a well-formed protobuf ({exc})") from None
    view = memoryview(onnx_bytes)
    entries = []
    for span in spans:
        coded = entropy.encode_payload(view[span.start : span.start + span.length], dtype_of(span.data_type)[1], level)
        entries.append(_Entry(span, coded.method, int(round(coded.entropy_bits)), coded.streams))

    skeleton, cursor = bytearray(), 0
    for entry in entries:
        skeleton += view[cursor : entry.span.start]
        cursor = entry.span.start + entry.span.length
    skeleton += view[cursor:]
    table = b"".join(_pack_entry(entry) for entry in entries)
    block = _lzma(table + bytes(skeleton), level, len(onnx_bytes))

    header = _HEADER.pack(MAGIC, VERSION, 0, len(entries), len(onnx_bytes), len(block), len(table),
                          hashlib.sha256(onnx_bytes).digest())
    body = b"".join([header, block, *(s for entry in entries for s in entry.streams)])
    artifact = body + struct.pack("<I", zlib.crc32(body))

    coded_bytes = sum(len(s) for entry in entries for s in entry.streams)
    stats = {
        "onnx_bytes": len(onnx_bytes),
        "shipped_bytes": len(artifact),
        "ratio": round(len(onnx_bytes) / len(artifact), 3),
        "tensors": len(entries),
        "payload_bytes": sum(entry.span.length for entry in entries),
        "coded_payload_bytes": coded_bytes,
        "entropy_bytes": round(sum(entry.entropy_bits for entry in entries) / 8),
        "skeleton_raw_bytes": len(skeleton),
        "table_raw_bytes": len(table),
        "skeleton_bytes": len(block),  # skeleton and table, compressed together
        "container_bytes": len(header) + 4,
        "per_tensor": {entry.span.name: _tensor_stats(entry) for entry in entries},
        "methods": dict(sorted(Counter(entropy.METHOD_NAMES[e.method] for e in entries).items())),
    }
    return artifact, stats


def _pack_entry(entry: _Entry) -> bytes:
    span = entry.span
    name = span.name.encode("utf-8")[:65535].decode("utf-8", "ignore").encode("utf-8")
    dims = [d & (2**64 - 1) for d in span.dims[:MAX_RANK]]
    return b"".join([
        _ENTRY.pack(span.start, span.length, span.data_type, entry.method, len(entry.streams), len(dims),
                    len(name), entry.entropy_bits),
        struct.pack(f"<{len(dims)}Q", *dims),
        name,
        struct.pack(f"<{len(entry.streams)}Q", *(len(s) for s in entry.streams)),
    ])


def _tensor_stats(entry: _Entry) -> dict:
    """Shipped size of one coded tensor, for the report's per-tensor table."""
    bits = dtype_of(entry.span.data_type)[1]
    elements = max(1, entry.span.length * 8 // bits)
    coded = sum(len(s) for s in entry.streams)
    return {"bytes": entry.span.length, "elements": elements, "coded_bytes": coded,
            "method": entropy.METHOD_NAMES[entry.method],
            "bits_per_element": round(8 * coded / elements, 3),
            "entropy_bits_per_element": round(entry.entropy_bits / elements, 3)}


def _filters(onnx_length: int, level: int = 9) -> list[dict]:
    # The dictionary never needs to exceed the model: a small model then codes in milliseconds and
    # the decoder's memory stays proportional to it. The decoder derives the same size.
    dict_size = min(MAX_DICT_BYTES, max(MIN_DICT_BYTES, 1 << max(0, onnx_length - 1).bit_length()))
    options = {"id": lzma.FILTER_LZMA2, "dict_size": dict_size}
    if level is not None:
        options["preset"] = level | (lzma.PRESET_EXTREME if level >= 9 else 0)
    return [options]


def _lzma(data: bytes, level: int, onnx_length: int) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_filters(onnx_length, level))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@dataclass
class _Parsed:
    version: int
    onnx_length: int
    digest: bytes
    block_bytes: int  # compressed size of table + skeleton
    entries: list[_Entry]
    decompressor: lzma.LZMADecompressor  # positioned after the table: the skeleton comes next


def _parse(data: bytes) -> _Parsed:
    """Check the framing and the CRC, and read the table; no payload is decoded yet."""
    view = memoryview(data).cast("B")
    if len(view) < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise InputError("not a modelpress .mpk artifact (bad magic number)")
    if len(view) < _HEADER.size + 4:
        raise InputError("artifact is truncated (shorter than its header)")
    _magic, version, flags, count, onnx_length, block_length, table_length, digest = _HEADER.unpack_from(view)
    if version not in READABLE_VERSIONS:
        raise InputError(f"artifact format version {version}; this modelpress reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    (crc,) = struct.unpack_from("<I", view, len(view) - 4)
    if zlib.crc32(view[:-4]) != crc:
        raise InputError("checksum mismatch: the artifact is corrupt or truncated")
    if flags:
        raise InputError(f"artifact uses flags {flags:#x} that format version {version} does not define")
    if onnx_length > MAX_ONNX_BYTES:
        raise InputError(f"artifact declares {onnx_length} bytes of ONNX, more than the format allows")
    if table_length > MAX_TABLE_BYTES or count > table_length // _ENTRY.size:
        raise InputError(f"artifact declares {count} tensors in a {table_length}-byte table, "
                         "more than its table can hold")
    end = len(view) - 4
    streams_start = _HEADER.size + block_length
    if streams_start > end:
        raise InputError("artifact sections run past its end")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_filters(onnx_length, None))
    table = _inflate(decompressor, view[_HEADER.size : streams_start], table_length, "tensor table")
    entries = _read_table(memoryview(table), count, onnx_length)

    position = streams_start
    for entry in entries:
        lengths = entry.streams
        if position + sum(lengths) > end:
            raise InputError(f"tensor {entry.span.name!r}: coded data runs past the end of the artifact")
        entry.streams = []
        for length in lengths:
            entry.streams.append(view[position : position + length])
            position += length
    if position != end:
        raise InputError("artifact has bytes after its last tensor")
    return _Parsed(version, onnx_length, digest, block_length, entries, decompressor)


def _inflate(decompressor: lzma.LZMADecompressor, packed: memoryview | bytes, size: int, what: str) -> bytes:
    """Exactly ``size`` more bytes from the block; never more than that many are produced."""
    if decompressor.eof:  # the block ended early: only a request for nothing can be met
        out = b""
    else:
        out = _decompress(decompressor, packed, size, what)
    if len(out) != size:
        raise InputError(f"artifact {what} is shorter than declared")
    return out


def _decompress(decompressor: lzma.LZMADecompressor, packed: memoryview | bytes, size: int, what: str) -> bytes:
    try:
        return decompressor.decompress(bytes(packed), max_length=size)
    except lzma.LZMAError as exc:
        raise InputError(f"artifact {what} does not decompress ({exc})") from None


def _read_table(table: memoryview, count: int, onnx_length: int) -> list[_Entry]:
    entries: list[_Entry] = []
    position = previous_end = 0
    try:
        for _ in range(count):
            start, length, data_type, method, streams, rank, name_length, bits = _ENTRY.unpack_from(table, position)
            position += _ENTRY.size
            dims = struct.unpack_from(f"<{rank}Q", table, position)
            position += 8 * rank
            if position + name_length > len(table):
                raise struct.error
            name = bytes(table[position : position + name_length]).decode("utf-8", "replace")
            position += name_length
            lengths = list(struct.unpack_from(f"<{streams}Q", table, position))
            position += 8 * streams
            label = f"tensor {name!r}"
            if method not in entropy.METHOD_NAMES:
                raise InputError(f"{label}: unknown coding method {method}")
            if rank > MAX_RANK:
                raise InputError(f"{label}: rank {rank} is above the format's {MAX_RANK}")
            if length < 1 or start < previous_end or start + length > onnx_length:
                raise InputError(f"{label}: payload span {start}+{length} is out of order or outside the model")
            if streams != entropy.stream_count(method, dtype_of(data_type)[1], length):
                raise InputError(f"{label}: {streams} streams do not fit coding method {entropy.METHOD_NAMES[method]}")
            previous_end = start + length
            signed_dims = tuple(d - 2**64 if d >= 2**63 else d for d in dims)
            entries.append(_Entry(TensorSpan(name, data_type, signed_dims, start, length), method, bits, lengths))
    except struct.error:
        raise InputError("artifact tensor table is cut short") from None
    if position != len(table):
        raise InputError("artifact tensor table has bytes after its last entry")
    return entries


def unpack(data: bytes) -> bytes:
    """The exact ONNX bytes an artifact was made from; ``InputError`` on any damage."""
    parsed = _parse(data)
    payload_total = sum(entry.span.length for entry in parsed.entries)
    if payload_total > parsed.onnx_length:
        raise InputError("artifact tensors are larger than the model they belong to")
    expected = parsed.onnx_length - payload_total
    skeleton = _inflate(parsed.decompressor, b"", expected, "skeleton")
    if not parsed.decompressor.eof:  # the end marker may still be buffered: anything else is extra
        if _decompress(parsed.decompressor, b"", 1, "skeleton") or not parsed.decompressor.eof:
            raise InputError("artifact skeleton has the wrong size")
    if parsed.decompressor.unused_data:
        raise InputError("artifact skeleton has bytes after its end")
    out = bytearray(parsed.onnx_length)
    skeleton_pos = file_pos = 0
    for entry in parsed.entries:
        span = entry.span
        gap = span.start - file_pos
        out[file_pos : span.start] = skeleton[skeleton_pos : skeleton_pos + gap]
        skeleton_pos += gap
        try:
            payload = entropy.decode_payload(entry.method, entry.streams, span.length, dtype_of(span.data_type)[1],
                                             parsed.version)
        except entropy.CorruptStream as exc:
            raise InputError(f"tensor {span.name!r}: {exc}") from None
        if len(payload) != span.length:
            raise InputError(f"tensor {span.name!r}: decoded {len(payload)} bytes, expected {span.length}")
        out[span.start : span.start + span.length] = payload
        file_pos = span.start + span.length
    out[file_pos:] = skeleton[skeleton_pos:]
    if hashlib.sha256(out).digest() != parsed.digest:
        raise InputError("the decoded model does not match the checksum recorded at encode time")
    return bytes(out)


def describe(data: bytes) -> dict:
    """What an artifact holds: sizes, and per coded tensor its coding and bits per weight.

    Checks the framing and the CRC but decodes nothing (``unpack`` proves the content).
    """
    parsed = _parse(data)
    tensors = []
    for entry in parsed.entries:
        span = entry.span
        dtype, bits = dtype_of(span.data_type)
        elements = max(1, span.length * 8 // bits)
        coded = sum(len(s) for s in entry.streams)
        tensors.append({
            "tensor": span.name,
            "dtype": dtype,
            "shape": "x".join(map(str, span.dims)) or "scalar",
            "method": entropy.METHOD_NAMES[entry.method],
            "bytes": span.length,
            "coded_bytes": coded,
            "bits_per_weight": round(8 * coded / elements, 3),
            "entropy_bits_per_weight": round(entry.entropy_bits / elements, 3),
        })
    payload = sum(t["bytes"] for t in tensors)
    return {
        "format_version": parsed.version,
        "onnx_bytes": parsed.onnx_length,
        "shipped_bytes": len(data),
        "ratio": round(parsed.onnx_length / max(1, len(data)), 3),
        "onnx_sha256": parsed.digest.hex(),
        "skeleton_bytes": parsed.block_bytes,  # skeleton and tensor table, compressed together
        "skeleton_raw_bytes": parsed.onnx_length - payload if payload <= parsed.onnx_length else None,
        "coded_tensors": len(tensors),
        "tensors": tensors,
    }
