"""The version 3 symbol table and stream layout: exact round trips on small and adversarial
alphabets, the overhead over n·H it promises, hostile tables rejected with CorruptStream only,
and version 2 streams and artifacts (fixtures made by the version 2 coder) still decoded exactly."""

import hashlib
import itertools
import zlib
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpress.compressors.encode import mpk
from modelpress.compressors.errors import InputError
from modelpress.kernels import entropy, entropy_streams, entropy_tables

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mpk_v2"


def kind(stream: bytes) -> str:
    return entropy.STREAM_KINDS[stream[0] if stream[0] < 2 else stream[0] & 3]


def round_trip(symbols: np.ndarray, coder: str = "ans") -> bytes:
    patch = mock.patch.multiple(entropy_streams, _use_ans=lambda n, bits: False, MIN_LANES=8)
    with patch if coder == "lanes" else nullcontext():
        coded = entropy.encode_stream(symbols)
        assert np.array_equal(entropy.decode_stream(coded, symbols.size), symbols)
        assert entropy.encode_stream(symbols) == coded
    return coded


def table_round_trip(symbols: np.ndarray, counts: np.ndarray, max_precision: int = 24):
    precision, freqs, _ = entropy_tables.choose_table(counts, max_precision)
    count = int(counts.sum())
    assert freqs.sum() == 1 << precision and (freqs >= 1).all() and precision <= max_precision
    table = entropy_tables.write_table(entropy.ANS_STREAM, symbols, freqs, precision, count)
    assert len(table) == entropy_tables.table_bytes(symbols, freqs, precision, count)
    read = entropy_tables.read_table(memoryview(table + b"\x55" * 8), max_precision, count)
    assert np.array_equal(read[0], symbols) and np.array_equal(read[1], freqs)
    assert read[2] == precision and read[3] == len(table)
    return table, precision


# --- tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["two", "nibbles", "all_256", "ones", "huge_skew", "clusters", "top_symbols"])
def test_table_round_trips_on_adversarial_alphabets(case):
    rng = np.random.default_rng(1)
    symbols, counts = {
        "two": ([0, 255], [1, 1]),
        "nibbles": (list(range(16)), rng.integers(1, 2000, 16)),
        "all_256": (list(range(256)), rng.integers(1, 50, 256)),
        "ones": (list(range(0, 200, 7)), [1] * 29),
        "huge_skew": ([3, 4], [10**7, 1]),
        "clusters": (list(range(56, 64)) + list(range(184, 192)), rng.integers(1, 10**5, 16)),
        "top_symbols": ([254, 255], [5, 10**6]),
    }[case]
    table, _ = table_round_trip(np.array(symbols, np.uint8), np.array(counts, np.int64))
    if case == "nibbles":
        assert len(table) <= 2 + 16 * 13 // 8 + 3  # 16-bit bitmap, ~13 bits per frequency
    if case == "two":
        # kind 2 + precision 5 + gap list 1 + 16 + 15 (the gap 254) + implied 1 + code 1 + parameter 4 + one frequency 1
        assert len(table) == 6


@FAST
@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=256), st.integers(0, 2**32 - 1),
       st.sampled_from([16, 24]))
def test_table_round_trip_any_counts(counts, seed, max_precision):
    symbols = np.sort(np.random.default_rng(seed).choice(256, len(counts), replace=False)).astype(np.uint8)
    table_round_trip(symbols, np.array(counts, np.int64), max_precision)


def test_fitted_frequencies_never_cost_more_than_proportional_ones():
    rng = np.random.default_rng(8)
    for _ in range(200):
        k = int(rng.integers(2, 40))
        counts = np.maximum(1, rng.multinomial(int(rng.integers(100, 10**6)), rng.dirichlet(np.full(k, 0.3))))
        for precision in (max(1, (k - 1).bit_length()), 10, 16):
            fitted = entropy_tables.fit_frequencies(counts, 1 << precision)
            plain = entropy_tables.quantize_counts(counts, 1 << precision)
            assert fitted.sum() == 1 << precision and (fitted >= 1).all()
            assert (counts * np.log2(plain / fitted)).sum() <= 1e-6  # bits saved, never lost


def test_precision_follows_the_stream_length():
    """Short streams get coarse frequencies (cheap tables), long ones fine ones (little loss)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6))
    chosen = [entropy_tables.choose_table(np.maximum(1, rng.multinomial(n, p)).astype(np.int64), 24)[0]
              for n in (300, 20_000, 4_000_000)]
    assert chosen == [6, 10, 13]


# --- streams ----------------------------------------------------------------------------------

ALPHABETS = {
    "one_symbol": lambda rng: np.full(5000, 9, np.uint8),
    "two_symbols": lambda rng: rng.integers(0, 2, 5000).astype(np.uint8) * 255,
    "all_256": lambda rng: np.concatenate([np.arange(256), rng.integers(0, 256, 20_000)]).astype(np.uint8),
    "counts_of_one": lambda rng: np.concatenate([np.zeros(3000), np.arange(1, 200)]).astype(np.uint8),
    "huge_skew": lambda rng: np.concatenate([np.full(300_000, 4), [200]]).astype(np.uint8),
    "last_symbol_rare": lambda rng: np.concatenate([np.zeros(5000), [7]]).astype(np.uint8),
}


@pytest.mark.parametrize("case", sorted(ALPHABETS))
@pytest.mark.parametrize("coder", ["ans", "lanes"])
def test_stream_round_trips_on_small_and_adversarial_alphabets(case, coder):
    symbols = ALPHABETS[case](np.random.default_rng(2))
    coded = round_trip(symbols, coder)
    bound = entropy.entropy_bits(symbols) / 8
    if case == "one_symbol":
        assert kind(coded) == "constant" and len(coded) == 2
    elif case in ("huge_skew", "last_symbol_rare") and coder == "ans":
        assert len(coded) <= bound + 10  # one rare symbol: ~log2(n) bits of table and payload


def test_ans_words_are_trimmed_to_bytes():
    """The top word of constriction's state loses its high zero bytes; decoding pads them back."""
    rng = np.random.default_rng(3)
    lengths = set()
    for n in range(200, 260):
        symbols = np.where(rng.random(n) < 0.8, 0, rng.integers(1, 6, n)).astype(np.uint8)
        coded = round_trip(symbols)
        assert kind(coded) == "ans" and coded[-1] != 0
        lengths.add(len(coded) % 4)
    assert len(lengths) == 4  # not a whole number of words: byte-trimmed


def test_nine_symbol_stream_overhead_over_entropy():
    """10K symbols over 9 values: coded <= 1.01·nH + 18 bytes, whatever their distribution.

    Where the constant comes from (bits): kind 2 + precision 1-5 + bitmap set 1 + 6 + 8 + implied
    index 1-5 + code 1 + parameter 4 = 24-32; 8 frequencies at the chosen precision P (8-13
    here), Golomb coded at ~P + 2 bits = ~100; loss to P-bit frequencies ~10; constriction's
    flush: its 24-bit precision less the last symbols' information, then byte-trimmed: <= 31.
    About 170 bits = 21 bytes in the worst case; 300 random distributions measured at most 16.6
    bytes, median 12.5. (Version 2: 1 + 1 + 9 + ~18 varint bytes + a 4-byte-rounded flush: ~35.)
    """
    rng = np.random.default_rng(0)
    for trial in range(60):
        probabilities = rng.dirichlet(np.full(9, rng.uniform(0.05, 5)))
        symbols = rng.choice(9, 10_000, p=probabilities).astype(np.uint8)
        coded = round_trip(symbols)
        bound = entropy.entropy_bits(symbols) / 8
        if kind(coded) == "ans":
            assert len(coded) <= 1.01 * bound + 18, (trial, len(coded), bound)
    # k-means indices of a 90 %-pruned layer: at ~1.3 KB of entropy, within 1 % with everything counted
    symbols = np.where(rng.random(10_000) < 0.85, 0, rng.integers(1, 9, 10_000)).astype(np.uint8)
    bound = entropy.entropy_bits(symbols) / 8
    assert len(round_trip(symbols)) <= 1.01 * bound


def test_estimate_matches_the_coded_size():
    rng = np.random.default_rng(4)
    for n, alphabet, zeros in ((300, 10, 0.5), (20_000, 7, 0.85), (100_000, 60, 0.3), (2_000_000, 30, 0.6)):
        symbols = np.where(rng.random(n) < zeros, 0, rng.integers(1, alphabet, n)).astype(np.uint8)
        estimate, _ = entropy.estimate_stream(symbols)
        assert abs(estimate - len(entropy.encode_stream(symbols))) <= 4


# --- hostile tables ---------------------------------------------------------------------------


def test_damaged_tables_raise_corrupt_stream_only():
    rng = np.random.default_rng(5)
    sources = [np.where(rng.random(3000) < 0.7, 0, rng.integers(1, 16, 3000)).astype(np.uint8),
               rng.choice(np.array([3, 70, 71, 72, 200], np.uint8), 3000)]
    detected = trials = 0
    for coder in ("ans", "lanes"):
        for symbols in sources:
            coded = round_trip(symbols, coder)
            table_end = entropy_tables.read_table(memoryview(coded), 24, symbols.size)[3]
            for position in range(table_end + 1):
                for bit in range(8):
                    damaged = bytearray(coded)
                    damaged[position] ^= 1 << bit
                    trials += 1
                    try:
                        decoded = entropy.decode_stream(bytes(damaged), symbols.size)
                    except entropy.CorruptStream:
                        detected += 1
                        continue
                    assert decoded.size == symbols.size
    assert detected > 0.8 * trials


def spec_table(kind, count, precision, symbols, freqs, implied, code, parameter, bitmap=True) -> bytes:
    """The version 3 table written field by field as docs/mpk-format.md describes it, with no help
    from the encoder's choices (``freqs`` without the implied one, in index order)."""
    bits = entropy_tables.BitWriter(kind, 2)
    distance = precision - (count.bit_length() // 2 + 2)
    bits.write_golomb(2 * distance if distance >= 0 else -2 * distance - 1, 0)
    bits.write(0 if bitmap else 1, 1)
    if bitmap:
        bits.write_golomb(symbols[-1], 3)
        bits.write(sum(1 << s for s in symbols[:-1]), symbols[-1])
    else:
        bits.write(len(symbols) - 1, 8)
        bits.write(symbols[0], 8)
        for previous, symbol in itertools.pairwise(symbols):
            bits.write_golomb(symbol - previous - 1, 0)
    if implied == 0:
        bits.write(0, 1)
    else:
        bits.write(1, 1)
        bits.write(implied, (len(symbols) - 1).bit_length())
    bits.write(code, 1)
    bits.write(parameter, 4)
    for freq in freqs:
        if code:
            bits.write(freq - 1, parameter)
        else:
            bits.write_golomb(freq - 1, parameter)
    return bits.to_bytes()


def test_encoder_writes_the_documented_layout():
    symbols = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.uint8)  # a 3-bit k-means alphabet, zero first
    counts = np.array([6800, 170, 160, 175, 165, 180, 170, 180])
    precision, freqs, _ = entropy_tables.choose_table(counts, 24)
    table = entropy_tables.write_table(entropy.ANS_STREAM, symbols, freqs, precision, int(counts.sum()))
    width = int(freqs[1:].max() - 1).bit_length()
    assert table == spec_table(entropy.ANS_STREAM, int(counts.sum()), precision, list(range(8)),
                               [int(f) for f in freqs[1:]], 0, 1, width)
    assert len(table) <= 7  # 2 + 1 + 1 + 4 + 7 + 1 + 1 + 4 + 7 x 3 bits at P = 8
    exponents = np.array([56, 57, 58, 59, 60, 61, 62, 63, 184, 185, 186, 187, 188, 189, 190, 191], np.uint8)
    counts = np.array([3, 40, 300, 2000, 9000, 20000, 4000, 2, 5, 38, 310, 2100, 8800, 19500, 4100, 1])
    precision, freqs, _ = entropy_tables.choose_table(counts, 24)
    table = entropy_tables.write_table(entropy.ANS_STREAM, exponents, freqs, precision, int(counts.sum()))
    implied = int(np.argmax(freqs))
    others = [int(f) for i, f in enumerate(freqs) if i != implied]
    orders = [len(spec_table(2, int(counts.sum()), precision, exponents.tolist(), others, implied, 0, g, False))
              for g in range(16)]
    best = int(np.argmin(orders))
    assert table == spec_table(entropy.ANS_STREAM, int(counts.sum()), precision, exponents.tolist(), others,
                               implied, 0, best, False)


@pytest.mark.parametrize("forge", ["precision_0", "precision_17_lanes", "overlong_golomb", "zeroed_table",
                                   "frequencies_overflow", "padding", "untrimmed", "kind_bits", "symbol_above_255"])
def test_forged_tables(forge):
    symbols = np.where(np.random.default_rng(6).random(4000) < 0.8, 0, 5).astype(np.uint8)
    coded = bytearray(round_trip(symbols))
    count = symbols.size
    ans, lanes = entropy.ANS_STREAM, entropy.LANES_STREAM
    if forge == "precision_0":
        coded = bytearray(spec_table(ans, count, 0, [0, 5], [1], 0, 0, 0) + b"\x01")
    elif forge == "precision_17_lanes":
        coded = bytearray(spec_table(lanes, count, 17, [0, 5], [1], 0, 0, 0) + bytes(4100))
    elif forge == "overlong_golomb":  # a gap list whose first gap has a 40-zero prefix
        bits = entropy_tables.BitWriter(ans, 2)
        for value, width in ((1, 1), (1, 1), (1, 8), (0, 8), (0, 40), (1, 1)):  # P = guess, gap list, k 2
            bits.write(value, width)
        coded = bytearray(bits.to_bytes() + bytes(8))
    elif forge == "zeroed_table":
        coded = coded[:1] + bytes(40)
    elif forge == "frequencies_overflow":  # at P = 3 the written frequency 8 leaves nothing for the other
        coded = bytearray(spec_table(ans, count, 3, [0, 5], [8], 0, 1, 3) + b"\x01")
    elif forge == "padding":
        coded = bytearray(spec_table(ans, count, 3, [0, 5], [2], 0, 1, 1))
        coded[-1] |= 0x80
        coded += b"\x01"
    elif forge == "untrimmed":
        coded += b"\x00"
    elif forge == "symbol_above_255":
        bits = entropy_tables.BitWriter(ans, 2)
        bits.write(1, 1)  # P = the guess
        bits.write(0, 1)  # bitmap
        bits.write_golomb(300, 3)
        coded = bytearray(bits.to_bytes() + bytes(60))
    else:
        coded[0] = 4  # kind bits 0 with table bits set: no such stream
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_stream(bytes(coded), count)
    if forge in ("precision_0", "frequencies_overflow", "padding"):  # the same tables, well formed, decode
        valid = spec_table(ans, count, 3, [0, 5], [2], 0, 1, 1)
        assert entropy_tables.read_table(memoryview(valid), 24, count)[1].tolist() == [6, 2]


def test_sparse_run_count_is_a_canonical_varint():
    raw = np.where(np.arange(40_000) % 97 == 0, 3, 0).astype(np.uint8).tobytes()
    coded = entropy.encode_payload(raw, 8)
    assert coded.method == entropy.SPARSE_RUNS
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), 8) == raw
    head = bytes(coded.streams[0][:2])
    assert head[0] & 0x80 and not head[1] & 0x80  # 414 run symbols: a two-byte varint
    padded = [bytes([head[0], head[1] | 0x80, 0]) + bytes(coded.streams[0][2:])] + coded.streams[1:]
    with pytest.raises(entropy.CorruptStream, match="redundant"):
        entropy.decode_payload(coded.method, padded, len(raw), 8)
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_payload(coded.method, coded.streams, len(raw), 8, version=2)  # v2 wants a u64 there
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_payload(coded.method, coded.streams, len(raw), 8, version=4)


# --- version 2 still decodes ------------------------------------------------------------------
# tests/fixtures/mpk_v2/ was written by the version 2 coder (commit 84f037f) from the model and the
# stream below: model.mpk holds byte-planes, sparse-runs, sparse-bitmap, nibbles, bytes (ans, raw
# and constant streams), zlib and raw payloads; lanes_stream.bin is a 1024-lane stream (the fewest a
# reader accepts), ans_stream.bin the same symbols as one constriction stack.

V2_MODEL_SHA256 = "06a6792a929ec68f2584b1856b49765eb4f57e72d2479733a488f8e33aad32b6"


def v2_symbols() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.where(rng.random(5000) < 0.6, 3, rng.integers(0, 40, 5000)).astype(np.uint8)


def test_version_2_artifact_decodes_byte_for_byte():
    artifact = (FIXTURES / "model.mpk").read_bytes()
    onnx_bytes = mpk.unpack(artifact)  # checks the SHA-256 recorded at encode time
    assert hashlib.sha256(onnx_bytes).hexdigest() == V2_MODEL_SHA256
    info = mpk.describe(artifact)
    assert info["format_version"] == 2
    assert {t["method"] for t in info["tensors"]} >= {"byte-planes", "sparse-runs", "sparse-bitmap", "nibbles",
                                                      "bytes", "zlib", "raw"}
    repacked, _ = mpk.pack(onnx_bytes)
    assert mpk.describe(repacked)["format_version"] == mpk.VERSION == entropy.STREAM_VERSION == 3
    assert mpk.READABLE_VERSIONS == entropy.READABLE_VERSIONS == (2, 3)
    assert mpk.unpack(repacked) == onnx_bytes and len(repacked) < len(artifact)


def test_version_2_artifact_damage_is_an_input_error():
    artifact = (FIXTURES / "model.mpk").read_bytes()
    header = mpk._HEADER.size
    for position in range(header, len(artifact) - 4, 97):
        damaged = bytearray(artifact)
        damaged[position] ^= 0x10
        with pytest.raises(InputError):
            mpk.unpack(bytes(damaged))


@pytest.mark.parametrize("name", ["lanes_stream.bin", "ans_stream.bin"])
def test_version_2_streams_decode_exactly(name):
    data = (FIXTURES / name).read_bytes()
    symbols = v2_symbols()
    assert np.array_equal(entropy.decode_stream(data, symbols.size, version=2), symbols)
    with pytest.raises(entropy.CorruptStream):  # read as version 3 the same bytes are no valid stream
        entropy.decode_stream(data, symbols.size)
    assert len(round_trip(symbols)) < len(data)


def test_a_wrong_version_field_is_an_error_never_wrong_bytes():
    """The header's version picks the stream layout: a v2 artifact relabelled 3, or a v3 one
    relabelled 2, must fail (stream checks or the SHA-256), never decode to other bytes."""
    v2 = (FIXTURES / "model.mpk").read_bytes()
    v3, _ = mpk.pack(mpk.unpack(v2))
    for artifact, version in ((v2, 3), (v3, 2)):
        fields = list(mpk._HEADER.unpack_from(artifact))
        fields[1] = version
        body = mpk._HEADER.pack(*fields) + artifact[mpk._HEADER.size : -4]
        with pytest.raises(InputError):
            mpk.unpack(body + zlib.crc32(body).to_bytes(4, "little"))
