"""Recipes: every shipped recipe validates; every bad one names file:line, key and the fix."""

from pathlib import Path

import pytest

from modelpress.compressors.errors import InputError, RecipeError
from modelpress.compressors.recipe import load_recipe, parse_recipe, shipped_recipes

BAD = Path(__file__).parents[1] / "recipes" / "bad"


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.description
    assert recipe.passes


def test_recipe_builds_passes_in_stage_order():
    recipe = parse_recipe("encode:\n  - type: entropy\nprune:\n  - {type: magnitude, sparsity: 0.3}\n", "r.yaml")
    assert [(p.stage, p.name) for p in recipe.passes] == [("prune", "magnitude"), ("encode", "entropy")]
    assert recipe.passes[0].config.sparsity == 0.3


EXPECTED = {
    "unknown-key.yaml": ["unknown-key.yaml:4: gates.max_acuracy_drop: unknown key", "did you mean 'max_accuracy_drop'"],
    "wrong-type.yaml": ["wrong-type.yaml:3: prune[0].sparsity: 'lots' is not valid"],
    "unknown-pass.yaml": ["unknown-pass.yaml:2: prune[0].type: unknown prune pass 'magnitud'", "did you mean 'magnitude'", "valid: magnitude"],
    "wrong-stage.yaml": ["'magnitude' is a prune pass; put it under `prune:`"],
    "top-level-typo.yaml": ["top-level-typo.yaml:1: quantise: unknown key", "did you mean 'quantize'"],
    "not-yaml.yaml": ["not-yaml.yaml:3: not valid YAML"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_recipe_messages(name):
    with pytest.raises(RecipeError) as info:
        load_recipe(str(BAD / name))
    text = str(info.value)
    for fragment in EXPECTED[name]:
        assert fragment in text, text


def test_all_errors_reported_at_once():
    with pytest.raises(RecipeError) as info:
        load_recipe(str(BAD / "out-of-range.yaml"))
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert any(":3: prune[0].sparsity: 1.5 is not valid" in p for p in problems)
    assert any(":4: prune[0].scope: 'everywhere' is not valid" in p and "'layer' or 'global'" in p for p in problems)
    assert any(":6: benchmark.threads: 0 is not valid" in p for p in problems)


def test_duplicate_keys_are_errors():
    with pytest.raises(RecipeError, match="r.yaml:3: gates: duplicate key"):
        parse_recipe("gates: {}\nquantize: [{type: int8}]\ngates: {}\n", "r.yaml")


def test_unknown_recipe_name_suggests():
    with pytest.raises(InputError, match="did you mean 'int8'"):
        load_recipe("int9")


def test_only_one_encoder():
    with pytest.raises(RecipeError, match="only one encode pass"):
        parse_recipe("encode:\n  - type: entropy\n  - type: entropy\n", "r.yaml")
