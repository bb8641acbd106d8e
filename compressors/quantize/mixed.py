"""Mixed precision by per-tensor rules: each weight goes to the first rule whose globs match it.

before: a float model and an ordered list of rules, e.g.

    quantize:
      - type: mixed
        rules:
          - include: ["layers.0.*"]
            use: {type: int4, method: rtn, block_size: 16}
          - include: ["layers.2.*"]
            use: {type: int8}
          - include: ["layers.4.*"]
            skip: true
          - use: {type: fp16}           # catch-all: include defaults to ["*"]

after:  each rule's quantize pass (any registered quantize pass that selects weights by name:
int8, int4, kmeans, fp16) run once, in rule order, on exactly the float initializers routed to
that rule (its ``include`` set to their names), with the options given under ``use`` validated
by that pass's own config — so a typo is reported as ``rules[1].use.bitz`` in the recipe.
Tensors of a ``skip: true`` rule, and those no rule matches, stay as they are.

Routing is decided once, on the input model, so tensors a sub-pass adds (scales, zero points)
are never handed to a later rule. Each sub-pass still applies its own criteria (op types,
``min_elements``) to the tensors it is given and lists those it leaves alone in its stats.
Stats per rule: the tensors routed to it and the sub-pass's own stats; and every tensor skipped,
with the rule (or the lack of one) that left it alone.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from modelpress.compressors.model import iter_weights
from modelpress.compressors.pipeline import Pass, PassConfig, PassResult
from modelpress.compressors.quantize.graph_edits import initializer_bytes
from modelpress.compressors.search.space import literal_glob
from modelpress.compressors.selection import WeightFilterConfig, matches
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
# Set by the rule itself: the rule decides which tensors its pass sees.
RULE_KEYS = ("include", "exclude")


def sub_passes() -> dict[str, type[Pass]]:
    """Quantize passes a rule may use: those that select weights by name (so the rule can hand them
    their tensors). Looked up in the registry when needed: the registry imports this module."""
    from modelpress.compressors.registry import PASSES

    return {name: cls for name, cls in PASSES["quantize"].items()
            if name != MixedQuantize.name and issubclass(cls.config_cls, WeightFilterConfig)}


def sub_pass(use: dict[str, Any]) -> tuple[type[Pass], PassConfig]:
    """The pass class and validated config of a rule's ``use``; a ``ValidationError`` whose
    locations are keys of ``use`` (pydantic prefixes them with the rule's path)."""
    choices = sub_passes()
    kind = use.get("type")
    if kind not in choices:
        raise _error(("type",), kind, "unknown_pass", f"needs `type:` one of {', '.join(choices)}")
    cls = choices[kind]
    misplaced = [key for key in RULE_KEYS if key in use]
    if misplaced:
        raise _error((misplaced[0],), use[misplaced[0]], "rule_key",
                     "set include/exclude on the rule, not under `use`: the rule routes tensors to the pass")
    try:
        return cls, cls.config_cls.model_validate({k: v for k, v in use.items() if k != "type"})
    except ValidationError as exc:
        valid = tuple(k for k in cls.config_cls.model_fields if k not in RULE_KEYS)
        raise ValidationError.from_exception_data(cls.config_cls.__name__, [
            InitErrorDetails(
                # The recipe lists the valid keys of an unknown one: here those of the sub-pass.
                type=PydanticCustomError("extra_forbidden", f"not an option of the {kind} pass",
                                         {"valid_keys": valid}) if e["type"] == "extra_forbidden"
                else PydanticCustomError(e["type"], e["msg"]),
                loc=e["loc"], input=e.get("input"))
            for e in exc.errors()]) from None


def _error(loc: tuple, value: Any, kind: str, message: str) -> ValidationError:
    return ValidationError.from_exception_data("use", [
        InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)])


class MixedRule(PassConfig):
    include: tuple[str, ...] = Field(("*",), description="globs on initializer names this rule claims")
    exclude: tuple[str, ...] = Field((), description="globs on initializer names, applied after include")
    use: dict[str, Any] | None = Field(None, description="{type: int8 | int4 | kmeans | fp16, ...that pass's options}")
    skip: bool = Field(False, description="true: the matching tensors stay as they are")

    @field_validator("use")
    @classmethod
    def _valid_sub_config(cls, use: dict[str, Any] | None) -> dict[str, Any] | None:
        if use is not None:
            sub_pass(use)
        return use

    @model_validator(mode="after")
    def _one_action(self) -> MixedRule:
        if self.skip == (self.use is not None):
            raise ValueError("a rule needs exactly one of `use: {type: ...}` or `skip: true`")
        return self


class MixedConfig(PassConfig):
    rules: tuple[MixedRule, ...] = Field((), description="ordered; each tensor goes to the first rule that matches")

    @model_validator(mode="after")
    def _some_rules(self) -> MixedConfig:
        if not self.rules:
            raise ValueError("`rules` needs at least one rule, e.g. `- {include: ['*'], use: {type: int8}}`")
        return self


class MixedQuantize(Pass):
    name = "mixed"
    stage = "quantize"
    config_cls = MixedConfig
    summary = "per-tensor rules: glob -> int8 / int4 / kmeans / fp16 with its options, or skip"
    @classmethod
    def calibrates(cls, config: MixedConfig) -> bool:
        """--data is needed when a rule's pass, so configured, needs it (int4 with GPTQ)."""
        return any(cls_.calibrates(sub) for cls_, sub in (sub_pass(r.use) for r in config.rules if r.use is not None))

    def call(self, model: ir.Model) -> PassResult:
        config: MixedConfig = self.config
        bytes_before = initializer_bytes(model)
        routed, unmatched = route(model, config.rules)
        skipped = [{"tensor": name, "reason": "no rule matches it (a last rule with include ['*'] catches all)"}
                   for name in unmatched]
        rules: list[dict[str, Any]] = []
        modified = False
        for index, (rule, names) in enumerate(zip(config.rules, routed)):
            entry: dict[str, Any] = {"rule": index, "use": rule.use["type"] if rule.use else "skip",
                                     "tensors": names, "stats": None}
            if rule.skip:
                skipped += [{"tensor": name, "reason": f"rule {index}: skip: true"} for name in names]
            elif names:
                cls, sub_config = sub_pass(rule.use)
                sub_config = sub_config.model_copy(update={"include": tuple(literal_glob(n) for n in names), "exclude": ()})
                self.context.progress(f"mixed: rule {index} ({cls.name})", index, len(config.rules))
                result = cls(sub_config, self.context).call(model)
                model, modified = result.model, modified or result.modified  # a pass may return a new model
                # A sub-pass lists every weight outside its include as skipped: keep this rule's own.
                entry["stats"] = {**result.stats, "skipped": [s for s in result.stats.get("skipped", [])
                                                              if s.get("tensor") in names]}
            rules.append(entry)
        bytes_after = initializer_bytes(model)
        stats = {"rules": rules, "skipped": skipped, "bytes_before": bytes_before, "bytes_after": bytes_after,
                 "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None}
        return PassResult(model, modified=modified, stats=stats)


def route(model: ir.Model, rules: tuple[MixedRule, ...]) -> tuple[list[list[str]], list[str]]:
    """([names of the float initializers each rule gets], [names no rule matches]), in model order."""
    routed: list[list[str]] = [[] for _ in rules]
    unmatched: list[str] = []
    for _, value in iter_weights(model):
        if value.const_value.dtype not in FLOAT_TYPES or not value.uses() or not value.name:
            continue
        index = next((i for i, rule in enumerate(rules) if matches(value.name, rule.include, rule.exclude)), None)
        (unmatched if index is None else routed[index]).append(value.name)
    return routed, unmatched
