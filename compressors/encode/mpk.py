"""The ``.mpk`` container: a runnable ONNX file, entropy coded, restorable byte for byte.

before: the serialized ONNX bytes.
after:  an artifact holding (1) the ONNX bytes with every large tensor payload cut out (the
"skeleton", xz compressed) and (2) each cut payload coded on its own by ``kernels.entropy``.
Nothing is re-serialized: decoding splices the payloads back at their recorded offsets, so the
bytes come back identical by construction, and a SHA-256 of the ONNX bytes proves it.

Layout (format version 1, little-endian; the full spec is docs/mpk-format.md):

    header    72 bytes: magic | version | flags | tensor_count | onnx_length | skeleton_length
              | table_length | onnx_sha256
    skeleton  skeleton_length bytes: xz of the ONNX bytes minus the coded payloads
    table     table_length bytes: one entry per coded tensor, in file order
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
VERSION = 1
# A protobuf message cannot reach 2 GiB, so no ONNX file (without external data) is larger.
MAX_ONNX_BYTES = 2**31 - 1
# Payloads smaller than this stay in the skeleton, where xz codes them in context.
MIN_CODED_BYTES = 512
MAX_RANK = 64
# The skeleton's xz decoder may use at most this much memory, whatever its header claims.
XZ_MEMLIMIT = 256 << 20

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
    packed_skeleton = _xz(bytes(skeleton), level)

    table = b"".join(_pack_entry(entry) for entry in entries)
    header = _HEADER.pack(MAGIC, VERSION, 0, len(entries), len(onnx_bytes), len(packed_skeleton), len(table),
                          hashlib.sha256(onnx_bytes).digest())
    body = b"".join([header, packed_skeleton, table, *(s for entry in entries for s in entry.streams)])
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
        "skeleton_bytes": len(packed_skeleton),
        "container_bytes": len(header) + len(table) + 4,
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


def _xz(data: bytes, level: int) -> bytes:
    # The dictionary never needs to exceed the data: a small skeleton then codes in milliseconds
    # and the decoder's memory stays proportional to the skeleton.
    dict_size = min(1 << 26, max(1 << 12, 1 << (len(data) - 1).bit_length()))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": level, "dict_size": dict_size}]
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=filters)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@dataclass
class _Parsed:
    onnx_length: int
    digest: bytes
    skeleton: memoryview  # still xz coded
    entries: list[_Entry]


def _parse(data: bytes) -> _Parsed:
    """Check the framing and the CRC, and read the table; no payload is decoded yet."""
    view = memoryview(data).cast("B")
    if len(view) < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise InputError("not a modelpress .mpk artifact (bad magic number)")
    if len(view) < _HEADER.size + 4:
        raise InputError("artifact is truncated (shorter than its header)")
    _magic, version, flags, count, onnx_length, skeleton_length, table_length, digest = _HEADER.unpack_from(view)
    if version != VERSION:
        raise InputError(f"artifact format version {version}; this modelpress reads version {VERSION}")
    (crc,) = struct.unpack_from("<I", view, len(view) - 4)
    if zlib.crc32(view[:-4]) != crc:
        raise InputError("checksum mismatch: the artifact is corrupt or truncated")
    if flags:
        raise InputError(f"artifact uses flags {flags:#x} that format version {VERSION} does not define")
    if onnx_length > MAX_ONNX_BYTES:
        raise InputError(f"artifact declares {onnx_length} bytes of ONNX, more than the format allows")
    end = len(view) - 4
    table_start = _HEADER.size + skeleton_length
    streams_start = table_start + table_length
    if streams_start > end:
        raise InputError("artifact sections run past its end")
    if count > table_length // (_ENTRY.size + 8):
        raise InputError(f"artifact declares {count} tensors, more than its table can hold")
    entries = _read_table(view[table_start:streams_start], count, onnx_length)

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
    return _Parsed(onnx_length, digest, view[_HEADER.size : table_start], entries)


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


def _unxz(packed: memoryview, expected: int) -> bytes:
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    try:
        skeleton = decompressor.decompress(bytes(packed), max_length=expected + 1)
    except lzma.LZMAError as exc:
        raise InputError(f"artifact skeleton does not decompress ({exc})") from None
    if len(skeleton) != expected or not decompressor.eof or decompressor.unused_data:
        raise InputError("artifact skeleton has the wrong size")
    return skeleton


def unpack(data: bytes) -> bytes:
    """The exact ONNX bytes an artifact was made from; ``InputError`` on any damage."""
    parsed = _parse(data)
    payload_total = sum(entry.span.length for entry in parsed.entries)
    if payload_total > parsed.onnx_length:
        raise InputError("artifact tensors are larger than the model they belong to")
    skeleton = _unxz(parsed.skeleton, parsed.onnx_length - payload_total)
    out = bytearray(parsed.onnx_length)
    skeleton_pos = file_pos = 0
    for entry in parsed.entries:
        span = entry.span
        gap = span.start - file_pos
        out[file_pos : span.start] = skeleton[skeleton_pos : skeleton_pos + gap]
        skeleton_pos += gap
        try:
            payload = entropy.decode_payload(entry.method, entry.streams, span.length, dtype_of(span.data_type)[1])
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
        "format_version": VERSION,
        "onnx_bytes": parsed.onnx_length,
        "shipped_bytes": len(data),
        "ratio": round(parsed.onnx_length / max(1, len(data)), 3),
        "onnx_sha256": parsed.digest.hex(),
        "skeleton_bytes": len(parsed.skeleton),
        "skeleton_raw_bytes": parsed.onnx_length - payload if payload <= parsed.onnx_length else None,
        "coded_tensors": len(tensors),
        "tensors": tensors,
    }
