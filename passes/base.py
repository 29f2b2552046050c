"""The pass contract: a pass is a dataclass whose fields are its whole configuration."""

from __future__ import annotations

import dataclasses
import inspect
import time
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fxpress.errors import ConfigError, RecipeError
from fxpress.report import PassResult

if TYPE_CHECKING:
    from fxpress.program import Program

PASS_REGISTRY: dict[str, type[Pass]] = {}

# -- facts: properties of a program that passes require, establish or invalidate ------------------
# The manager walks a pipeline with the set of facts that hold and refuses a pass whose `requires`
# are not all there, so order rules are stated once, by the pass that has them, about the graph.
FLOAT_LINEARS = "float_linears"
FLOAT_EXPERTS = "float_experts"
HADAMARD_FREE = "hadamard_free"
PLAIN_NEURONS = "plain_neurons"
ALL_TOKENS = "all_tokens"
ROTATED = "rotated"

FACTS: dict[str, str] = {
    FLOAT_LINEARS: "the dense linear weights are still float (not packed low-bit codes)",
    FLOAT_EXPERTS: "the MoE expert weights are still float (not packed low-bit codes)",
    HADAMARD_FREE: "the graph has no online Hadamard transforms",
    PLAIN_NEURONS: "every MLP neuron is a plain linear neuron (no threshold neurons)",
    ALL_TOKENS: "every token passes through every block (no token router)",
    ROTATED: "the residual stream is rotated (norm scales folded, embeddings untied)",
}
# What holds of a program nothing has compressed yet (a fresh capture); passes that change the
# weights' basis (rotate, fold_hadamard) need all of it.
UNCOMPRESSED = frozenset({FLOAT_LINEARS, FLOAT_EXPERTS, HADAMARD_FREE, PLAIN_NEURONS, ALL_TOKENS})


@dataclass
class Pass(ABC):
    """Base of every pass. Subclasses set `name`, fill in `run`, and may override `validate`.

    `preserves_function` passes are checked against the graph before them on the example inputs.
    `requires` are the facts (see FACTS) that must hold before the pass runs; afterwards its
    `invalidates` no longer hold and its `establishes` do. The manager checks a whole pipeline first.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    preserves_function: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()
    establishes: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    tolerance: ClassVar[float] = 1e-4
    # optional modules the rewritten program runs with: a memory budget loads them before it measures what
    # the process holds (TVM's libraries are ~170 MB)
    runtime_modules: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:  # noqa: B027  (an optional hook: a pass without field rules keeps it)
        """Raise ConfigError for a bad field value. Called before any pass runs."""

    @abstractmethod
    def run(self, program: Program) -> dict[str, Any]:
        """Rewrite `program.module` in place; return the stats for the report."""

    def __call__(self, program: Program) -> PassResult:
        bytes_before = program.weight_bytes()
        start = time.perf_counter()
        stats = self.run(program) or {}
        seconds = time.perf_counter() - start
        warnings = list(stats.pop("warnings", []))
        return PassResult(
            name=self.name,
            modified=bool(stats.pop("modified", True)),
            stats=stats,
            seconds=seconds,
            bytes_before=bytes_before,
            bytes_after=program.weight_bytes(),
            warnings=warnings,
        )

    # -- recipes ---------------------------------------------------------------------------
    @classmethod
    def upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Turn recipe fields written at `version` into those of `version + 1`; passes that bump `version` override it."""
        raise RecipeError(f"pass '{cls.name}' is at version {cls.version} and cannot read recipes of version {version}")

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": self.name, "version": self.version, "fields": fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pass:
        return pass_from_dict(data)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass reachable by its name from recipes and the CLI."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute `name` before it is registered")
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise TypeError(f"a pass named '{cls.name}' is already registered ({PASS_REGISTRY[cls.name].__name__})")
    unknown = sorted((cls.requires | cls.establishes | cls.invalidates) - FACTS.keys())
    if unknown:
        raise TypeError(f"{cls.__name__} declares unknown facts {unknown}: the known facts are {sorted(FACTS)}")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} cannot be registered: it does not define run(program)")
    PASS_REGISTRY[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[Pass]:
    if name not in PASS_REGISTRY:
        known = ", ".join(sorted(PASS_REGISTRY)) or "none"
        raise RecipeError(f"unknown pass '{name}': registered passes are {known}")
    return PASS_REGISTRY[name]


def pass_from_dict(data: dict[str, Any]) -> Pass:
    """Build a pass from `{"type", "version", "fields"}` (or `{"type", **fields}`), allow-listed by the registry.

    A recipe written by an older version of the pass is brought up to date by the pass's `upgrade_fields`;
    nested config groups (dataclass-typed fields) are built from mappings, every key and type checked.
    """
    if not isinstance(data, dict) or "type" not in data:
        raise RecipeError(f"a recipe entry must be a mapping with a 'type' key, got {data!r}")
    cls = get_pass_class(str(data["type"]))
    version = data.get("version", cls.version)
    fields = data.get("fields")
    if fields is None:
        fields = {k: v for k, v in data.items() if k not in ("type", "version")}
    if not isinstance(version, int) or version > cls.version or version < 1:
        raise RecipeError(f"pass '{cls.name}' is at version {cls.version}; the recipe asks for version {version}")
    while version < cls.version:
        fields = cls.upgrade_fields(version, dict(fields))
        version += 1
    instance = build_config(cls, fields, cls.name)
    instance.validate()
    return instance


def build_config(cls: type, fields: Any, path: str) -> Any:
    """Construct dataclass `cls` from a mapping, recursing into dataclass-typed fields; errors name the key."""
    if not isinstance(fields, dict):
        raise RecipeError(f"{path} must be a mapping of field names to values, got {fields!r}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise RecipeError(
            f"'{path}' has no field {', '.join(repr(u) for u in unknown)}: its fields are {', '.join(sorted(known)) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in fields.items():
        values[name] = _typed_value(hints.get(name, Any), value, f"{path}.{name}")
    try:
        return cls(**values)
    except TypeError as err:
        raise RecipeError(f"{path}: {err}") from err


def _typed_value(hint: Any, value: Any, path: str) -> Any:
    """`value` checked against (and, for config groups and tuples, converted to) the field's declared type."""
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_config(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed_value(option, value, path)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path} = {value!r} has the wrong type: expected {_type_name(hint)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path} = {value!r} has the wrong type: expected a list ({_type_name(hint)})")
        item = args[0] if args else Any
        items = [_typed_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint in (int, float, str, bool) and not _is_instance(value, hint):
        raise RecipeError(f"{path} = {value!r} has the wrong type: expected {hint.__name__}")
    return value


def _is_instance(value: Any, hint: type) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_choice(pass_name: str, field_name: str, value: Any, choices: tuple) -> None:
    """Shared validation helper: a field must be one of a few values."""
    if value not in choices:
        raise ConfigError(f"{pass_name}.{field_name} = {value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")


def check_range(pass_name: str, field_name: str, value: float, low: float, high: float) -> None:
    """Shared validation helper: a numeric field must lie in [low, high]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high):
        raise ConfigError(f"{pass_name}.{field_name} = {value!r} is out of range: it must be between {low} and {high}")
