"""Entropy coder kernels: exact round trips on any input, sizes near the order-0 entropy, and bad
streams rejected with CorruptStream only."""

from contextlib import contextmanager, nullcontext
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelpress.kernels import entropy, entropy_streams, entropy_tables

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def lanes_everywhere(min_lanes: int):
    """Force the numpy lane coder (normally only for streams past ~1 MB) with few lanes, so small
    hypothesis inputs exercise it over many steps and ragged last steps."""
    with mock.patch.object(entropy_streams, "_use_ans", lambda n, bits: False), \
         mock.patch.object(entropy_streams, "MIN_LANES", min_lanes):
        yield


def kind(stream: bytes) -> str:
    return entropy.STREAM_KINDS[stream[0] if stream[0] < 2 else stream[0] & 3]  # v3: 2 kind bits, then the table


def skewed(rng, n, alphabet, zero_share):
    return np.where(rng.random(n) < zero_share, 0, rng.integers(0, alphabet, n)).astype(np.uint8)


# --- streams -----------------------------------------------------------------------------------


@FAST
@given(arrays(np.uint8, st.integers(0, 3000)))
def test_stream_round_trip_any_bytes(symbols):
    coded = entropy.encode_stream(symbols)
    assert np.array_equal(entropy.decode_stream(coded, symbols.size), symbols)
    assert entropy.encode_stream(symbols) == coded  # deterministic


@FAST
@given(st.integers(1, 30_000), st.integers(1, 256), st.floats(0.0, 0.999), st.integers(0, 2**32 - 1),
       st.sampled_from([1, 3, 64]))
def test_lane_coder_round_trip(n, alphabet, zero_share, seed, min_lanes):
    symbols = skewed(np.random.default_rng(seed), n, alphabet, zero_share)
    with lanes_everywhere(min_lanes):
        coded = entropy.encode_stream(symbols)
        assert np.array_equal(entropy.decode_stream(coded, n), symbols)


@FAST
@given(st.integers(1, 50_000), st.integers(1, 256), st.floats(0.0, 0.999), st.integers(0, 2**32 - 1))
def test_ans_coder_round_trip_skewed(n, alphabet, zero_share, seed):
    symbols = skewed(np.random.default_rng(seed), n, alphabet, zero_share)
    assert np.array_equal(entropy.decode_stream(entropy.encode_stream(symbols), n), symbols)


ADVERSARIAL = {
    "empty": np.zeros(0, np.uint8),
    "single": np.array([7], np.uint8),
    "all_same": np.full(100_000, 255, np.uint8),
    "all_zero": np.zeros(70_000, np.uint8),
    "two_symbols": np.tile(np.array([0, 255], np.uint8), 5000),
    "one_rare_symbol": np.concatenate([np.zeros(99_999, np.uint8), [1]]).astype(np.uint8),
    "every_symbol_once": np.arange(256, dtype=np.uint8),
    "huge_alphabet_uniform": np.random.default_rng(3).integers(0, 256, 50_000).astype(np.uint8),
    "huge_alphabet_skewed": np.minimum(np.random.default_rng(4).geometric(0.02, 60_000), 255).astype(np.uint8),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("coder", ["ans", "lanes"])
def test_adversarial_streams(case, coder):
    symbols = ADVERSARIAL[case]
    with lanes_everywhere(16) if coder == "lanes" else nullcontext():
        coded = entropy.encode_stream(symbols)
        assert np.array_equal(entropy.decode_stream(coded, symbols.size), symbols)
    if case in ("all_same", "all_zero"):
        assert kind(coded) == "constant" and len(coded) == 2
    if case == "huge_alphabet_uniform":
        assert kind(coded) == "raw"  # 8 bits of entropy: coding cannot win


def test_long_streams_use_lanes_and_short_ones_ans():
    rng = np.random.default_rng(5)
    short = np.clip(np.round(rng.normal(0, 20, 200_000)), -127, 127).astype(np.int8).view(np.uint8)
    long = np.clip(np.round(rng.normal(0, 20, 1_500_000)), -127, 127).astype(np.int8).view(np.uint8)
    coded_short, coded_long = entropy.encode_stream(short), entropy.encode_stream(long)
    assert kind(coded_short) == "ans" and kind(coded_long) == "lanes"
    assert np.array_equal(entropy.decode_stream(coded_long, long.size), long)


@pytest.mark.parametrize("zero_share", [0.5, 0.9, 0.99])
def test_ans_size_within_one_percent_of_entropy(zero_share):
    symbols = skewed(np.random.default_rng(0), 400_000, 32, zero_share)
    bound = entropy.entropy_bits(symbols) / 8
    coded = len(entropy.encode_stream(symbols))
    assert coded <= bound * 1.01 + 200  # + the count table and the coder's final words


def test_lane_size_within_one_percent_of_entropy():
    rng = np.random.default_rng(1)
    symbols = np.clip(np.round(rng.normal(0, 12, 2_000_000)), -127, 127).astype(np.int8).view(np.uint8)
    bound = entropy.entropy_bits(symbols) / 8
    coded = entropy.encode_stream(symbols)
    assert kind(coded) == "lanes"
    lanes = entropy_streams._lane_count(symbols.size, entropy.entropy_bits(symbols))
    assert len(coded) <= bound * 1.01 + 4 * lanes + 600
    assert len(coded) <= bound * 1.01  # at this size even the lane states fit within the 1 %


def test_entropy_bits():
    assert entropy.entropy_bits(np.zeros(0, np.uint8)) == 0.0
    assert entropy.entropy_bits(np.full(1000, 9, np.uint8)) == 0.0
    assert entropy.entropy_bits(np.arange(256 * 4, dtype=np.int64).astype(np.uint8)) == pytest.approx(8 * 1024)
    assert entropy.entropy_bits(np.tile(np.array([1, 2], np.uint8), 50)) == pytest.approx(100)


@FAST
@given(arrays(np.int64, st.integers(2, 256), elements=st.integers(0, 10**7)))
def test_quantized_frequencies_are_valid(counts):
    counts = counts + 1  # every listed symbol occurs
    freqs = entropy.quantize_counts(counts)
    assert freqs.sum() == 1 << entropy.PRECISION and (freqs >= 1).all()


# --- layouts ----------------------------------------------------------------------------------


def special_floats(dtype) -> np.ndarray:
    info = np.finfo(dtype)
    return np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 3,
                     info.max, info.min, info.eps, 1.0, -1.0], dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_planes_round_trip_special_floats(dtype):
    values = np.concatenate([np.random.default_rng(1).normal(0, 1, 1000).astype(dtype), special_floats(dtype)])
    raw = values.tobytes()
    planes = entropy.split_planes(raw, values.itemsize)
    assert planes.shape == (values.itemsize, values.size)
    assert entropy.join_planes(planes) == raw


@FAST
@given(st.binary(max_size=2000))
def test_nibbles_round_trip(raw):
    nibbles = entropy.split_nibbles(raw)
    assert nibbles.size == 2 * len(raw) and (nibbles < 16).all()
    assert entropy.join_nibbles(nibbles) == raw


@FAST
@given(arrays(np.bool_, st.integers(0, 5000)), st.integers(0, 3))
def test_zero_runs_round_trip(mask, long_runs):
    mask = mask.copy()
    if long_runs and mask.size > 600:  # runs past the 255 escape, at the start, middle and end
        mask[: 300 * long_runs // 2] = False
        mask[-600:] = False
    symbols = entropy.zero_runs(mask)
    assert np.array_equal(entropy.mask_from_runs(symbols, mask.size), mask)


# --- payloads ---------------------------------------------------------------------------------

BITS = st.sampled_from([4, 8, 16, 32, 64, 128])


@FAST
@given(st.binary(min_size=0, max_size=4000), BITS)
def test_payload_round_trip_any_bytes(raw, bits):
    coded = entropy.encode_payload(raw, bits)
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), bits) == raw
    assert len(coded.streams) == entropy.stream_count(coded.method, bits, len(raw))


@FAST
@given(st.integers(1, 20_000), st.floats(0.0, 1.0), BITS, st.integers(0, 2**32 - 1))
def test_payload_round_trip_sparse_like(elements, zero_share, bits, seed):
    rng = np.random.default_rng(seed)
    itemsize = max(1, bits // 8)
    values = rng.normal(0, 1, elements * itemsize).astype(np.float32).view(np.uint8)[: elements * itemsize]
    values = values.reshape(elements, itemsize).copy()
    values[rng.random(elements) < zero_share] = 0
    raw = values.tobytes()
    coded = entropy.encode_payload(raw, bits)
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), bits) == raw


def method_of(raw: bytes, bits: int) -> str:
    coded = entropy.encode_payload(raw, bits)
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), bits) == raw
    return entropy.METHOD_NAMES[coded.method]


def test_method_suits_the_data():
    rng = np.random.default_rng(2)
    sparse = rng.normal(0, 1, 100_000).astype(np.float32)
    sparse[rng.random(sparse.size) < 0.9] = 0
    int8 = np.clip(np.round(rng.normal(0, 20, 100_000)), -127, 127).astype(np.int8)
    int4 = rng.integers(0, 4, 100_000).astype(np.uint8) | (rng.integers(0, 4, 100_000).astype(np.uint8) << 4)
    assert method_of(rng.normal(0, 1, 50_000).astype(np.float32).tobytes(), 32) == "byte-planes"
    assert method_of(sparse.tobytes(), 32).startswith("sparse-")
    assert method_of(int8.tobytes(), 8) == "bytes"
    assert method_of(int4.tobytes(), 4) == "nibbles"
    assert method_of(np.tile(rng.normal(0, 1, 64).astype(np.float32), 3000).tobytes(), 32) == "zlib"
    assert method_of(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes(), 8) == "raw"
    assert entropy.encode_payload(bytes(40_000), 32).coded_bytes <= 8  # all zero: a constant or two


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_payload_special_floats_and_negative_zero_survive_sparse_coding(dtype):
    rng = np.random.default_rng(9)
    values = np.zeros(20_000, dtype)
    chosen = rng.random(values.size)
    values[chosen < 0.1] = rng.choice(special_floats(dtype), int((chosen < 0.1).sum()))
    values[chosen > 0.95] = -0.0  # bytes nonzero: a value for the mask, not a zero
    raw = values.tobytes()
    coded = entropy.encode_payload(raw, 8 * values.itemsize)
    assert entropy.METHOD_NAMES[coded.method].startswith("sparse-")
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), 8 * values.itemsize) == raw


def test_sparse_mask_coding_picks_the_smaller_of_bitmap_and_runs():
    rng = np.random.default_rng(6)
    row_pruned = rng.normal(0, 1, (400, 1000)).astype(np.float32)
    row_pruned[rng.random(400) < 0.6] = 0  # structured: whole rows zero -> long runs
    unstructured = rng.normal(0, 1, 400_000).astype(np.float32)
    unstructured[rng.random(unstructured.size) < 0.5] = 0  # iid -> the bitmap's bytes
    for values, expected in ((row_pruned, "sparse-runs"), (unstructured, "sparse-bitmap")):
        raw = values.tobytes()
        sizes = {entropy.METHOD_NAMES[plan.method]: plan.code().coded_bytes
                 for plan in entropy._sparse(np.frombuffer(raw, np.uint8), 4)}
        assert min(sizes, key=sizes.get) == expected
        assert method_of(raw, 32) == expected


# --- hostile streams --------------------------------------------------------------------------


def test_damaged_streams_raise_corrupt_stream_only():
    rng = np.random.default_rng(7)
    sources = [skewed(rng, 5000, 40, 0.6), skewed(rng, 300, 3, 0.2)]
    detected = 0
    for coder in ("ans", "lanes"):
        with lanes_everywhere(8) if coder == "lanes" else nullcontext():
            for trial in range(200):
                symbols = sources[trial % 2]
                coded = bytearray(entropy.encode_stream(symbols))
                assert kind(coded) == coder
                if trial % 4 == 0:
                    coded = coded[: rng.integers(0, len(coded))]
                else:
                    position = int(rng.integers(0, len(coded)))
                    coded[position] ^= 1 << int(rng.integers(0, 8))
                try:
                    decoded = entropy.decode_stream(bytes(coded), symbols.size)
                except entropy.CorruptStream:
                    detected += 1
                    continue
                assert decoded.size == symbols.size  # undetected damage still has the promised size
    assert detected > 300  # lane end states and symbol counts catch nearly everything


@pytest.mark.parametrize("forge", ["count", "raw_length", "kind", "lanes", "state", "table"])
def test_forged_streams(forge):
    rng = np.random.default_rng(8)
    symbols = skewed(rng, 4000, 16, 0.5)
    with lanes_everywhere(8):
        coded = bytearray(entropy.encode_stream(symbols))
    count = symbols.size
    if forge == "count":
        count += 1
    elif forge == "raw_length":
        coded = bytearray([entropy.RAW_STREAM]) + bytes(10)
    elif forge == "kind":
        coded[0] = 9
    elif forge == "table":
        coded[0] &= 0b10000011  # precision 0: no frequency can be coded
    else:
        table_end = entropy_tables.read_table(memoryview(bytes(coded)), entropy.PRECISION, symbols.size)[3]
        if forge == "lanes":
            coded[table_end : table_end + 4] = (1).to_bytes(4, "little")  # 4000 steps of one lane
            count = 10**9
        else:
            coded[table_end + 4 : table_end + 8] = (5).to_bytes(4, "little")  # state below 2^16
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_stream(bytes(coded), count)


def test_forged_sparse_payload_cannot_overrun():
    raw = np.where(np.arange(10_000) % 10 == 0, 1.0, 0.0).astype(np.float32).tobytes()
    coded = entropy.encode_payload(raw, 32)
    assert coded.method in (entropy.SPARSE_BITMAP, entropy.SPARSE_RUNS)
    forged = [(10**12).to_bytes(8, "little") + bytes(coded.streams[0][8:])] + coded.streams[1:]
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_payload(entropy.SPARSE_RUNS, forged, len(raw), 32)
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_payload(entropy.PLANES, coded.streams[:1], len(raw), 32)
    with pytest.raises(entropy.CorruptStream):
        entropy.decode_payload(99, coded.streams, len(raw), 32)
