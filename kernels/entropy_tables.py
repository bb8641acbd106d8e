"""Symbol tables: how a coded stream tells its decoder which symbols occur and how often.

Version 3 (written) is bit-packed and holds what the decoder needs, no more: the symbol set and
*quantized* frequencies. The coder models the stream with frequencies summing to 2^P, and P is
chosen per stream to minimize table bits + coded bits: a short stream cannot afford 14-bit
counts (a table of exact counts costs (k-1)·log2 n bits, about twice the (k-1)/2·log2 n of
model cost worth paying), a long one loses more to coarse frequencies than the bits it saves.
Version 2 (read only) held exact counts as LEB128 varints after a byte symbol list or bitmap.

Readers validate every field against the bytes present and the format's caps before use and
raise ``CorruptStream``; the work per table is bounded (at most 256 symbols, prefixes <= 32 bits).
"""

from __future__ import annotations

import functools
import heapq
import math

import numpy as np

# The lane coder's precision: frequencies are scaled to sum to 2^16 before lane coding.
PRECISION = 16
_TOTAL = 1 << PRECISION
# Highest frequency precision a table may use: constriction's Categorical quantizes to 24 bits.
MAX_TABLE_PRECISION = 24
# The frequency code's parameter is a 4-bit field: Golomb orders and integer widths up to 15.
_MAX_PARAMETER = 15
# Exp-Golomb prefixes longer than this cannot come from a valid table (values stay below 2^25).
_MAX_PREFIX = 32


class CorruptStream(ValueError):
    """The bytes are not a stream this module wrote (the container turns this into an InputError)."""


def entropy_of_counts(counts: np.ndarray) -> float:
    """Order-0 entropy, in bits for the whole stream, of symbols occurring ``counts`` times."""
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    return float(-(counts * np.log2(counts / total)).sum())


def quantize_counts(counts: np.ndarray, total: int = _TOTAL) -> np.ndarray:
    """Integer frequencies summing to ``total``, each >= 1, close to proportional (deterministic)."""
    counts = counts.astype(np.int64)
    n = int(counts.sum())
    freqs = np.maximum(1, counts * total // n)
    excess = int(freqs.sum()) - total
    order = np.argsort(-counts, kind="stable")
    if excess < 0:  # rounding down left room: give it to the most frequent symbol
        freqs[order[0]] -= excess
    else:  # symbols bumped up to 1 overdrew: take it back from the most frequent ones
        for i in order:
            take = min(excess, int(freqs[i]) - 1)
            freqs[i] -= take
            excess -= take
            if excess == 0:
                break
    return freqs


def fit_frequencies(counts: np.ndarray, total: int) -> np.ndarray:
    """Frequencies summing to ``total``, each >= 1, that code the counts in the fewest bits
    (Σ count_i · log2(total / f_i) is separable and convex in the f_i, so moving single units
    where they cost least / gain most reaches the optimum): rounded to nearest, the surplus or
    shortfall settled unit by unit, then units moved while that still saves bits. About 40 % less
    loss than ``quantize_counts`` at coarse precision. Encoder side only: version 3 tables carry
    the frequencies, so no decoder ever recomputes them."""
    weights = counts.astype(np.float64)
    freqs = np.maximum(1, np.rint(weights * total / weights.sum()).astype(np.int64)).tolist()
    weights = weights.tolist()

    def loss_of_taking(i):  # bits lost by taking one unit from symbol i
        return weights[i] * math.log2(freqs[i] / (freqs[i] - 1)) if freqs[i] > 1 else math.inf

    def gain_of_giving(i):  # bits saved by giving one unit to symbol i
        return weights[i] * math.log2((freqs[i] + 1) / freqs[i])

    surplus = sum(freqs) - total
    if surplus:
        sign = 1 if surplus > 0 else -1
        f, w = np.array(freqs, dtype=np.float64), np.array(weights)
        with np.errstate(divide="ignore"):
            keys = np.where(f > 1, w * np.log2(f / (f - 1)), np.inf) if sign > 0 else -w * np.log2((f + 1) / f)
        heap = list(zip(keys.tolist(), range(len(freqs))))
        heapq.heapify(heap)
        for _ in range(abs(surplus)):
            _, i = heapq.heappop(heap)
            freqs[i] -= sign
            heapq.heappush(heap, (loss_of_taking(i) if sign > 0 else -gain_of_giving(i), i))
    freqs, weights = np.array(freqs, dtype=np.int64), np.array(weights)
    for _ in range(4 * len(freqs)):  # bounded: each move saves bits, and a few suffice
        gains = weights * np.log2((freqs + 1) / freqs)
        losses = np.where(freqs > 1, weights * np.log2(freqs / np.maximum(freqs - 1, 1)), np.inf)
        give = int(np.argmax(gains))
        losses[give] = np.inf
        take = int(np.argmin(losses))
        if gains[give] <= losses[take] + 1e-9:
            break
        freqs[give] += 1
        freqs[take] -= 1
    return freqs


# ---------------------------------------------------------------------------------------------
# Bits, least significant first
# ---------------------------------------------------------------------------------------------


class BitWriter:
    def __init__(self, value: int = 0, length: int = 0):
        self.value, self.length = value, length

    def write(self, value: int, width: int) -> None:
        self.value |= value << self.length
        self.length += width

    def write_golomb(self, value: int, order: int) -> None:
        """Exp-Golomb code of ``value`` >= 0: zeros, a one, then the low bits (2·L - 1 - order bits)."""
        shifted = value + (1 << order)
        low_bits = shifted.bit_length() - 1
        self.write(1 << (low_bits - order), low_bits - order + 1)  # the zeros, then the terminating one
        self.write(shifted - (1 << low_bits), low_bits)

    def to_bytes(self) -> bytes:
        return self.value.to_bytes(-(-self.length // 8), "little")


def golomb_bits(values: np.ndarray, order: int) -> int:
    """Bits ``write_golomb`` takes for all ``values`` at ``order``."""
    return int(_golomb_costs(values)[order])


def _golomb_costs(values: np.ndarray) -> np.ndarray:
    """Bits of all ``values`` at every order 0.._MAX_PARAMETER (one vectorized pass)."""
    orders = np.arange(_MAX_PARAMETER + 1, dtype=np.int64)
    shifted = values.astype(np.int64)[None, :] + (np.int64(1) << orders)[:, None]
    lengths = np.frexp(shifted.astype(np.float64))[1].astype(np.int64) - 1  # exact floor(log2) below 2^53
    return (2 * lengths).sum(axis=1) + len(values) * (1 - orders)


class BitReader:
    def __init__(self, data: memoryview, start_bit: int):
        # A valid table is under 1.7 KB (256 frequencies below 2^24: <= 49 bits each): read no further.
        self.end = min(len(data), 2048) * 8
        self.value = int.from_bytes(data[:2048], "little")
        self.pos = start_bit

    def read(self, width: int) -> int:
        if self.pos + width > self.end:
            raise CorruptStream("symbol table cut short")
        out = (self.value >> self.pos) & ((1 << width) - 1)
        self.pos += width
        return out

    def read_golomb(self, order: int) -> int:
        window = (self.value >> self.pos) & ((1 << (_MAX_PREFIX + 1)) - 1)
        if window == 0:
            raise CorruptStream("symbol table holds an overlong code")
        zeros = (window & -window).bit_length() - 1
        self.pos += zeros + 1
        low_bits = zeros + order
        return (1 << low_bits) + self.read(low_bits) - (1 << order)

    def end_byte(self) -> int:
        """Byte after the table; its padding bits must be zero (one valid encoding per table)."""
        end = -(-self.pos // 8)
        if self.pos > self.end or self.value >> self.pos & ((1 << (8 * end - self.pos)) - 1):
            raise CorruptStream("symbol table padding is not zero")
        return end


# ---------------------------------------------------------------------------------------------
# Version 3: bit-packed symbol set + quantized frequencies
# ---------------------------------------------------------------------------------------------
#
#   precision P | symbol set | implied index j | code c (1 bit) | parameter w (4 bits)
#   | the k-1 frequencies other than f_j, each as (f - 1) in code c:
#   0 = Exp-Golomb of order w (frequencies spread over magnitudes: exponent bytes),
#   1 = w-bit integers (frequencies of one magnitude: k-means indices)
#
# P is written as its distance d from a guess the decoder makes from the stream length n
# (bit_length(n) // 2 + 2, the usual optimum within a few bits), zigzag-mapped (2d, or -2d-1 when
# negative) and Exp-Golomb coded at order 0. f_j = 2^P - (sum of the others): the largest
# frequency costs nothing; j is one bit 0 when it is the first symbol (the zero of sparse and
# clustered data), else a bit 1 and ceil(log2 k) bits. Symbol set: one bit chooses a bitmap (the
# largest symbol m as Exp-Golomb of order 3, then m presence bits for 0..m-1: a nibble alphabet in
# <= 22 bits) or gaps (8 bits k-1, 8 bits first symbol, then k-1 gaps - 1 as Exp-Golomb order 0:
# two clusters of exponent bytes in a few bytes). Every field is what the encoder measured to be
# cheapest on the digits models' streams, where the fixed fields were a third of the table.


def _set_bits(symbols: np.ndarray) -> tuple[int, int]:
    """(mode, bits) of the cheaper symbol-set coding; the bitmap wins ties."""
    bitmap = 1 + golomb_bits(symbols[-1:], 3) + int(symbols[-1])
    gaps = 1 + 16 + golomb_bits(np.diff(symbols.astype(np.int64)) - 1, 0)
    return (0, bitmap) if bitmap <= gaps else (1, gaps)


def _guessed_precision(count: int) -> int:
    return count.bit_length() // 2 + 2


def _zigzag(value: int) -> int:
    return 2 * value if value >= 0 else -2 * value - 1


def _precision_bits(precision: int, count: int) -> int:
    return golomb_bits(np.array([_zigzag(precision - _guessed_precision(count))]), 0)


def _frequency_bits(freqs: np.ndarray) -> tuple[int, int, int, int]:
    """(implied index, code, its parameter, bits of the implied index and frequency fields) coding
    ``freqs`` most cheaply (Exp-Golomb on ties, the lowest order among equals)."""
    implied = int(np.argmax(freqs))
    values = np.delete(freqs, implied) - 1
    costs = _golomb_costs(values)
    order = int(np.argmin(costs))
    width = int(values.max()).bit_length()
    code, parameter, bits = (0, order, int(costs[order]))
    if width <= _MAX_PARAMETER and width * len(values) < bits:
        code, parameter, bits = 1, width, width * len(values)
    implied_bits = 1 if implied == 0 else 1 + (len(freqs) - 1).bit_length()
    return implied, code, parameter, bits + implied_bits + 1 + 4


def choose_table(counts: np.ndarray, max_precision: int) -> tuple[int, np.ndarray, float]:
    """(precision P, frequencies summing to 2^P, bits the symbols will take under them) for the P
    that minimizes frequency-table bits + coded bits (the lowest P on ties: deterministic).

    ``counts`` are the nonzero counts of the present symbols, in symbol order. The payload coder
    sizes every candidate stream before coding the winner, so the answer is cached.
    """
    precision, freqs, coded = _choose_table(np.ascontiguousarray(counts, dtype=np.int64).tobytes(), max_precision)
    return precision, freqs.copy(), coded


@functools.lru_cache(maxsize=64)
def _choose_table(key: bytes, max_precision: int) -> tuple[int, np.ndarray, float]:
    counts = np.frombuffer(key, dtype=np.int64)
    n = int(counts.sum())
    best, best_total = None, float("inf")
    for precision in range(max(1, (len(counts) - 1).bit_length()), max_precision + 1):
        freqs = fit_frequencies(counts, 1 << precision)
        coded = float((counts * (precision - np.log2(freqs))).sum())
        total = coded + _frequency_bits(freqs)[3] + _precision_bits(precision, n)
        if total < best_total - 1e-6:
            best, best_total = (precision, freqs, coded), total
        # Table bits grow linearly with P while the loss to coarse frequencies shrinks ~4x per bit:
        # past the minimum the total only grows (three steps of margin for rounding wiggles).
        if (1 << precision) >= 4 * n or precision >= best[0] + 3:
            break
    return best


def write_table(kind: int, symbols: np.ndarray, freqs: np.ndarray, precision: int, count: int) -> bytes:
    """The kind in bits 0-1 of the first byte, then the version 3 table of a stream of ``count``
    symbols, padded to a byte."""
    out = BitWriter(kind, 2)
    out.write_golomb(_zigzag(precision - _guessed_precision(count)), 0)
    mode, _ = _set_bits(symbols)
    out.write(mode, 1)
    if mode == 0:
        out.write_golomb(int(symbols[-1]), 3)
        present = np.zeros(int(symbols[-1]), dtype=np.uint8)
        present[symbols[:-1]] = 1
        out.write(int.from_bytes(np.packbits(present, bitorder="little").tobytes(), "little"), len(present))
    else:
        out.write(len(symbols) - 1, 8)
        out.write(int(symbols[0]), 8)
        for gap in np.diff(symbols.astype(np.int64)) - 1:
            out.write_golomb(int(gap), 0)
    implied, code, parameter, _ = _frequency_bits(freqs)
    if implied == 0:
        out.write(0, 1)
    else:
        out.write(1, 1)
        out.write(implied, (len(symbols) - 1).bit_length())
    out.write(code, 1)
    out.write(parameter, 4)
    for i, freq in enumerate(freqs):
        if i != implied and code == 0:
            out.write_golomb(int(freq) - 1, parameter)
        elif i != implied:
            out.write(int(freq) - 1, parameter)
    return out.to_bytes()


def table_bytes(symbols: np.ndarray, freqs: np.ndarray, precision: int, count: int) -> int:
    """Size of ``write_table``'s output, kind bits included."""
    return -(-(2 + _precision_bits(precision, count) + _set_bits(symbols)[1] + _frequency_bits(freqs)[3]) // 8)


def read_table(data: memoryview, max_precision: int, count: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Parse the version 3 table of a stream of ``count`` symbols, after the kind bits.
    Returns (symbols, frequencies, P, end byte)."""
    bits = BitReader(data, 2)
    zigzag = bits.read_golomb(0)
    precision = _guessed_precision(count) + (zigzag // 2 if zigzag % 2 == 0 else -(zigzag + 1) // 2)
    if not 1 <= precision <= max_precision:
        raise CorruptStream(f"symbol table precision {precision} is outside 1..{max_precision}")
    if bits.read(1) == 0:
        top = bits.read_golomb(3)
        if top > 255:
            raise CorruptStream("symbol table lists a symbol above 255")
        present = bits.read(top)
        symbols = np.array([s for s in range(top) if present >> s & 1] + [top], dtype=np.uint8)
    else:
        k = bits.read(8) + 1
        values = [bits.read(8)]
        for _ in range(k - 1):
            values.append(values[-1] + 1 + bits.read_golomb(0))
            if values[-1] > 255:
                raise CorruptStream("symbol table lists a symbol above 255")
        symbols = np.array(values, dtype=np.uint8)
    k = len(symbols)
    if k < 2 or (1 << precision) < k:
        raise CorruptStream(f"symbol table holds {k} symbols at precision {precision}")
    implied = bits.read((k - 1).bit_length()) if bits.read(1) else 0
    code = bits.read(1)
    parameter = bits.read(4)
    if implied >= k:
        raise CorruptStream("symbol table's implied frequency is out of range")
    freqs = np.zeros(k, dtype=np.int64)
    for i in range(k):
        if i != implied:
            freqs[i] = (bits.read(parameter) if code else bits.read_golomb(parameter)) + 1
    rest = (1 << precision) - int(freqs.sum())
    if rest < 1:
        raise CorruptStream("symbol frequencies exceed their total")
    freqs[implied] = rest
    return symbols, freqs, precision, bits.end_byte()


# ---------------------------------------------------------------------------------------------
# Version 2 (read only): k-1 u8 | k symbols (list when k <= 32, else 32-byte bitmap) | k LEB128 counts
# ---------------------------------------------------------------------------------------------


def read_table_v2(data: memoryview, pos: int, count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse a version 2 table at ``pos``; its counts must add up to ``count``. Returns (symbols, counts, end)."""
    if pos >= len(data):
        raise CorruptStream("symbol table cut short")
    k = data[pos] + 1
    pos += 1
    width = min(k, 32)
    if k < 2 or pos + width > len(data):
        raise CorruptStream("symbol table cut short")
    if k <= 32:
        symbols = np.frombuffer(data[pos : pos + k], dtype=np.uint8)
        if (np.diff(symbols.astype(np.int16)) <= 0).any():
            raise CorruptStream("symbol table is not in increasing order")
    else:
        symbols = np.flatnonzero(np.unpackbits(np.frombuffer(data[pos : pos + 32], np.uint8), bitorder="little"))
        if symbols.size != k:
            raise CorruptStream("symbol bitmap does not hold the declared number of symbols")
        symbols = symbols.astype(np.uint8)
    pos += width
    counts = np.zeros(k, dtype=np.int64)
    for i in range(k):  # at most 256 varints of at most 5 bytes: bounded work
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 28:
                raise CorruptStream("symbol counts malformed")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        counts[i] = value
    if (counts == 0).any() or int(counts.sum()) != count:
        raise CorruptStream("symbol table does not describe the stream")
    return symbols, counts, pos
