"""Property tests of the entropy coder on adversarial shapes of input, chosen by hypothesis: one
symbol, two symbols at extreme skew, the whole alphabet, huge zero runs, lengths 0 and 1 — every
one an exact round trip through both coders and through the payload methods, deterministic."""

from contextlib import nullcontext
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelpress.kernels import entropy, entropy_streams

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _coders(coder: str):
    if coder == "ans":
        return nullcontext()
    return mock.patch.multiple(entropy_streams, _use_ans=lambda n, bits: False, MIN_LANES=8)


def _round_trip(symbols: np.ndarray, coder: str) -> bytes:
    with _coders(coder):
        coded = entropy.encode_stream(symbols)
        assert np.array_equal(entropy.decode_stream(coded, symbols.size), symbols)
        assert entropy.encode_stream(symbols) == coded
    return coded


@FAST
@given(st.integers(0, 255), st.integers(0, 255), st.integers(1, 200_000), st.integers(0, 20),
       st.integers(0, 2**32 - 1), st.sampled_from(["ans", "lanes"]))
def test_two_symbols_at_extreme_skew(common, rare, n, rare_count, seed, coder):
    symbols = np.full(n, common, np.uint8)
    positions = np.random.default_rng(seed).choice(n, min(rare_count, n), replace=False)
    symbols[positions] = rare
    coded = _round_trip(symbols, coder)
    if len(np.unique(symbols)) == 1:
        assert len(coded) == 2  # a constant stream
    elif n >= 10_000 and rare_count <= 5:
        assert len(coded) < n / 50  # a handful of rare symbols costs a few bytes, not n


@FAST
@given(st.integers(0, 255), st.integers(0, 300_000), st.sampled_from(["ans", "lanes"]))
def test_one_symbol_any_length(symbol, n, coder):
    coded = _round_trip(np.full(n, symbol, np.uint8), coder)
    assert len(coded) <= max(2, n + 1)


@FAST
@given(st.permutations(list(range(256))), st.integers(1, 40), st.sampled_from(["ans", "lanes"]))
def test_full_alphabet_in_any_order_and_repetition(order, repeat, coder):
    _round_trip(np.repeat(np.array(order, np.uint8), repeat), coder)


@FAST
@given(st.lists(st.integers(0, 3_000_000), min_size=0, max_size=6), st.integers(1, 255),
       st.sampled_from([4, 8, 16, 32]))
def test_payloads_with_huge_zero_runs(runs, value, bits):
    """Zero runs far past the 255-symbol escape, separated by single nonzero elements."""
    itemsize = max(1, bits // 8)
    element = bytes([value]) + bytes(itemsize - 1)
    raw = b"".join(bytes(run * itemsize) + element for run in runs) + bytes(7 * itemsize)
    coded = entropy.encode_payload(raw, bits)
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), bits) == raw
    if len(raw) > 100_000:
        assert coded.coded_bytes < len(raw) / 100


@FAST
@given(st.binary(min_size=0, max_size=1), st.sampled_from([4, 8, 16, 32, 64]))
def test_payloads_of_length_zero_and_one(raw, bits):
    coded = entropy.encode_payload(raw, bits)
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), bits) == raw


@FAST
@given(st.integers(1_000, 200_000), st.floats(0.5, 0.999), st.integers(1, 15), st.integers(0, 2**32 - 1))
def test_sparse_nibbles_choose_fast_methods_without_losing_size(n, zero_share, alphabet, seed):
    """The speed preference never costs more than SPEED_SLACK over the smallest estimate (+ tables)."""
    rng = np.random.default_rng(seed)
    nibbles = np.where(rng.random(2 * n) < zero_share, 0, rng.integers(1, alphabet + 1, 2 * n)).astype(np.uint8)
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    coded = entropy.encode_payload(raw, 4)
    assert entropy.decode_payload(coded.method, coded.streams, len(raw), 4) == raw
    nibble_only = entropy.encode_stream(nibbles)
    assert coded.coded_bytes <= len(nibble_only) * (1 + 2 * entropy.SPEED_SLACK) + 64
