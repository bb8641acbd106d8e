"""GPTQ / round-to-nearest block quantization against plain references, and the storage layouts."""

import numpy as np
import pytest

from modelpress.kernels.gptq import (
    dequantize_blocks,
    folded_arrays,
    gptq_quantize,
    matmulnbits_arrays,
    output_error,
    prepare_hessian,
    rtn_quantize,
)
from modelpress.kernels.quant import pack_bits, unpack_bits


def correlated_inputs(rows: int, n_in: int, seed: int = 0) -> np.ndarray:
    """Features that are correlated and of unequal scale, like real activations."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)) * 0.3 + np.eye(n_in)
    return (rng.normal(size=(rows, n_in)) @ mix) * np.exp(rng.normal(size=n_in))


def plain_params(rows, bits, symmetric):
    """Per output: the scale (float32) and zero point of one block, spelled out."""
    maxq, half = 2**bits - 1, 2 ** (bits - 1)
    scales, zeros = [], []
    for col in rows.T:
        if symmetric:
            peak = col[np.argmax(np.abs(col))]
            scale, zero = peak / -half, half
        else:
            low, high = min(col.min(), 0.0), max(col.max(), 0.0)
            scale = (high - low) / maxq
            zero = np.clip(np.rint(-low / scale), 0, maxq) if scale else 0
        scales.append(float(np.float32(scale)) if scale else 1.0)
        zeros.append(zero)
    return np.array(scales), np.array(zeros, float)


def reference_gptq(w, h, *, bits, block, symmetric, damp=0.01, act_order=False):
    """GPTQ as exact OBS, one input row at a time, [in, out] layout, no Cholesky trick: quantizing
    row i moves the rows not yet quantized by -(w_i - q_i) / [H_F^-1]_00 · [H_F^-1]_{:,0}."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    n_in, maxq = w.shape[0], 2**bits - 1
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(n_in)
    blocks = -(-n_in // block)
    scales, zeros = np.zeros((blocks, w.shape[1])), np.zeros((blocks, w.shape[1]))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n_in)
    if act_order:  # static groups from the original weights
        for b in range(blocks):
            scales[b], zeros[b] = plain_params(w[b * block : (b + 1) * block], bits, symmetric)
    w, h = w[order], h[np.ix_(order, order)]
    q = np.zeros(w.shape)
    for i in range(n_in):
        row = order[i]
        b = row // block
        if not act_order and row % block == 0:
            scales[b], zeros[b] = plain_params(w[i : i + block], bits, symmetric)
        q[i] = np.clip(np.rint(w[i] / scales[b]) + zeros[b], 0, maxq)
        restored = (q[i] - zeros[b]) * scales[b]
        h_inv = np.linalg.inv(h[i:, i:])
        w[i:] -= np.outer(h_inv[:, 0], (w[i] - restored) / h_inv[0, 0])
    out = np.zeros_like(q)
    out[order] = q
    return out, scales, zeros


@pytest.fixture
def layer():
    x = correlated_inputs(512, 40)
    return np.random.default_rng(1).normal(size=(40, 7)), x.T @ x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_exact_obs_reference(layer, symmetric, act_order):
    w, h = layer  # 40 inputs in blocks of 16: the last block is partial
    ours = gptq_quantize(w, h, bits=4, block_size=16, symmetric=symmetric, act_order=act_order)
    q, scales, zeros = reference_gptq(w, h, bits=4, block=16, symmetric=symmetric, act_order=act_order)
    np.testing.assert_array_equal(ours.q, q)
    np.testing.assert_allclose(ours.scales, scales, rtol=1e-6)
    np.testing.assert_array_equal(ours.zero_points, zeros)


def test_reduces_output_error_vs_rtn_by_a_fifth_on_a_384x1536_layer():
    x = correlated_inputs(4096, 384, seed=2)
    h = x.T @ x / len(x)
    w = np.random.default_rng(3).normal(0, 0.05, (384, 1536)).astype(np.float32)

    def measured(result):  # on the outputs themselves, not through H
        restored = dequantize_blocks(result, 32)
        return np.sum((x @ (w - restored)) ** 2) / np.sum((x @ w) ** 2)

    rtn = rtn_quantize(w, bits=4, block_size=32)
    gptq = gptq_quantize(w, h, bits=4, block_size=32, act_order=False)
    assert measured(gptq) <= 0.8 * measured(rtn)
    assert output_error(w, gptq, 32, h) == pytest.approx(measured(gptq), rel=1e-6)
    ordered = gptq_quantize(w, prepare_hessian(h, act_order=True), bits=4, block_size=32)
    assert measured(ordered) < measured(gptq)


def test_rtn_is_plain_rounding_per_block():
    w = np.random.default_rng(4).normal(size=(48, 5))
    for symmetric in (True, False):
        result = rtn_quantize(w, bits=4, block_size=16, symmetric=symmetric)
        for b in range(3):
            scales, zeros = plain_params(w[16 * b : 16 * (b + 1)], 4, symmetric)
            expected = np.clip(np.rint(w[16 * b : 16 * (b + 1)] / scales) + zeros, 0, 15)
            np.testing.assert_array_equal(result.q[16 * b : 16 * (b + 1)], expected)
        restored = dequantize_blocks(result, 16)
        assert np.max(np.abs(restored - w)) <= np.max(np.abs(result.scales)) * (1 if symmetric else 0.5) + 1e-6
    searched = rtn_quantize(w, bits=4, block_size=16, symmetric=False, search=True)
    plain = rtn_quantize(w, bits=4, block_size=16, symmetric=False)
    assert np.sum((dequantize_blocks(searched, 16) - w) ** 2) <= np.sum((dequantize_blocks(plain, 16) - w) ** 2)


def test_layouts_ranges_dtypes_and_determinism(layer):
    w, h = layer
    a = gptq_quantize(w, h, bits=4, block_size=16, symmetric=False)
    b = gptq_quantize(np.ascontiguousarray(w.T), h.copy(), bits=4, block_size=16, symmetric=False, layout="out_in")
    np.testing.assert_array_equal(a.q, b.q.T)
    np.testing.assert_array_equal(a.scales, b.scales.T)
    assert a.q.dtype == np.uint8 and a.q.max() <= 15 and a.scales.dtype == np.float32
    assert a.scales.shape == (3, 7) and a.zero_points.shape == (3, 7) and a.zero_points.dtype == np.uint8
    again = gptq_quantize(w.copy(), h.copy(), bits=4, block_size=16, symmetric=False)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, again))
    eight = gptq_quantize(w, h, bits=8, block_size=16)
    assert eight.q.max() > 15 and np.all(eight.zero_points == 128)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(w.T, h, layout="in_out")


def test_dead_inputs_and_singular_hessian():
    x = correlated_inputs(8, 32)  # fewer rows than inputs: H is singular
    x[:, 5] = 0
    w = np.random.default_rng(5).normal(size=(32, 8))
    result = gptq_quantize(w, x.T @ x, bits=4, block_size=16, damp=1e-6)
    restored = dequantize_blocks(result, 16)
    assert np.all(np.isfinite(restored)) and np.all(restored[5] == 0)


def test_pack_bits_low_nibble_first():
    values = np.array([[1, 2, 3], [15, 0, 7]], np.uint8)
    packed = pack_bits(values, 4)
    np.testing.assert_array_equal(packed, [[0x21, 0x03], [0x0F, 0x07]])
    np.testing.assert_array_equal(unpack_bits(packed, 4, 3), values)
    assert pack_bits(values, 8) is not values and np.array_equal(pack_bits(values, 8), values)


@pytest.mark.parametrize("symmetric", [True, False])
def test_storage_layouts_decode_to_the_dequantized_weights(symmetric):
    w = np.random.default_rng(6).normal(size=(40, 6)).astype(np.float32)  # K = 40: padded to 48
    result = rtn_quantize(w, bits=4, block_size=16, symmetric=symmetric)
    expected = dequantize_blocks(result, 16)
    b, scales, zeros = matmulnbits_arrays(result, 16, 4)
    assert b.shape == (6, 3, 8) and scales.shape == (6, 3) and zeros.shape == (6, 2)
    q = unpack_bits(b, 4, 16).reshape(6, 48)[:, :40]
    z = np.repeat(unpack_bits(zeros, 4, 3), 16, axis=1)[:, :40]
    np.testing.assert_allclose((q - z.astype(np.float32)) * np.repeat(scales, 16, axis=1)[:, :40], expected.T, rtol=1e-6)
    stored, scale, zero = folded_arrays(result, 16, 4, symmetric)
    assert stored.shape == (3, 16, 6) and scale.shape == (3, 1, 6)
    values = stored.astype(np.float32) - (0 if zero is None else zero.astype(np.float32))
    np.testing.assert_allclose((values * scale).reshape(48, 6)[:40], expected, rtol=1e-6)
    table = rtn_quantize(w, bits=4, block_size=6, symmetric=symmetric, layout="out_in")  # a scale per row
    stored, scale, zero = folded_arrays(table, 6, 4, symmetric, layout="out_in")
    assert stored.shape == (40, 6) and scale.shape == (40, 1)
    values = stored.astype(np.float32) - (0 if zero is None else zero.astype(np.float32))
    np.testing.assert_allclose(values * scale, dequantize_blocks(table, 6, layout="out_in"), rtol=1e-6)
