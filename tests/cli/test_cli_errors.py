"""Bad input: exit 2, one clear message naming the file/key/tensor, no traceback, nothing written."""

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp
from typer.testing import CliRunner

from modelpress.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_clean_failure(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_truncated_model(tmp_path, tiny_data_path):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(tiny_mlp().SerializeToString()[:300])
    out = tmp_path / "out.onnx"
    result = _run("compress", bad, "--recipe", "int8", "--data", tiny_data_path, "-o", out)
    _assert_clean_failure(result, 2, "cut.onnx", "truncated or corrupt")
    assert not out.exists()


def test_missing_external_data(tmp_path, tiny_data_path):
    onnx.save(tiny_mlp(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    out = tmp_path / "out.onnx"
    result = _run("compress", tmp_path / "ext.onnx", "--data", tiny_data_path, "-o", out)
    _assert_clean_failure(result, 2, "ext.bin", "missing")
    assert not out.exists()


@pytest.mark.parametrize(
    "recipe_text, fragments",
    [
        ("quantize:\n  - type: int8\n    colour: red\n", ["r.yaml:3", "quantize[0].colour", "unknown key"]),
        ("prune:\n  - type: magnitude\n    sparsity: half\n", ["r.yaml:3", "prune[0].sparsity", "'half' is not valid"]),
        ("quantize:\n  - type: int9\n", ["r.yaml:2", "unknown quantize pass 'int9'", "did you mean 'int8'"]),
    ],
)
def test_bad_recipes(tmp_path, tiny_model_path, tiny_data_path, recipe_text, fragments):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out.onnx"
    result = _run("compress", tiny_model_path, "--recipe", recipe, "--data", tiny_data_path, "-o", out)
    _assert_clean_failure(result, 2, *fragments)
    assert not out.exists()
    check = _run("recipe", "check", recipe)
    _assert_clean_failure(check, 2, *fragments)


def test_wrong_data_names(tmp_path, tiny_model_path):
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((4, 64), np.float32))
    out = tmp_path / "out.onnx"
    result = _run("compress", tiny_model_path, "--data", data, "-o", out)
    _assert_clean_failure(result, 2, "input")
    assert not out.exists()


def test_wrong_data_shape(tmp_path, tiny_model_path):
    data = tmp_path / "d.npz"
    np.savez(data, input=np.zeros((4, 63), np.float32))
    out = tmp_path / "out.onnx"
    result = _run("compress", tiny_model_path, "--data", data, "-o", out)
    _assert_clean_failure(result, 2, "input", "64")
    assert not out.exists()


def test_output_may_not_be_input_or_exist(tmp_path, tiny_model_path, tiny_data_path):
    before = tiny_model_path.read_bytes()
    result = _run("compress", tiny_model_path, "--data", tiny_data_path, "-o", tiny_model_path, "--force")
    _assert_clean_failure(result, 2, "overwrite the input")
    assert tiny_model_path.read_bytes() == before
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep")
    result = _run("compress", tiny_model_path, "--data", tiny_data_path, "-o", existing)
    _assert_clean_failure(result, 2, "--force")
    assert existing.read_bytes() == b"keep"


def test_verbose_shows_traceback(tmp_path, tiny_data_path):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(b"not a model")
    result = _run("compress", bad, "--data", tiny_data_path, "-o", tmp_path / "o.onnx", "--verbose")
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_bad_gate_flag_value(tmp_path, tiny_model_path, tiny_data_path):
    result = _run("compress", tiny_model_path, "--data", tiny_data_path, "-o", tmp_path / "o.onnx", "--min-agreement", "7")
    _assert_clean_failure(result, 2, "--min-agreement")
    assert not (tmp_path / "o.onnx").exists()


def test_decode_rejects_garbage(tmp_path):
    junk = tmp_path / "junk.mpk"
    junk.write_bytes(b"MPK?" + bytes(100))
    result = _run("decode", junk, "-o", tmp_path / "x.onnx")
    _assert_clean_failure(result, 2, "junk.mpk")
    assert not (tmp_path / "x.onnx").exists()


def test_nan_from_the_original_on_the_data(tmp_path, tiny_model_path):
    """NaN inputs (or a model that makes NaN) would make every metric and gate noise: exit 2, named."""
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    x[0, 3] = np.nan
    np.savez(tmp_path / "d.npz", input=x)
    out = tmp_path / "out.onnx"
    result = _run("compress", tiny_model_path, "--data", tmp_path / "d.npz", "-o", out)
    _assert_clean_failure(result, 2, "NaN in output 'logits'", "feed 0", "preprocessing")
    assert not out.exists()
