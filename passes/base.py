"""The pass contract: a pass is a dataclass whose fields are its whole configuration."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fxpress.errors import ConfigError, RecipeError

if TYPE_CHECKING:
    from fxpress.program import Program

PASS_REGISTRY: dict[str, type[Pass]] = {}


@dataclass
class PassResult:
    """What one pass did: the report row the manager prints and saves."""

    name: str
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Pass:
    """Base of every pass. Subclasses set `name`, fill in `run`, and may override `validate`.

    `preserves_function` passes are checked against the graph before them on the example inputs.
    `not_after` names passes that must not have run before this one (an invalid order).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    preserves_function: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    not_after: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[float] = 1e-4

    def validate(self) -> None:
        """Raise ConfigError for a bad field value. Called before any pass runs."""

    def run(self, program: Program) -> dict[str, Any]:
        """Rewrite `program.module` in place; return the stats for the report."""
        raise NotImplementedError

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
    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": self.name, "version": self.version, "fields": fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pass:
        return pass_from_dict(data)


def _plain(value: Any) -> Any:
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
    PASS_REGISTRY[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[Pass]:
    if name not in PASS_REGISTRY:
        known = ", ".join(sorted(PASS_REGISTRY)) or "none"
        raise RecipeError(f"unknown pass '{name}': registered passes are {known}")
    return PASS_REGISTRY[name]


def pass_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def pass_from_dict(data: dict[str, Any]) -> Pass:
    """Build a pass from `{"type", "version", "fields"}` (or `{"type", **fields}`), allow-listed by the registry."""
    if not isinstance(data, dict) or "type" not in data:
        raise RecipeError(f"a recipe entry must be a mapping with a 'type' key, got {data!r}")
    cls = get_pass_class(str(data["type"]))
    version = data.get("version", cls.version)
    if version != cls.version:
        raise RecipeError(f"pass '{cls.name}' is at version {cls.version}; the recipe asks for version {version}")
    fields = data.get("fields")
    if fields is None:
        fields = {k: v for k, v in data.items() if k not in ("type", "version")}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise RecipeError(
            f"pass '{cls.name}' has no field {', '.join(repr(u) for u in unknown)}: its fields are {', '.join(sorted(known)) or 'none'}"
        )
    try:
        instance = cls(**fields)
    except TypeError as err:
        raise RecipeError(f"pass '{cls.name}': {err}") from err
    instance.validate()
    return instance


def check_choice(pass_name: str, field_name: str, value: Any, choices: tuple) -> None:
    """Shared validation helper: a field must be one of a few values."""
    if value not in choices:
        raise ConfigError(f"{pass_name}.{field_name} = {value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")


def check_range(pass_name: str, field_name: str, value: float, low: float, high: float) -> None:
    """Shared validation helper: a numeric field must lie in [low, high]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high):
        raise ConfigError(f"{pass_name}.{field_name} = {value!r} is out of range: it must be between {low} and {high}")
