"""mixed pass: per-tensor rules routing weights to int4 / int8 / fp16 / skip.

Asserted on the digits MLP: layer 1 int4 (rtn), layer 2 int8, head skipped — the stored dtype of
every initializer, weight bytes >= 3.5x smaller, accuracy drop <= 1 pp, per-rule stats; first
match wins and unmatched tensors are listed; nested config errors name rule index and key with
file:line, and the CLI exits 2 on them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import tiny_mlp, zoo
from modelpress.cli.main import app
from modelpress.compressors.errors import RecipeError
from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize.mixed import MixedConfig, MixedQuantize
from modelpress.compressors.recipe import parse_recipe
from modelpress.compressors.registry import PASSES
from onnx import TensorProto
from pydantic import ValidationError
from typer.testing import CliRunner

DIGITS_RULES = [
    {"include": ["layers.0.*"], "use": {"type": "int4", "method": "rtn", "block_size": 16}},
    {"include": ["layers.2.*"], "use": {"type": "int8"}},
    {"include": ["layers.4.*"], "skip": True},
]


def _predict(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_digits_mlp_int4_int8_and_skipped_head(zoo_models, digits):
    _, _, x_test, y_test = digits
    path = zoo_models("mlp")
    model = load_model(path)
    normalize(model)
    x = zoo.model_input("mlp", x_test)
    config = MixedConfig.model_validate({"rules": DIGITS_RULES})
    result = MixedQuantize(config, PassContext(calibration=[{"input": x[:64]}])).call(model)
    check_model(result.model)
    data = to_bytes(result.model)
    dtypes = {t.name: t.data_type for t in onnx.load_from_string(data).graph.initializer}
    assert dtypes["layers.0.weight_q4"] == TensorProto.UINT4  # layer 1: 4-bit blocks (asymmetric: uint4)
    assert dtypes["layers.2.weight_int8"] == TensorProto.INT8  # layer 2: int8
    assert dtypes["layers.4.weight"] == dtypes["layers.4.bias"] == TensorProto.FLOAT  # head untouched
    assert "layers.0.weight" not in dtypes and "layers.2.weight" not in dtypes
    original = onnx.load(path)
    head = next(t for t in original.graph.initializer if t.name == "layers.4.weight")
    assert next(t for t in onnx.load_from_string(data).graph.initializer if t.name == "layers.4.weight") == head
    assert path.stat().st_size / len(data) >= 3.5
    before, after = _predict(path.read_bytes(), x), _predict(data, x)
    drop = np.mean(before.argmax(1) == y_test) - np.mean(after.argmax(1) == y_test)
    assert drop <= 0.01
    stats = result.stats
    assert [(r["rule"], r["use"], r["tensors"]) for r in stats["rules"]] == [
        (0, "int4", ["layers.0.weight", "layers.0.bias"]),
        (1, "int8", ["layers.2.weight", "layers.2.bias"]),
        (2, "skip", ["layers.4.weight", "layers.4.bias"])]
    assert stats["rules"][0]["stats"]["tensors_quantized"] == 1
    assert stats["rules"][0]["stats"]["per_tensor"]["layers.0.weight"]["bits"] == 4
    assert all(s["tensor"] in stats["rules"][1]["tensors"] for s in stats["rules"][1]["stats"]["skipped"])
    assert stats["rules"][2]["stats"] is None
    assert stats["skipped"] == [{"tensor": "layers.4.weight", "reason": "rule 2: skip: true"},
                                {"tensor": "layers.4.bias", "reason": "rule 2: skip: true"}]


def test_first_match_wins_unmatched_listed_and_fp16_catch_all():
    rules = [{"include": ["w*"], "exclude": ["w2"], "use": {"type": "fp16"}},
             {"include": ["w1", "w2"], "use": {"type": "int8", "min_elements": 1}}]
    model = ir.from_proto(tiny_mlp())
    result = MixedQuantize(MixedConfig.model_validate({"rules": rules})).call(model)
    check_model(result.model)
    routed = {r["use"]: r["tensors"] for r in result.stats["rules"]}
    assert routed == {"fp16": ["w1"], "int8": ["w2"]}  # w1 matched rule 1 first
    assert result.stats["skipped"] == [{"tensor": "b1", "reason": "no rule matches it (a last rule with "
                                                                   "include ['*'] catches all)"}]
    dtypes = {t.name: t.data_type for t in ir.to_proto(result.model).graph.initializer}
    assert dtypes["w1_fp16"] == TensorProto.FLOAT16 and dtypes["w2_int8"] == TensorProto.INT8
    assert dtypes["b1"] == TensorProto.FLOAT
    # the same bytes on every run
    again = MixedQuantize(MixedConfig.model_validate({"rules": rules})).call(ir.from_proto(tiny_mlp()))
    assert to_bytes(again.model) == to_bytes(result.model)


@pytest.mark.parametrize("rule, fragment", [
    ({"include": ["*"]}, "exactly one of"),
    ({"skip": True, "use": {"type": "fp16"}}, "exactly one of"),
    ({"use": {"type": "int3"}}, "int8, int4, kmeans, fp16"),
    ({"use": {"type": "fp16", "include": ["w1"]}}, "set include/exclude on the rule"),
])
def test_rule_errors(rule, fragment):
    with pytest.raises(ValidationError, match=fragment):
        MixedConfig.model_validate({"rules": [rule]})
    with pytest.raises(ValidationError, match="at least one rule"):
        MixedConfig.model_validate({})


BAD_RECIPE = """\
quantize:
  - type: mixed
    rules:
      - include: ["layers.0.*"]
        use: {type: int4, method: rtn}
      - include: ["layers.2.*"]
        use:
          type: int8
          per_chanel: false
      - include: ["*"]
        use: {type: kmeans, bits: 12}
"""


def test_nested_errors_name_rule_index_key_and_line(tmp_path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(BAD_RECIPE, "bad.yaml")
    text = str(info.value)
    assert ("bad.yaml:9: quantize[0].rules[1].use.per_chanel: unknown key 'per_chanel' "
            "(did you mean 'per_channel'?); valid keys: min_elements, mode,") in text
    assert "bad.yaml:11: quantize[0].rules[2].use.bits: 12 is not valid" in text
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_RECIPE)
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp(), model)
    result = CliRunner().invoke(app, ["compress", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "rules[1].use.per_chanel" in result.output, result.output


def test_registered_and_calibrates_only_when_a_rule_does():
    assert PASSES["quantize"]["mixed"] is MixedQuantize
    recipe = "quantize:\n  - type: mixed\n    rules:\n      - use: {type: int4, method: %s}\n      - use: {type: fp16}\n"
    assert not parse_recipe(recipe % "rtn", "r.yaml").needs_calibration
    assert parse_recipe(recipe % "gptq", "r.yaml").needs_calibration
