"""Recipes: YAML text -> validated, frozen configs -> a list of passes.

before: a YAML file (or the name of a shipped recipe) such as configs/int8.yaml.
after:  a ``Recipe`` whose passes are built from the registry, or a ``RecipeError`` listing every
problem at once as ``file:line: key.path: message`` with the valid choices and a did-you-mean.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelpress.compressors.errors import InputError, RecipeError, did_you_mean
from modelpress.compressors.pipeline import STAGES, EncodePass, Pass, PassConfig, PassContext
from modelpress.compressors.search.space import SearchSpace, check_fixed_passes

KeyPath = tuple[str | int, ...]


class Gates(BaseModel):
    """Quality and size limits; a miss exits 1 after the outputs and the report are written."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="labels needed; 0.01 = 1 pp")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="mean output cosine to the original")
    min_agreement: float | None = Field(None, ge=0, le=1, description="argmax agreement with the original")
    min_size_ratio: float | None = Field(None, gt=0, description="original size / compressed size")
    max_latency_ratio: float | None = Field(None, gt=0, description="compressed p50 / original p50")


class BenchmarkSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    threads: int = Field(2, ge=1, le=256)
    warmup: int = Field(5, ge=0, le=10_000)
    runs: int = Field(50, ge=1, le=1_000_000)


class CalibrationSettings(BaseModel):
    """How much of --data the passes see (the whole of it is still evaluated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Enough for stable ranges and Hessians of most layers; one-shot reconstruction and recovery of a
    # transformer from short sentences want more (thousands of sentences are a few tens of K tokens).
    samples: int = Field(512, ge=1, le=1_000_000, description="samples of --data the passes calibrate on")


@dataclass(frozen=True)
class PassSpec:
    stage: str
    name: str
    config: PassConfig


@dataclass(frozen=True)
class Alternative:
    """One rung of a recipe's ``alternatives:`` ladder: its own prune / quantize passes (the encode
    pass, gates and settings are the recipe's). The job keeps the first rung whose gates hold."""

    name: str
    passes: tuple[PassSpec, ...]
    description: str = ""
    # Abandon the rung once it has run this long (checked when a pass reports progress and between
    # passes; the last rung always runs to the end). A budget that binds makes the choice depend on
    # the machine's speed, so it is meant as a bound for models the rung is hopeless on.
    max_seconds: float | None = None


@dataclass(frozen=True)
class Recipe:
    source: str
    description: str
    passes: tuple[PassSpec, ...]
    gates: Gates
    benchmark: BenchmarkSettings
    seed: int
    search: SearchSpace | None = None  # the passes are then chosen per layer group (search/run.py)
    calibration: CalibrationSettings = CalibrationSettings()
    alternatives: tuple[Alternative, ...] = ()  # a ladder of pipelines, tried in order (alternatives.py)

    def alternative(self, index: int) -> Recipe:
        """The recipe as if it held only rung ``index``'s passes (plus the shared encode pass)."""
        return replace(self, passes=self.alternatives[index].passes + self.passes, alternatives=())

    def build(self, context: PassContext) -> tuple[list[Pass], EncodePass | None]:
        """Instantiate graph passes in stage order, and the encoder if the recipe encodes."""
        from modelpress.compressors.registry import PASSES

        graph_passes: list[Pass] = []
        encoder: EncodePass | None = None
        for spec in self.passes:
            instance = PASSES[spec.stage][spec.name](spec.config, context)
            if spec.stage == "encode":
                encoder = instance
            else:
                graph_passes.append(instance)
        return graph_passes, encoder

    @property
    def needs_original(self) -> bool:
        from modelpress.compressors.registry import PASSES

        return any(getattr(PASSES[s.stage][s.name], "needs_original", False) for s in self.every_pass)

    @property
    def needs_calibration(self) -> bool:
        from modelpress.compressors.registry import PASSES

        return any(PASSES[s.stage][s.name].calibrates(s.config) for s in self.every_pass)

    @property
    def every_pass(self) -> tuple[PassSpec, ...]:
        """The recipe's passes and those of every alternative."""
        return self.passes + tuple(spec for alt in self.alternatives for spec in alt.passes)


TOP_LEVEL_KEYS = ("description", *STAGES, "gates", "benchmark", "calibration", "seed", "search", "alternatives")
ALTERNATIVE_KEYS = ("name", "description", "max_seconds", "prune", "quantize")


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name -> file, from the installed ``modelpress.configs`` package."""
    folder = resources.files("modelpress.configs")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def resolve_recipe(ref: str) -> Path:
    """A recipe reference is a file path or the name of a shipped recipe."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if ref in shipped:
        return shipped[ref]
    hint = did_you_mean(ref, shipped)
    raise InputError(
        f"{ref}: no such recipe file and no shipped recipe of that name{hint}. "
        f"Shipped recipes: {', '.join(shipped)} (see `modelpress recipes`)."
    )


def load_recipe(ref: str) -> Recipe:
    path = resolve_recipe(ref)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str) -> Recipe:
    """Validate the whole recipe, collecting every problem before raising."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}: not valid YAML: {problem}"]) from None
    lines: dict[KeyPath, int] = {}
    problems: list[str] = []
    if root is not None:
        _index_lines(root, (), lines, problems, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}:1: the recipe must be a mapping of stages (prune, quantize, encode) and settings"])

    def report(path: KeyPath, message: str) -> None:
        problems.append(f"{source}:{_line_of(path, lines)}: {_format_path(path) or '(top)'}: {message}")

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            report((key,), f"unknown key {key!r}{did_you_mean(str(key), TOP_LEVEL_KEYS)}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")

    passes = _parse_passes(data, report)
    gates = _validate(Gates, data.get("gates"), ("gates",), report)
    bench = _validate(BenchmarkSettings, data.get("benchmark"), ("benchmark",), report)
    calibration = _validate(CalibrationSettings, data.get("calibration"), ("calibration",), report)
    search = _validate(SearchSpace, data["search"], ("search",), report) if "search" in data else None
    alternatives = _parse_alternatives(data, report) if "alternatives" in data else ()
    if search is not None and check_fixed_passes(passes):
        report(("search",), check_fixed_passes(passes))
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        report(("seed",), f"{seed!r} is not valid: the seed must be a non-negative integer")
    description = data.get("description", "")
    if not isinstance(description, str):
        report(("description",), "the description must be a string")
    if problems:
        raise RecipeError(problems)
    return Recipe(source, description, tuple(passes), gates, bench, seed, search, calibration, alternatives)


def _parse_alternatives(data: dict, report) -> tuple[Alternative, ...]:
    """The ``alternatives:`` ladder: a non-empty list of named rungs, each with its own prune and/or
    quantize passes; the stages at the top level would be ambiguous beside it, a search too."""
    entries = data["alternatives"]
    where = ("alternatives",)
    for stage in ("prune", "quantize"):
        if data.get(stage):
            report((stage,), f"a recipe with `alternatives:` holds its {stage} passes inside each alternative; "
                             f"move them into the alternatives that should run them")
    if "search" in data:
        report(where, "`alternatives:` and `search:` cannot be combined: the search chooses passes per layer, the "
                      "alternatives are whole pipelines tried in order; keep one of them")
    if not isinstance(entries, list) or not entries:
        report(where, "must be a non-empty list of pipelines tried in order, e.g. `alternatives:\n  - name: "
                      "pruned\n    prune: [...]\n    quantize: [...]`")
        return ()
    rungs: list[Alternative] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        path: KeyPath = (*where, index)
        if not isinstance(entry, dict):
            report(path, f"each alternative must be a mapping of keys: {', '.join(ALTERNATIVE_KEYS)}")
            continue
        for key in entry:
            if key not in ALTERNATIVE_KEYS:
                why = (" (encode, gates, benchmark and seed are shared: set them at the top level)"
                       if key in TOP_LEVEL_KEYS else did_you_mean(str(key), ALTERNATIVE_KEYS))
                report(path + (key,), f"unknown key {key!r}{why}; valid keys: {', '.join(ALTERNATIVE_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            report(path + ("name",), "each alternative needs a `name` (a non-empty string) for the report")
        elif name in names:
            report(path + ("name",), f"duplicate alternative name {name!r}: the report tells them apart by name")
        names.add(name)
        budget = entry.get("max_seconds")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            report(path + ("max_seconds",), f"{budget!r} is not valid: a positive number of seconds")
        description = entry.get("description", "")
        if not isinstance(description, str):
            report(path + ("description",), "the description must be a string")
        if not any(entry.get(stage) for stage in ("prune", "quantize")):
            report(path, "has no passes: give it `prune:` and/or `quantize:` passes")
            continue
        stages = {stage: entry[stage] for stage in ("prune", "quantize") if stage in entry}
        passes = _parse_passes(stages, report, path)
        rungs.append(Alternative(str(name), tuple(passes), description,
                                 None if budget is None else float(budget)))
    return tuple(rungs)


def _parse_passes(data: dict, report, prefix: KeyPath = ()) -> list[PassSpec]:
    from modelpress.compressors.registry import PASSES

    specs: list[PassSpec] = []
    for stage in STAGES:
        entries = data.get(stage)
        if entries is None:
            continue
        if not isinstance(entries, list):
            report((*prefix, stage), f"must be a list of passes, e.g. `{stage}:\\n  - type: {next(iter(PASSES[stage]), 'name')}`")
            continue
        choices = PASSES[stage]
        for index, entry in enumerate(entries):
            path: KeyPath = (*prefix, stage, index)
            if not isinstance(entry, dict) or "type" not in entry:
                report(path, f"each pass needs a `type`; valid {stage} passes: {', '.join(choices)}")
                continue
            name = entry["type"]
            if name not in choices:
                elsewhere = [s for s in STAGES if name in PASSES[s]]
                where = f" ({name!r} is a {elsewhere[0]} pass; put it under `{elsewhere[0]}:`)" if elsewhere else ""
                report(path + ("type",), f"unknown {stage} pass {name!r}{where}{did_you_mean(str(name), choices)}; valid: {', '.join(choices)}")
                continue
            if stage == "encode" and any(s.stage == "encode" for s in specs):
                report(path, "only one encode pass is allowed: it writes the shipped artifact")
                continue
            fields = {k: v for k, v in entry.items() if k != "type"}
            config = _validate(choices[name].config_cls, fields, path, report)
            if config is not None:
                specs.append(PassSpec(stage, name, config))
    return specs


def _validate(model_cls: type[BaseModel], value: Any, path: KeyPath, report):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        report(path, f"must be a mapping of keys: {', '.join(model_cls.model_fields)}")
        return None
    try:
        return model_cls.model_validate(value)
    except ValidationError as exc:
        for error in exc.errors():
            loc = path + tuple(error["loc"])
            if error["type"] == "extra_forbidden":
                key = str(error["loc"][-1])
                # A config nesting another (a mixed rule's `use`) names the inner valid keys in ctx.
                valid = list(error.get("ctx", {}).get("valid_keys") or model_cls.model_fields)
                report(loc, f"unknown key {key!r}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")
            else:
                bad = f"{error['input']!r} is not valid: " if "input" in error and error["type"] != "missing" else ""
                report(loc, f"{bad}{error['msg']}")
        return None


def _index_lines(node, path: KeyPath, lines: dict[KeyPath, int], problems: list[str], source: str) -> None:
    """Map every key path of the composed YAML tree to its 1-based line; flag duplicate keys."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(f"{source}:{key_node.start_mark.line + 1}: {_format_path(path + (key,))}: duplicate key")
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, path + (key,), lines, problems, source)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, path + (index,), lines, problems, source)


def _line_of(path: KeyPath, lines: dict[KeyPath, int]) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


def _format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
