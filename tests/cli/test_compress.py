"""The main job end to end through the CLI, checked against independent recomputation."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from modelpress.cli.main import app
from modelpress.compressors.recipe import shipped_recipes

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _predict(path, data_path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    data = np.load(data_path)
    name = session.get_inputs()[0].name
    return session.run(None, {name: data[name]})[0], data["labels"] if "labels" in data else None


def _compress(tmp_path, model, data, recipe="int8", *extra, name="out"):
    out = tmp_path / f"{name}.onnx"
    report = tmp_path / f"{name}.json"
    result = _run("compress", model, "--recipe", recipe, "--data", data, "-o", out, "--report-json", report,
                  "--runs", 5, "--warmup", 1, "--quiet", *extra)
    return result, out, report


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "constant_cnn", "if_model"])
def test_int8_on_zoo_models(tmp_path, zoo_models, digits_npz, name):
    model, data = zoo_models(name), digits_npz(name)
    result, out, report_path = _compress(tmp_path, model, data)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(out))
    report = json.loads(report_path.read_text())
    assert report["schema"] == "modelpress.report/1"
    # Sizes agree with the files on disk.
    assert report["original"]["size_bytes"] == model.stat().st_size
    assert report["compressed"]["size_bytes"] == out.stat().st_size
    assert model.stat().st_size / out.stat().st_size >= 3.5
    # Metrics agree with an independent computation.
    before, labels = _predict(model, data)
    after, _ = _predict(out, data)
    accuracy_before = float(np.mean(before.argmax(1) == labels))
    accuracy_after = float(np.mean(after.argmax(1) == labels))
    assert report["original"]["metrics"]["accuracy"] == pytest.approx(accuracy_before, abs=1e-9)
    assert report["compressed"]["metrics"]["accuracy"] == pytest.approx(accuracy_after, abs=1e-9)
    assert report["compressed"]["metrics"]["agreement"] == pytest.approx(float(np.mean(before.argmax(1) == after.argmax(1))), abs=1e-9)
    assert accuracy_before - accuracy_after <= 0.005
    assert report["gates"] and all(g["passed"] for g in report["gates"])
    for key in ("p50", "p90", "p99"):
        assert report["compressed"]["latency_ms"][key] > 0


@pytest.mark.parametrize("recipe", sorted(shipped_recipes()))
def test_every_shipped_recipe_end_to_end(tmp_path, zoo_models, digits_npz, recipe):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    result, out, report_path = _compress(tmp_path, model, data, recipe)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passes"]
    drop = report["original"]["metrics"]["accuracy"] - report["compressed"]["metrics"]["accuracy"]
    assert drop <= 0.02
    packed = report["artifacts"]["packed"]
    if packed:
        assert report["compressed"]["shipped_size_bytes"] == (tmp_path / "out.mpk").stat().st_size
        decoded = tmp_path / "decoded.onnx"
        assert _run("decode", packed, "-o", decoded).exit_code == 0
        assert decoded.read_bytes() == out.read_bytes()


def test_lossless_is_lossless_and_smaller_when_shipped(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    result, out, report_path = _compress(tmp_path, model, data, "lossless")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["compressed"]["metrics"]["max_abs_error"] == 0.0
    assert report["compressed"]["shipped_size_bytes"] < report["original"]["size_bytes"]


def test_same_inputs_same_bytes(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    _, out_a, _ = _compress(tmp_path, model, data, "prune-int8", name="a")
    _, out_b, _ = _compress(tmp_path, model, data, "prune-int8", name="b")
    assert out_a.read_bytes() == out_b.read_bytes()
    assert out_a.with_suffix(".mpk").read_bytes() == out_b.with_suffix(".mpk").read_bytes()


def test_gate_miss_exits_1_and_still_writes(tmp_path, tiny_model_path, tiny_data_path):
    result, out, report_path = _compress(tmp_path, tiny_model_path, tiny_data_path, "int8", "--min-size-ratio", 1000)
    assert result.exit_code == 1, result.output
    assert out.exists()
    gates = {g["name"]: g for g in json.loads(report_path.read_text())["gates"]}
    assert gates["min_size_ratio"]["passed"] is False
    assert "MISS" in result.output


def test_markdown_report(tmp_path, tiny_model_path, tiny_data_path):
    md = tmp_path / "r.md"
    result = _run("compress", tiny_model_path, "--data", tiny_data_path, "-o", tmp_path / "o.onnx", "--report-md", md, "--runs", 3, "--quiet")
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "| size (runnable .onnx) |" in text and "| accuracy |" in text


def test_without_data_inputs_are_synthesized(tmp_path, tiny_model_path):
    result = _run("compress", tiny_model_path, "-o", tmp_path / "o.onnx", "--report-json", tmp_path / "r.json", "--runs", 3, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "accuracy" not in report["compressed"]["metrics"]
    assert any("synthesized" in n for n in report["notes"])


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "modelpress", "recipes"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "int8" in done.stdout


def test_int8_static_quantizes_every_conv_with_calibrated_ranges(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("cnn"), digits_npz("cnn")
    result, out, report_path = _compress(tmp_path, model, data, "int8-static")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    stats = report["passes"][0]["stats"]
    assert stats["calibration"]["method"] == "mse" and stats["calibration"]["activations"] > 0
    assert stats["quantized"]["Conv"] == {"static": 2}
    ops = Counter(node.op_type for node in onnx.load(out).graph.node)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 2
    drop = report["original"]["metrics"]["accuracy"] - report["compressed"]["metrics"]["accuracy"]
    assert drop <= 0.005
    assert report["original"]["size_bytes"] / report["compressed"]["size_bytes"] >= 3.5


def test_int4_round_to_nearest_needs_no_data(tmp_path, zoo_models):
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("quantize:\n  - type: int4\n    method: rtn\n")
    out = tmp_path / "out.onnx"
    result = _run("compress", zoo_models("mlp"), "--recipe", recipe, "-o", out, "--runs", 2, "--warmup", 0, "--quiet")
    assert result.exit_code == 0, result.output
    assert onnx.load(zoo_models("mlp")).ByteSize() / out.stat().st_size > 4
    gptq = tmp_path / "gptq.yaml"
    gptq.write_text("quantize:\n  - type: int4\n")
    result = _run("compress", zoo_models("mlp"), "--recipe", gptq, "-o", tmp_path / "g.onnx", "--quiet")
    assert result.exit_code == 2 and "quantize/int4" in result.output


def test_int4_recipe_quantizes_what_int4_cannot_take_to_int8(tmp_path, zoo_models, digits_npz):
    """A CNN under the int4 recipe: int4 takes the classifier, int8 the convolutions (not left fp32)."""
    result, out, report_path = _compress(tmp_path, zoo_models("cnn"), digits_npz("cnn"), "int4")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    quantized = {p["name"]: p["stats"].get("quantized") for p in report["passes"]}
    assert set(quantized) == {"int4", "int8"} and "Conv" in quantized["int8"]
    assert report["original"]["size_bytes"] / report["compressed"]["size_bytes"] > 3.5


@pytest.mark.parametrize("samples", [64, 300])
def test_recipe_calibration_samples_bound_what_the_passes_see(tmp_path, zoo_models, digits_npz, samples):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"prune:\n  - {{type: sparsegpt, sparsity: 0.5}}\ncalibration: {{samples: {samples}}}\n")
    result, _, report = _compress(tmp_path, zoo_models("mlp"), digits_npz("mlp"), recipe)
    assert result.exit_code == 0, result.output
    stats = json.loads(report.read_text())["passes"][0]["stats"]
    # The passes get whole feeds (chunks of the data's batch size), at least `samples` rows in all.
    assert samples <= stats["calibration_rows"] < samples + 128
    notes = json.loads(report.read_text())["notes"]
    assert any(f"calibrated on {stats['calibration_rows']} of the" in n and "calibration.samples" in n for n in notes)


def test_recipe_calibration_block_rejects_unknown_keys(tmp_path, tiny_model_path, tiny_data_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n  - {type: magnitude}\ncalibration: {sample: 64}\n")
    result, out, _ = _compress(tmp_path, tiny_model_path, tiny_data_path, recipe)
    assert result.exit_code == 2 and "calibration.sample: unknown key" in result.output and "samples" in result.output
    assert not out.exists()


def _scaled_mlp(batch_dim) -> onnx.ModelProto:
    """x[batch, 16] -> MatMul(w 16x8) -> Mul(scale, a scalar input) -> y: a 0-d input as in silero-vad's
    ``sr``; ``batch_dim`` as the exporter wrote it (paddle2onnx writes -1 for a dynamic dim)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    x.type.tensor_type.shape.dim[0].Clear()
    x.type.tensor_type.shape.dim[0].dim_value = batch_dim
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "scale"], ["y"])], "scaled",
        [x, helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_scalar_input_in_folder_feeds(tmp_path):
    """A 0-d input stays 0-d through --data (numpy's ascontiguousarray would make it [1])."""
    onnx.save(_scaled_mlp(1), tmp_path / "m.onnx")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):  # scale given as float64: cast to the model's float32, still 0-d
        np.savez(feeds / f"{i}.npz", x=rng.normal(size=(1, 16)).astype(np.float32), scale=np.array(0.5 + i))
    result, out, report = _compress(tmp_path, tmp_path / "m.onnx", feeds, "int8")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["compressed"]["metrics"]["cosine"] > 0.99


def test_minus_one_batch_dim_is_dynamic(tmp_path):
    """-1 as a dim_value means dynamic (onnxruntime reads it so): the samples are chunked, not dropped."""
    model = _scaled_mlp(-1)
    model.graph.input.pop()  # no scalar input here: scale becomes a constant
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "scale"))
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(70, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result, out, report = _compress(tmp_path, tmp_path / "m.onnx", tmp_path / "d.npz", "int8")
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["compressed"]["metrics"]["cosine"] > 0.99
    reference = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert reference.shape == (70, 8)


def test_recover_on_ops_torch_cannot_run_is_exit_2_before_any_pass(tmp_path):
    """structured-50 ends with recover; a model with CumSum (no torch kernel here) fails at once with
    the op named and nothing written (it used to fail with exit 3 after the pruning ran)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, 4)).astype(np.float32), "w2")
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("CumSum", ["z", "axis"], ["y"], name="running")],
        "cumsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[w1, w2, axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(32, 16)).astype(np.float32))
    result, out, report = _compress(tmp_path, tmp_path / "m.onnx", tmp_path / "d.npz", "structured-50")
    assert result.exit_code == 2, result.output
    assert "CumSum (node 'running')" in result.output and "without recover" in result.output
    assert not out.exists() and not report.exists()


def test_recover_on_an_already_quantized_model_says_so(tmp_path):
    """An int8 MatMulInteger model under structured-50: exit 2 that names the cause first."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {"w": rng.integers(-100, 100, (16, 4)).astype(np.int8), "zero": np.array(0, np.int8)}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "scale", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "zero"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "quantized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[numpy_helper.from_array(a, k) for k, a in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(8, 16)).astype(np.float32))
    result, out, report = _compress(tmp_path, tmp_path / "m.onnx", tmp_path / "d.npz", "structured-50")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "already quantized" in message and "MatMulInteger" in message and "float model" in message
    assert not out.exists() and not report.exists()


def _initializers_as_inputs(path, out, batch: int | None = None) -> None:
    """The model with every initializer also listed as a graph input — IR 3 files of the ONNX model zoo,
    torch's ``keep_initializers_as_inputs=True`` — and optionally a batch fixed at ``batch``."""
    model = onnx.load(path)
    listed = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.name not in listed:
            model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    if batch is not None:
        for value in (model.graph.input[0], model.graph.output[0]):
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, out)


def test_initializers_listed_as_inputs_are_compressed(tmp_path, zoo_models, digits_npz):
    """Such initializers used to count as run-time inputs: every recipe compressed nothing and passed."""
    _initializers_as_inputs(zoo_models("cnn"), tmp_path / "m.onnx")
    result, out, report = _compress(tmp_path, tmp_path / "m.onnx", digits_npz("cnn"), "int8")
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert (tmp_path / "m.onnx").stat().st_size / out.stat().st_size >= 3.5
    assert figures["original"]["metrics"]["accuracy"] - figures["compressed"]["metrics"]["accuracy"] <= 0.01
    written = onnx.load(out)
    assert [i.name for i in written.graph.input] == ["input"]
    onnx.checker.check_model(written)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_recover_on_a_batch_fixed_at_one(tmp_path, zoo_models, digits_npz):
    """A model whose batch is fixed at 1 gets one feed per sample; recover must not stack them into
    batches ORT rejects (it used to fail with exit 3: "Got: 8 Expected: 1")."""
    _initializers_as_inputs(zoo_models("mlp"), tmp_path / "m.onnx", batch=1)
    data = np.load(digits_npz("mlp"))
    np.savez(tmp_path / "d.npz", input=data["input"][:48], labels=data["labels"][:48])
    result, out, report = _compress(tmp_path, tmp_path / "m.onnx", tmp_path / "d.npz", "structured-50",
                                    "--max-accuracy-drop", 1)
    assert result.exit_code == 0, result.output
    passes = {p["name"]: p for p in json.loads(report.read_text())["passes"]}
    stats = passes["recover"]["stats"]
    assert stats["steps"] > 0 and stats["kd_loss_after"] < stats["kd_loss_before"], stats


def test_a_recipe_that_changes_nothing_says_so(tmp_path, tiny_model_path, tiny_data_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n  - type: magnitude\n    include: ['no_such_weight*']\n")
    result, out, report = _compress(tmp_path, tiny_model_path, tiny_data_path, recipe)
    assert result.exit_code == 0, result.output
    assert any("no pass changed the model" in n for n in json.loads(report.read_text())["notes"])
