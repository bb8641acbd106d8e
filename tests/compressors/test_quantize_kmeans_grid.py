"""kmeans pass with channel scales, a uniform grid and GPTQ rounding: the runnable model computes
exactly with codebook[indices] * scales, GPTQ lowers the layer error measured on the data, and the
transformer recipe runs end to end on the digits transformer."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from pydantic import ValidationError
from test_quantize_kmeans import _load, _model, _outputs

from modelpress.compressors.model import check_model, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize.kmeans import KMeansConfig, KMeansQuantize
from modelpress.compressors.recipe import load_recipe

GRID = dict(codebook="uniform", step=0.5, scale="channel", bits=8)


def _arrays(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _reference(original, rewritten):
    """The original with each shared weight replaced by codebook[idx] * scales, computed in numpy."""
    new = _arrays(rewritten)
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    for t in reference.graph.initializer:
        if f"{t.name}_kmeans_idx" in new:
            value = new[f"{t.name}_kmeans_codebook"][new[f"{t.name}_kmeans_idx"].astype(np.int64)]
            value = value * new.get(f"{t.name}_kmeans_scales", np.float32(1))
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
    return reference


@pytest.mark.parametrize("scale", ["channel", "tensor"])
def test_uniform_grid_output_equals_the_lookup_exactly(scale):
    original = _model(np.random.default_rng(0))
    model = _load(original)
    result = KMeansQuantize(KMeansConfig(min_elements=16, **{**GRID, "scale": scale}), PassContext()).call(model)
    check_model(result.model)
    rewritten = onnx.load_from_string(to_bytes(result.model))
    arrays = _arrays(rewritten)
    assert ("emb_kmeans_scales" in arrays) == (scale == "channel")
    if scale == "channel":  # one scale per table row, per MatMul column, per Gemm (transB) row
        assert arrays["emb_kmeans_scales"].shape == (50, 1)
        assert arrays["w1_kmeans_scales"].shape == (1, 64)
        assert arrays["w2_kmeans_scales"].shape == (32, 1)
    feed = {"ids": np.arange(50, dtype=np.int64)}
    got = _outputs(rewritten, feed)[0]
    assert np.array_equal(got, _outputs(_reference(original, rewritten), feed)[0])
    exact = _outputs(original, feed)[0]
    # step 0.5 RMS: about 0.5 / sqrt(12) = 14 % weight error in each of the three layers
    assert 0 < np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.3
    w1 = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "w1"))
    restored = numpy_helper.to_array(next(t for t in _reference(original, rewritten).graph.initializer if t.name == "w1"))
    assert np.all(restored[w1 == 0] == 0)  # the 80 % pruned zeros stay exact (small weights may join them)
    info = result.stats["per_tensor"]["w1"]
    assert info["bits"] == 8 and 0 < info["index_entropy_bits"] < 4


def _calibration(rng, batches=4):
    return [{"ids": rng.integers(0, 50, 64).astype(np.int64)} for _ in range(batches)]


def test_gptq_lowers_the_layer_error_and_needs_data():
    original = _model(np.random.default_rng(3))
    feeds = _calibration(np.random.default_rng(4))
    errors, layer_errors = {}, {}
    for method, rounds in (("nearest", 1), ("gptq", 1), ("gptq", 2)):  # 2: w2's inputs seen with w1 rounded
        config = KMeansConfig(min_elements=16, method=method, rounds=rounds, op_types=("MatMul", "Gemm"),
                              **{**GRID, "step": 1.0})
        result = KMeansQuantize(config, PassContext(calibration=feeds)).call(_load(original))
        check_model(result.model)
        rewritten = onnx.load_from_string(to_bytes(result.model))
        got = np.concatenate([_outputs(rewritten, f)[0] for f in feeds])
        exact = np.concatenate([_outputs(original, f)[0] for f in feeds])
        errors[method, rounds] = float(np.sum((got - exact) ** 2) / np.sum(exact**2))
        if method == "gptq":
            layer_errors[method, rounds] = {n: result.stats["per_tensor"][n]["output_error"] for n in ("w1", "w2")}
            assert result.stats["per_tensor"]["w1"]["method"] == "gptq"
            assert result.stats["per_tensor"]["w1"]["output_error"] > 0
    assert max(errors["gptq", 1], errors["gptq", 2]) < 0.8 * errors["nearest", 1], errors
    # w1 is solved in the first round either way; w2's Hessian differs once w1 is rounded upstream
    assert layer_errors["gptq", 1]["w1"] == layer_errors["gptq", 2]["w1"]
    assert layer_errors["gptq", 1]["w2"] != layer_errors["gptq", 2]["w2"]
    assert KMeansQuantize.calibrates(KMeansConfig(method="gptq"))
    assert not KMeansQuantize.calibrates(KMeansConfig())
    with pytest.raises(ValueError, match="needs calibration data"):
        KMeansQuantize(KMeansConfig(min_elements=16, method="gptq"), PassContext()).call(_load(original))


def test_grid_options_refuse_per_group_codebooks():
    for extra in (dict(per_channel_groups=4), dict(vector_size=2), dict(min_bits=2)):
        with pytest.raises(ValidationError, match="fixed bits"):
            KMeansConfig(codebook="uniform", **extra)
    with pytest.raises(ValidationError):
        KMeansConfig(codebook="lattice")


def test_transformer_recipe_on_the_digits_transformer(zoo_models, digits_npz):
    from modelpress.compressors.encode.mpk import pack, unpack
    from modelpress.compressors.model import load_model, normalize
    from modelpress.compressors.pipeline import run_passes

    path, data = zoo_models("transformer"), digits_npz("transformer")
    arrays = dict(np.load(data))
    labels = arrays.pop("labels")
    feeds = [{k: v[i : i + 64] for k, v in arrays.items()} for i in range(0, 256, 64)]
    model = load_model(path)
    normalize(model)
    passes, encoder = load_recipe("deep-compression-transformer").build(PassContext(calibration=feeds))
    model, records = run_passes(model, passes)
    onnx_bytes = to_bytes(model)
    artifact, _ = encoder.encode(onnx_bytes)
    assert unpack(artifact) == onnx_bytes
    name = next(iter(arrays))
    predict = lambda b: ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {name: arrays[name]})[0]  # noqa: E731
    before, after = predict(path.read_bytes()), predict(onnx_bytes)
    drop = np.mean(before.argmax(1) == labels) - np.mean(after.argmax(1) == labels)
    assert drop <= 0.02
    assert path.stat().st_size / len(artifact) >= 5  # the small model's skeleton and vectors stay fp32
    assert any(info.get("method") == "gptq" for r in records for info in r.stats["per_tensor"].values())
    assert len(pack(onnx_bytes)[0]) == len(artifact)
