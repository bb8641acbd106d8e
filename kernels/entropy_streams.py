"""Lossless order-0 coding of one uint8 symbol stream (numpy + constriction).

A stream is coded under its own order-0 distribution: a symbol table (``entropy_tables``) travels
with it, so the decoder rebuilds exactly the model the encoder used. Four stream kinds:

- raw       the symbols verbatim (noise-like data, or too short for a table to pay off)
- constant  one symbol repeated
- ans       one rANS stack coded by ``constriction`` (AnsCoder + Categorical): no per-lane cost,
            ~20-70 M symbols/s to decode; used for short streams
- lanes     interleaved rANS with many lanes, coded and decoded here with vectorized numpy
            (one numpy step decodes one symbol in every lane): ~80 M symbols/s on long streams,
            at the price of 4 bytes of final state per lane

``version`` is the .mpk format version the bytes follow: 3 is written; 2 (byte-aligned table of
exact counts, whole u32 ans words) is still read. Every decoder takes the exact symbol count the
container expects, validates tables before allocating, and raises ``CorruptStream`` (never
anything else, never unbounded work) on bad input. Integer arithmetic, deterministic choices.
"""

from __future__ import annotations

import constriction
import numpy as np

from modelpress.kernels import entropy_tables as tables
from modelpress.kernels.entropy_tables import PRECISION, CorruptStream, entropy_of_counts, quantize_counts

RAW_STREAM, CONSTANT_STREAM, ANS_STREAM, LANES_STREAM = 0, 1, 2, 3
STREAM_KINDS = {RAW_STREAM: "raw", CONSTANT_STREAM: "constant", ANS_STREAM: "ans", LANES_STREAM: "lanes"}
STREAM_VERSION = 3
READABLE_VERSIONS = (2, 3)

# Below this many symbols a count table costs more than coding saves.
MIN_CODED_SYMBOLS = 32
# constriction decodes 20-70 M symbols/s with no per-lane cost but allocates 4 bytes per symbol;
# the lane coder is faster on long streams. Streams longer than this must use lanes.
MAX_ANS_SYMBOLS = 1 << 22
# Lane coder: 16-bit probability precision, 32-bit states in [2^16, 2^32), 16-bit words.
_TOTAL = 1 << PRECISION
_LOWER = 1 << 16
MIN_LANES, MAX_LANES = 1024, 65535
# One numpy step decodes one symbol per lane: bounding the steps bounds decode time of any input.
MAX_LANE_STEPS = 1 << 15
# A coded stream is kept only when it saves at least this share over raw (decode speed matters too).
MIN_SAVING = 0.005
# constriction's AnsCoder starts from state 0, so its flush costs about its 24-bit precision less
# the information of the last symbols; byte-trimmed (version 3) that is 2-3 bytes on average.
ANS_FLUSH_BYTES = 3


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 (empirical) entropy of a uint8 stream, in bits for the whole stream."""
    flat = np.asarray(symbols).ravel()
    if flat.size == 0:
        return 0.0
    return entropy_of_counts(np.bincount(flat, minlength=256))


def _lane_count(n: int, bits: float) -> int:
    """Lanes for a long stream: enough for speed, few enough that 4 state bytes each stay <0.4 %."""
    lanes = MIN_LANES
    while lanes * 2 <= min(16384, bits / 8 / 1024):
        lanes *= 2
    return min(MAX_LANES, max(lanes, -(-n // MAX_LANE_STEPS)))


def _use_ans(n: int, bits: float) -> bool:
    """constriction for short streams (no per-lane cost); lanes once they are fast and cheap enough."""
    return n <= MAX_ANS_SYMBOLS and (n < 1 << 20 or bits / 8 < MIN_LANES * 1024)


def _max_precision(use_ans: bool) -> int:
    return tables.MAX_TABLE_PRECISION if use_ans else PRECISION


def encode_stream(symbols: np.ndarray) -> bytes:
    """Code a uint8 array (any shape; flattened) losslessly; the smallest stream kind wins."""
    flat = np.ascontiguousarray(symbols, dtype=np.uint8).ravel()
    n = flat.size
    raw = bytes([RAW_STREAM]) + flat.tobytes()
    counts = np.bincount(flat, minlength=256)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        return bytes([CONSTANT_STREAM, int(present[0])])
    if n < MIN_CODED_SYMBOLS:
        return raw
    bits = entropy_of_counts(counts)
    if bits / 8 > n * (1 - MIN_SAVING):  # cannot beat raw by enough
        return raw
    index = np.zeros(256, dtype=np.int32)
    index[present] = np.arange(len(present), dtype=np.int32)
    use_ans = _use_ans(n, bits)
    precision, freqs, _ = tables.choose_table(counts[present], _max_precision(use_ans))
    if use_ans:
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(index[flat], _ans_model(freqs, precision))
        words = _trimmed(coder.get_compressed())
        if not words or words[-1] == 0:  # cannot happen (k >= 2 leaves a nonzero state); never ship it
            return raw
        coded = tables.write_table(ANS_STREAM, present, freqs, precision, n) + words
    else:
        lanes = _lane_count(n, bits)
        states, words = _lanes_encode(flat, freqs << (PRECISION - precision), index, lanes)
        coded = (tables.write_table(LANES_STREAM, present, freqs, precision, n)
                 + np.uint32(lanes).astype("<u4").tobytes() + states.astype("<u4").tobytes()
                 + words.astype("<u2").tobytes())
    return coded if len(coded) < len(raw) * (1 - MIN_SAVING) else raw


def estimate_stream(symbols: np.ndarray) -> tuple[int, float]:
    """(bytes ``encode_stream`` will about take, order-0 entropy in bits), without coding."""
    n = symbols.size
    counts = np.bincount(symbols.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    bits = entropy_of_counts(counts)
    if len(present) == 1:
        return 2, bits
    if n < MIN_CODED_SYMBOLS or bits / 8 > n * (1 - MIN_SAVING):
        return n + 1, bits
    use_ans = _use_ans(n, bits)
    precision, freqs, coded_bits = tables.choose_table(counts[present], _max_precision(use_ans))
    tail = ANS_FLUSH_BYTES if use_ans else 4 + 4 * _lane_count(n, bits)
    return min(n + 1, tables.table_bytes(present, freqs, precision, n) + int(coded_bits / 8) + tail), bits


def stream_layout(data: bytes | memoryview, count: int) -> tuple[str, int]:
    """(kind, bytes before the coded symbols: kind byte and table) of a version 3 stream of
    ``count`` symbols."""
    data = memoryview(data).cast("B")
    if data[0] <= CONSTANT_STREAM:
        return STREAM_KINDS[data[0]], 1
    kind = data[0] & 3
    return STREAM_KINDS[kind], tables.read_table(data, _max_precision(kind == ANS_STREAM), count)[3]


def decode_stream(data: bytes | memoryview, count: int, version: int = STREAM_VERSION) -> np.ndarray:
    """Decode one stream of exactly ``count`` symbols; ``data`` is exactly what ``encode_stream``
    returned (or, for ``version`` 2, what the version 2 encoder did)."""
    data = memoryview(data).cast("B")
    if len(data) == 0:
        raise CorruptStream("empty stream")
    if version not in READABLE_VERSIONS:
        raise CorruptStream(f"stream format version {version} is not one of {READABLE_VERSIONS}")
    kind = data[0]
    if version == 3 and kind > CONSTANT_STREAM:  # the table starts right after the 2 kind bits
        kind = kind & 3 if kind & 3 > CONSTANT_STREAM else 256
    if kind == RAW_STREAM:
        if len(data) != 1 + count:
            raise CorruptStream(f"raw stream holds {len(data) - 1} symbols, expected {count}")
        return np.frombuffer(data[1:], dtype=np.uint8).copy()
    if kind == CONSTANT_STREAM:
        if len(data) != 2:
            raise CorruptStream("constant stream malformed")
        return np.full(count, data[1], dtype=np.uint8)
    if kind not in (ANS_STREAM, LANES_STREAM):
        raise CorruptStream(f"unknown stream kind {kind}")
    if version == 2:
        return _decode_v2(data, kind, count)
    if kind == ANS_STREAM and count > MAX_ANS_SYMBOLS:
        raise CorruptStream(f"ans stream claims {count} symbols, more than the kind allows")
    symbols, freqs, precision, pos = tables.read_table(data, _max_precision(kind == ANS_STREAM), count)
    if kind == LANES_STREAM:  # its final lane states are the integrity check
        return _lanes_decode(data, pos, symbols, freqs << (PRECISION - precision), count)
    words = data[pos:]
    if len(words) == 0 or words[-1] == 0:  # the encoder trims exactly the top word's zero bytes
        raise CorruptStream("ans words missing or not trimmed")
    padded = bytes(words) + bytes(-len(words) % 4)
    return symbols[_ans_decode(np.frombuffer(padded, dtype="<u4"), _ans_model(freqs, precision), count)]


def _decode_v2(data: memoryview, kind: int, count: int) -> np.ndarray:
    symbols, counts, pos = tables.read_table_v2(data, 1, count)
    if kind == LANES_STREAM:
        return _lanes_decode(data, pos, symbols, quantize_counts(counts), count)
    if count > MAX_ANS_SYMBOLS:
        raise CorruptStream(f"ans stream claims {count} symbols, more than the kind allows")
    if (len(data) - pos) % 4 or len(data) == pos:
        raise CorruptStream("ans words cut short")
    model = constriction.stream.model.Categorical(counts.astype(np.float64) / float(counts.sum()), perfect=False)
    decoded = _ans_decode(np.frombuffer(data[pos:], dtype="<u4"), model, count)
    # constriction decodes garbage without complaint: the exact symbol counts are the check.
    if not np.array_equal(np.bincount(decoded, minlength=len(counts)), counts):
        raise CorruptStream("decoded symbols do not match the stream's symbol counts")
    return symbols[decoded]


def _trimmed(words: np.ndarray) -> bytes:
    """The words as bytes without the high zero bytes of the last one, the top of the coder's
    state (never zero itself: constriction writes no all-zero top word); decoding pads them back."""
    data = words.astype("<u4").tobytes()
    keep = len(data)
    while keep > max(0, len(data) - 3) and data[keep - 1] == 0:
        keep -= 1
    return data[:keep]


def _ans_model(freqs: np.ndarray, precision: int):
    return constriction.stream.model.Categorical(freqs.astype(np.float64) / float(1 << precision), perfect=False)


def _ans_decode(words: np.ndarray, model, count: int) -> np.ndarray:
    try:
        coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
        decoded = coder.decode(model, count)
        leftover = not coder.is_empty()
    except Exception as exc:  # constriction raises ValueError/AssertionError on invalid data
        raise CorruptStream(f"ans words do not decode ({exc})") from None
    if leftover:
        raise CorruptStream("ans words left over after decoding")
    return decoded


def _lanes_encode(flat: np.ndarray, freqs: np.ndarray, index: np.ndarray, lanes: int):
    """Interleaved rANS: symbol i goes to lane i % lanes. Returns (final states, word stream).

    The decoder reads words in step order and, within a step, in lane order; the encoder runs the
    steps backwards, so it collects each step's words and reverses the list of chunks at the end.
    """
    freq_by_index = freqs.astype(np.uint32)
    cum_by_index = np.concatenate([[0], np.cumsum(freq_by_index)[:-1]]).astype(np.uint32)
    codes = index.astype(np.uint8)[flat]
    n = flat.size
    steps = -(-n // lanes)
    state = np.full(lanes, _LOWER, dtype=np.uint32)
    chunks = []
    for step in range(steps - 1, -1, -1):
        row = codes[step * lanes : (step + 1) * lanes]
        x = state[: row.size]
        f = freq_by_index[row]
        emit = np.flatnonzero(x >= (f << np.uint32(32 - PRECISION)))
        chunks.append((x[emit] & np.uint32(0xFFFF)).astype(np.uint16))
        x[emit] >>= np.uint32(16)
        q = x // f
        x -= q * f
        x += (q << np.uint32(PRECISION)) + cum_by_index[row]
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    return state, words


def _lanes_decode(data: memoryview, pos: int, symbols: np.ndarray, freqs: np.ndarray, count: int) -> np.ndarray:
    if pos + 4 > len(data):
        raise CorruptStream("lane count cut short")
    lanes = int(np.frombuffer(data[pos : pos + 4], dtype="<u4")[0])
    pos += 4
    # The encoder never uses fewer lanes than this, so a forged stream cannot buy many slow steps.
    if not min(MIN_LANES, count, MAX_LANES) <= lanes <= MAX_LANES or -(-count // lanes) > MAX_LANE_STEPS + 1:
        raise CorruptStream(f"lane stream declares {lanes} lanes for {count} symbols")
    if pos + 4 * lanes > len(data) or (len(data) - pos - 4 * lanes) % 2:
        raise CorruptStream("lane states or words cut short")
    # int64 throughout: int64 slots index a table without a cast, the fastest numpy gather.
    state = lanes_state = np.frombuffer(data[pos : pos + 4 * lanes], dtype="<u4").astype(np.int64)
    words = np.frombuffer(data[pos + 4 * lanes :], dtype="<u2").astype(np.int64)
    if (state < _LOWER).any():
        raise CorruptStream("lane state out of range")
    # One table lookup per symbol: slot -> symbol, and slot -> (frequency << 32 | offset in its range).
    freq = freqs.astype(np.int64)
    symbol_of_slot = np.repeat(symbols, freq)
    offset_of_slot = np.arange(_TOTAL, dtype=np.int64) - np.repeat(np.cumsum(freq) - freq, freq)
    step_of_slot = (np.repeat(freq, freq) << 32) | offset_of_slot
    out = np.empty(count, dtype=np.uint8)
    slot, entry, scratch = (np.empty(lanes, dtype=np.int64) for _ in range(3))
    read = 0
    for start in range(0, count, lanes):
        if count - start < lanes:  # the last step may cover fewer lanes
            width = count - start
            state, slot, entry, scratch = state[:width], slot[:width], entry[:width], scratch[:width]
        np.bitwise_and(state, _TOTAL - 1, out=slot)
        np.take(symbol_of_slot, slot, out=out[start : start + len(slot)], mode="clip")
        np.take(step_of_slot, slot, out=entry, mode="clip")
        state >>= PRECISION
        state *= np.right_shift(entry, 32, out=scratch)
        state += np.bitwise_and(entry, 0xFFFFFFFF, out=scratch)
        refill = np.flatnonzero(state < _LOWER)
        if refill.size:
            if read + refill.size > len(words):
                raise CorruptStream("lane words run out before the stream ends")
            state[refill] = (state[refill] << 16) | words[read : read + refill.size]
            read += refill.size
    # Every lane started at _LOWER in the encoder, so every lane must end there.
    if read != len(words) or (lanes_state != _LOWER).any():
        raise CorruptStream("lane words do not end where the stream does")
    return out
