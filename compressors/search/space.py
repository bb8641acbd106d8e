"""The ``search:`` block of a recipe: which compression choices each layer group may take.

before: the mapping under ``search:`` in a recipe (validated through ``recipe._validate``, so every
problem is reported as ``file:line: search.key: message``).
after:  a frozen ``SearchSpace``; ``layer_groups`` turns it into the concrete groups of one model
(tensor names) and ``resolve_choice`` turns each choice into registered passes.

Groups: ``per_tensor`` (every weight its own group), ``per_role`` (the weights that do the same job
in repeated blocks — same name up to the block index, same shape, same op — form one group: a
6-block transformer's 36 matrices become 6 groups, its tables 1-3 more), or a list of glob groups.
A glob matches a weight's initializer name or the name of a node that uses it, so exports whose
initializers are anonymous (``onnx::MatMul_886``) are grouped by their nodes
(``/model/encoder/layer.*/intermediate/*``).

A choice is a named preset — ``fp32``, ``int8``, ``int8-weight-only``, ``int4`` (GPTQ; tables 4-bit too),
``int4-rtn`` (round to nearest, no data), ``kmeans2``..``kmeans8``,
``sparse<N>`` (magnitude, N % of weights), ``sparsegpt<N>``, ``admm<N>``, ``2:4`` / ``4:8`` (Wanda N:M), joined with
``+`` across stages such as ``sparse50+kmeans4`` — or an explicit ``{name, passes: [{type: ..., ...}]}``.
The search sets each pass's ``include`` to the group's tensors, so a choice may not set it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

from modelpress.compressors.errors import InputError, did_you_mean
from modelpress.compressors.pipeline import PassConfig
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:  # recipe.py imports this module to validate the search: block
    from modelpress.compressors.recipe import PassSpec

WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
QUALITY_GATES = ("max_accuracy_drop", "min_cosine", "min_agreement")
GROUPINGS = ("per_tensor", "per_role")
IDENTITY = ("fp32", "none")
PRESET_HELP = (
    "fp32, int8, int8-weight-only, int4, int4-rtn, kmeans2..kmeans8, sparse<1-99>, sparsegpt<1-99>, admm<1-99>, 2:4, 4:8, "
    "or several joined by '+' across stages (e.g. sparse50+kmeans4)"
)


@dataclass(frozen=True)
class Choice:
    name: str
    steps: tuple[PassSpec, ...]  # each pass's validated config, before the search sets its include

    @property
    def identity(self) -> bool:
        return not self.steps


class ChoiceSpec(BaseModel):
    """An explicit choice: ``{name: my-int8, passes: [{type: int8, mode: dynamic}]}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1)
    passes: tuple[dict[str, Any], ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _passes_resolve(self):
        steps = tuple(_step(entry) for entry in self.passes)
        _one_per_stage(steps, self.name)
        return self


def _choice_item(value: Any) -> str | ChoiceSpec:
    """A preset name (checked now) or an explicit ``{name, passes}`` spec."""
    if isinstance(value, str):
        resolve_choice(value)  # raises ValueError with the valid presets
        return value
    if isinstance(value, ChoiceSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"a choice is a preset name ({PRESET_HELP}) or a mapping {{name, passes}}")  # noqa: TRY004 — pydantic reports ValueError
    try:
        return ChoiceSpec.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ValueError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None


ChoiceItem = Annotated[Any, AfterValidator(_choice_item)]


class GroupSpec(BaseModel):
    """A layer group: the weight tensors whose names match ``include`` (and not ``exclude``).
    A tensor belongs to the first group that matches it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1)
    include: tuple[str, ...] = Field(min_length=1, description="globs on initializer names or on the names of "
                                     "the nodes that use them")
    exclude: tuple[str, ...] = ()
    choices: tuple[ChoiceItem, ...] | None = Field(None, description="default: the search's choices")

    _choices = field_validator("choices")(lambda cls, v: v if v is None else _unique_choices(v))


class SearchSpace(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    groups: Literal["per_tensor", "per_role"] | tuple[GroupSpec, ...] = Field(
        "per_tensor", description="`per_tensor`: every weight tensor is its own group; `per_role`: the weights doing "
        "the same job in repeated blocks (same name up to the block index, same shape and op) form one group; "
        "or a list of glob groups {name, include, exclude, choices} (tensors in no group stay as they are)",
    )
    choices: tuple[ChoiceItem, ...] = ("fp32", "int8", "kmeans5", "kmeans4")
    objective: Literal["size", "shipped_size", "latency"] = Field(
        "size", description="minimised: runnable .onnx bytes, shipped artifact bytes, or p50 latency"
    )
    max_evaluations: int | None = Field(None, ge=1, description="full evaluations; default: layer groups + 10")
    max_seconds: float | None = Field(None, gt=0, description="wall-time budget of the search")
    seed: int | None = Field(None, ge=0, description="default: the recipe's seed")
    holdout: float = Field(0.3, gt=0, lt=1, description="share of --data held out for the gate without --eval-data")
    margin: float = Field(
        1.0, ge=0, le=5, description="accept a configuration only when max_accuracy_drop / min_agreement hold by this "
        "many standard errors of their measurement on the held-out samples (0: exactly as measured)",
    )
    proxy_samples: int = Field(128, ge=1, description="calibration samples the sensitivity proxy runs on")
    proxy_trim_padding: bool = Field(True, description="cut the positions that are padding in every proxy sample "
                                     "(by a 0/1 `*mask*` input) off the proxy feeds: padded text runs several times faster")
    proxy_calibration: Literal["all", "proxy"] = Field(
        "all", description="what the passes of a proxy calibrate on (GPTQ, SparseGPT, ...): all calibration samples, "
        "or only the proxy samples (cheaper on large models; the full evaluations always use all)")
    parallel_evaluations: int = Field(
        1, ge=1, le=64, description="correction moves evaluated at once (each one counts against max_evaluations); "
        "a setting of the search, not of the executor, so every executor takes the same path",
    )
    min_elements: int = Field(256, ge=1, description="smaller weight tensors are not searched (left as they are)")
    op_types: tuple[Literal["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"], ...] = WEIGHT_OPS
    default_max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="the gate when none is set and the data has labels")
    default_min_cosine: float = Field(0.99, ge=-1, le=1, description="the gate when none is set and there are no labels")

    @field_validator("groups", mode="before")
    @classmethod
    def _grouping(cls, value):
        if isinstance(value, str) and value not in GROUPINGS:
            raise ValueError("groups is `per_tensor`, `per_role` or a list of {name, include: [globs]}")
        return value or "per_tensor"

    _choices = field_validator("choices")(lambda cls, v: _unique_choices(v))
    _groups = field_validator("groups")(lambda cls, v: v if isinstance(v, str) else _unique([g.name for g in v], "group") or v)

    @model_validator(mode="after")
    def _one_meaning_per_name(self):
        meaning: dict[str, Any] = {}
        for items in [self.choices] + [g.choices for g in self.group_specs if g.choices]:
            for item in items:
                if meaning.setdefault(choice_name(item), item) != item:
                    raise ValueError(f"choice {choice_name(item)!r} is defined twice with different passes; rename one")
        return self

    @property
    def group_specs(self) -> tuple[GroupSpec, ...]:
        return () if isinstance(self.groups, str) else self.groups

    def choices_for(self, group: GroupSpec | None) -> tuple[Choice, ...]:
        items = group.choices if group is not None and group.choices else self.choices
        return tuple(resolve_choice(item) for item in items)


def choice_name(item: str | ChoiceSpec) -> str:
    return item if isinstance(item, str) else item.name


def _unique_choices(items: tuple) -> tuple:
    if not items:
        raise ValueError("list at least one choice, e.g. [fp32, int8, kmeans4]")
    _unique([choice_name(c) for c in items], "choice")
    return items


def _unique(names: list[str], what: str) -> None:
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise ValueError(f"{what} {seen[0]!r} is listed twice")


# --------------------------------------------------------------------------- choices -> passes


_PRESETS: list[tuple[str, str, str, Any]] = [
    # (regex, stage, pass type, config fields or a function of the match)
    (r"int8", "quantize", "int8", {}),
    (r"int8-weight-only", "quantize", "int8", {"mode": "weight_only"}),
    # int4 on a Gather table means a 4-bit table (the int4 pass's own default there is int8).
    (r"int4", "quantize", "int4", {"embeddings": "int4"}),
    (r"int4-rtn", "quantize", "int4", {"method": "rtn", "embeddings": "int4"}),
    (r"kmeans([2-8])", "quantize", "kmeans", lambda m: {"bits": int(m[1])}),
    (r"sparse([1-9][0-9]?)", "prune", "magnitude", lambda m: {"sparsity": int(m[1]) / 100}),
    (r"sparsegpt([1-9][0-9]?)", "prune", "sparsegpt", lambda m: {"sparsity": int(m[1]) / 100}),
    (r"admm([1-9][0-9]?)", "prune", "admm", lambda m: {"sparsity": int(m[1]) / 100}),
    (r"(2:4|4:8)", "prune", "wanda", lambda m: {"pattern": m[1]}),
]


def resolve_choice(item: str | ChoiceSpec) -> Choice:
    """A preset name or an explicit spec -> its passes; ValueError naming the valid presets."""
    if isinstance(item, ChoiceSpec):
        return Choice(item.name, tuple(_step(entry) for entry in item.passes))
    return _resolve_preset(item)


@cache
def _resolve_preset(name: str) -> Choice:
    if name in IDENTITY:
        return Choice(name, ())
    steps = []
    for part in name.split("+"):
        for pattern, stage, kind, fields in _PRESETS:
            match = re.fullmatch(pattern, part)
            if match:
                steps.append(_step({"type": kind, **(fields(match) if callable(fields) else fields)}, stage))
                break
        else:
            hint = did_you_mean(part, ["fp32", "int8", "int8-weight-only", "int4", "kmeans4", "sparse50", "2:4"])
            raise ValueError(f"unknown choice {part!r}{hint}; valid: {PRESET_HELP}")
    _one_per_stage(tuple(steps), name)
    return Choice(name, tuple(steps))


def _step(entry: dict[str, Any], stage: str | None = None) -> PassSpec:
    from modelpress.compressors.recipe import PassSpec
    from modelpress.compressors.registry import PASSES
    from modelpress.compressors.selection import WeightFilterConfig

    kind = entry.get("type") if isinstance(entry, dict) else None
    stages = [s for s in ("prune", "quantize") if kind in PASSES[s] and (stage is None or s == stage)]
    if not stages:
        valid = ", ".join(f"{s}/{n}" for s in ("prune", "quantize") for n in PASSES[s])
        raise ValueError(f"{kind!r} is not a registered prune or quantize pass; valid: {valid}")
    cls = PASSES[stages[0]][kind]
    if not issubclass(cls.config_cls, WeightFilterConfig):
        raise ValueError(f"pass {kind!r} does not select weights by name, so it cannot be chosen per layer group")  # noqa: TRY004
    fields = {k: v for k, v in entry.items() if k != "type"}
    if "include" in fields:
        raise ValueError(f"{kind}: `include` is set by the search to the group's tensors; use the group's globs")
    try:
        config = cls.config_cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{kind}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return PassSpec(stages[0], kind, config)


def _one_per_stage(steps: tuple[PassSpec, ...], name: str) -> None:
    stages = [s.stage for s in steps]
    if len(set(stages)) != len(stages):
        raise ValueError(f"choice {name!r} has two {max(stages, key=stages.count)} passes; one per stage")


def with_tensors(step: PassSpec, tensors: list[str]) -> PassConfig:
    """The step's config restricted to exactly ``tensors`` (names escaped so no glob matches more).
    The search already applied its own ``min_elements``; a pass's default one is lifted so the choice
    covers the whole group, unless the choice set it on purpose."""
    update: dict[str, Any] = {"include": tuple(literal_glob(t) for t in tensors)}
    if "min_elements" not in step.config.model_fields_set:
        update["min_elements"] = 1
    return step.config.model_copy(update=update)


def literal_glob(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------- groups of one model


@dataclass(frozen=True)
class LayerGroup:
    name: str
    tensors: tuple[str, ...]
    elements: int
    choices: tuple[Choice, ...]


def layer_groups(model, space: SearchSpace) -> tuple[list[LayerGroup], list[dict[str, str]]]:
    """(groups, [{tensor, reason}] for weights left out of the search). InputError for a group whose
    globs match no searchable tensor: a typo there would silently search nothing."""
    from modelpress.compressors.selection import WeightFilterConfig, select_weights

    chosen, skipped = select_weights(model, set(space.op_types), WeightFilterConfig(min_elements=space.min_elements))
    sizes = {v.name: int(v.const_value.size) for v in chosen}
    if not sizes:
        raise InputError(f"the model has no weight tensor of at least {space.min_elements} elements for the search to compress")
    if space.groups == "per_tensor":
        choices = space.choices_for(None)
        return [LayerGroup(n, (n,), s, choices) for n, s in sizes.items()], skipped
    if space.groups == "per_role":
        choices = space.choices_for(None)
        roles: dict[str, list[str]] = {}
        for value in chosen:
            roles.setdefault(_role(value), []).append(value.name)
        labels = [_role_name(role, names) for role, names in roles.items()]
        labels = [label if labels.count(label) == 1 else f"{label} [{role.split('|')[2]}]"
                  for label, role in zip(labels, roles)]
        return [LayerGroup(label, tuple(names), sum(sizes[n] for n in names), choices)
                for label, names in zip(labels, roles.values())], skipped
    aliases = {v.name: (v.name, *_user_names(v)) for v in chosen}
    groups, taken = [], set()
    for spec in space.groups:
        names = [n for n in sizes if n not in taken
                 and any(fnmatch.fnmatchcase(a, g) for a in aliases[n] for g in spec.include)
                 and not any(fnmatch.fnmatchcase(a, g) for a in aliases[n] for g in spec.exclude)]
        if not names:
            raise InputError(
                f"search group {spec.name!r}: include {list(spec.include)} matches no searchable weight "
                f"(not already in an earlier group) by its name or the name of a node using it; "
                f"searchable: {', '.join(list(sizes)[:12])}"
            )
        taken.update(names)
        groups.append(LayerGroup(spec.name, tuple(names), sum(sizes[n] for n in names), space.choices_for(spec)))
    skipped += [{"tensor": n, "reason": "in no search group"} for n in sizes if n not in taken]
    return groups, skipped


# A block index: digits standing alone between separators ("layer.3.", "/h/11/", "blocks.0") —
# not digits inside a word ("conv1", "MatMul_886"), which name different layers, not repeats. Only
# the first one (the outermost repeat) is replaced: in "/layers.0/ffn/ffn.2/MatMul" the ".2" is a
# position inside the block, a different role than ".0" there.
_BLOCK_INDEX = re.compile(r"(?<=[./:])\d+(?=[./:]|$)")


def _user_names(value) -> tuple[str, ...]:
    """The names of the nodes using a weight, in graph order: torch exports name nodes after the
    module path (``/model/encoder/layer.0/attention/self/query/MatMul``) even when the initializer
    itself is anonymous (``onnx::MatMul_886``)."""
    return tuple(node.name for node, _ in value.uses() if node.name)


def _role(value) -> str:
    """What a weight does, up to the block it sits in: its first user's name (else its own name)
    with block indices replaced by ``*``, its op and its shape."""
    users = [node for node, _ in value.uses()]
    name = next((node.name for node in users if node.name), value.name)
    op = users[0].op_type if users else "?"
    shape = "x".join(str(d) for d in value.const_value.shape)
    return f"{_BLOCK_INDEX.sub('*', name, count=1)}|{op}|{shape}"


def _role_name(role: str, tensors: list[str]) -> str:
    """A readable group name: the role's path (``/model/encoder/layer.*/intermediate/dense/MatMul``),
    or the tensor's own name when the role holds one tensor."""
    return role.split("|")[0] if len(tensors) > 1 else tensors[0]


def check_fixed_passes(passes) -> str | None:
    """A search recipe may fix the encode pass only: the search chooses prune and quantize passes."""
    fixed = sorted({f"{p.stage}/{p.name}" for p in passes if p.stage != "encode"})
    if fixed:
        return f"with a search the prune and quantize passes are chosen per layer group; move {', '.join(fixed)} into search.choices"
    return None
