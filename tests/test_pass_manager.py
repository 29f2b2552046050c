"""The pass contract: registry, recipes that round-trip, validation before work, order, equivalence checks."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch

import fxpress
from fxpress.errors import ConfigError, PassError, PassOrderError, RecipeError
from fxpress.passes.base import FLOAT_LINEARS, PASS_REGISTRY, ROTATED, Pass, check_range, register_pass
from fxpress.passes.manager import run_passes, validate_pipeline
from fxpress.recipe import load_recipe, passes_from_recipe, recipe_dict, save_recipe


@dataclass
class ScaleLinears(Pass):
    """Test pass: scales every linear weight by `factor` (function-preserving only when factor == 1)."""

    name: ClassVar[str] = "test_scale_linears"
    preserves_function: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset({FLOAT_LINEARS})
    factor: float = 1.0

    def validate(self) -> None:
        check_range(self.name, "factor", self.factor, 0.0, 10.0)

    def run(self, program):
        touched = 0
        for node in program.graph.nodes:
            if node.target is torch.ops.aten.linear.default:
                program.module.get_parameter(node.args[1].target).data.mul_(self.factor)
                touched += 1
        return {"linears": touched}


@dataclass
class Freeze(Pass):
    """Test pass that changes nothing but claims to pack the linears, so ScaleLinears must not run after it."""

    name: ClassVar[str] = "test_freeze"
    invalidates: ClassVar[frozenset[str]] = frozenset({FLOAT_LINEARS})

    def run(self, program):
        return {"modified": False}


@pytest.fixture(autouse=True)
def _test_passes():
    register_pass(ScaleLinears)
    register_pass(Freeze)
    yield
    PASS_REGISTRY.pop(ScaleLinears.name, None)
    PASS_REGISTRY.pop(Freeze.name, None)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def test_report_lists_each_pass_with_counts_and_seconds():
    cm = fxpress.compile(_mlp(), passes=[ScaleLinears(1.0), Freeze()], example_inputs=(torch.randn(2, 8),))
    assert [r.name for r in cm.report] == ["test_scale_linears", "test_freeze"]
    assert cm.report["test_scale_linears"].stats["linears"] == 2
    assert cm.report["test_scale_linears"].stats["equivalence_rel_error"] == 0.0
    assert cm.report["test_freeze"].modified is False
    assert "test_scale_linears" in str(cm.report)


def test_function_preserving_pass_that_changes_outputs_is_caught_and_named():
    with pytest.raises(PassError, match=r"'test_scale_linears' failed \(passes run before it: none\).*changed the outputs"):
        fxpress.compile(_mlp(), passes=[ScaleLinears(2.0)], example_inputs=(torch.randn(2, 8),))


def test_invalid_order_is_rejected_before_any_work():
    with pytest.raises(PassOrderError, match="'test_scale_linears' cannot run after 'test_freeze'"):
        fxpress.compile("this-model-does-not-exist", passes=[Freeze(), ScaleLinears()])


def test_bad_field_value_is_rejected_before_any_work():
    with pytest.raises(ConfigError, match=r"test_scale_linears\.factor = 99 is out of range"):
        fxpress.compile("this-model-does-not-exist", passes=[ScaleLinears(99)])


def test_recipe_round_trips_through_json_and_yaml(tmp_path):
    passes = [ScaleLinears(0.5), Freeze()]
    for name in ("r.json", "r.yaml"):
        path = save_recipe(passes, tmp_path / name)
        again = load_recipe(path)
        assert recipe_dict(again) == recipe_dict(passes)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passes"][0] == {"type": "test_scale_linears", "version": 1, "fields": {"factor": 0.5}}


def test_recipe_with_unknown_pass_fails_with_one_line_naming_it():
    with pytest.raises(RecipeError) as err:
        passes_from_recipe({"passes": [{"type": "rotatee"}]})
    assert "unknown pass 'rotatee'" in str(err.value) and "\n" not in str(err.value)


def test_recipe_with_unknown_field_fails_naming_it_and_the_known_fields():
    with pytest.raises(RecipeError, match=r"'test_scale_linears' has no field 'factr': its fields are factor"):
        passes_from_recipe([{"type": "test_scale_linears", "fields": {"factr": 2}}])


def test_recipe_with_wrong_version_is_rejected():
    with pytest.raises(RecipeError, match="version"):
        passes_from_recipe([{"type": "test_scale_linears", "version": 7, "fields": {}}])


# -- pass order as declared facts ---------------------------------------------------------------
# The order rules as they were before facts: each pass listed the passes that must not run before it.
OLD_NOT_AFTER = {
    "rotate": ("quantize", "quantize_experts", "fold_hadamard", "threshold_neurons", "prune_tokens"),
    "fold_hadamard": ("quantize", "quantize_experts", "fold_hadamard", "threshold_neurons", "prune_tokens"),
    "quantize": ("quantize",),
    "quantize_experts": ("quantize", "quantize_experts"),
    "prune_tokens": (),
    "threshold_neurons": (),
    "precision": (),
}


def _old_rule_allows(names: tuple[str, ...]) -> bool:
    return not any(earlier in OLD_NOT_AFTER[later] for i, later in enumerate(names) for earlier in names[:i])


def _facts_allow(names: tuple[str, ...]) -> bool:
    try:
        validate_pipeline([PASS_REGISTRY[n]() for n in names])
    except PassOrderError:
        return False
    return True


def test_declared_facts_reject_exactly_the_orders_the_old_lists_rejected():
    builtin = sorted(set(PASS_REGISTRY) - {ScaleLinears.name, Freeze.name})
    assert builtin == sorted(OLD_NOT_AFTER)
    orders = [*itertools.product(builtin, repeat=2), *itertools.product(builtin, repeat=3)]
    disagree = [o for o in orders if _old_rule_allows(o) != _facts_allow(o)]
    assert not disagree
    assert not _facts_allow(("quantize", "rotate")) and _facts_allow(("rotate", "fold_hadamard", "quantize"))


def test_order_error_names_the_pass_the_missing_fact_and_who_invalidated_it():
    with pytest.raises(PassOrderError) as err:
        validate_pipeline([fxpress.passes.Quantize(), fxpress.passes.Rotate()])
    message = str(err.value)
    assert "'rotate' cannot run after 'quantize': list 'rotate' before 'quantize'" in message
    assert "float_linears" in message and "\n" not in message
    with pytest.raises(PassOrderError, match="'quantize' cannot run twice"):
        validate_pipeline([fxpress.passes.Quantize()], history=["quantize"])


@dataclass
class NeedsRotation(Pass):
    """Test pass (not registered) that only makes sense on a rotated residual stream."""

    name: ClassVar[str] = "test_needs_rotation"
    requires: ClassVar[frozenset[str]] = frozenset({ROTATED})

    def run(self, program):
        return {"modified": False}


def test_a_fact_no_earlier_pass_established_names_the_passes_that_do():
    with pytest.raises(PassOrderError, match="'test_needs_rotation' requires rotated .*run 'rotate' before it"):
        validate_pipeline([NeedsRotation()])
    validate_pipeline([fxpress.passes.Rotate(), NeedsRotation()])


def test_registering_a_pass_with_an_unknown_fact_fails():
    @dataclass
    class Typo(Pass):
        name: ClassVar[str] = "test_typo"
        requires: ClassVar[frozenset[str]] = frozenset({"float_linear"})

    with pytest.raises(TypeError, match="unknown facts \\['float_linear'\\]"):
        register_pass(Typo)
    assert "test_typo" not in PASS_REGISTRY


def test_compiled_and_reloaded_programs_keep_their_facts(tmp_path):
    cm = fxpress.compile(_mlp(), passes=[Freeze()], example_inputs=(torch.randn(2, 8),))
    assert FLOAT_LINEARS not in cm.program.facts
    with pytest.raises(PassOrderError, match="'test_scale_linears' cannot run after 'test_freeze'"):
        run_passes(cm.program, [ScaleLinears()])
    saved = cm.save(tmp_path / "prog")
    assert fxpress.load(saved).program.facts == cm.program.facts
    manifest = json.loads((saved / "manifest.json").read_text())
    del manifest["facts"]  # as saved before facts were recorded: they are derived from the history
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PassOrderError, match="'test_scale_linears' cannot run after 'test_freeze'"):
        run_passes(fxpress.load(saved).program, [ScaleLinears()])


# -- nested config groups and versioned recipes ---------------------------------------------------
@dataclass
class WeightGroup:
    bits: int = 4
    group_size: int | None = None


@dataclass
class Grouped(Pass):
    """Test pass with a config group; version 1 had a flat `bits` field."""

    name: ClassVar[str] = "test_grouped"
    version: ClassVar[int] = 2
    upgrades: ClassVar[list[int]] = []
    weights: WeightGroup = field(default_factory=WeightGroup)
    scale: float = 1.0

    @classmethod
    def upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        cls.upgrades.append(version)
        return {**{k: v for k, v in fields.items() if k != "bits"}, "weights": {"bits": fields["bits"]}}

    def run(self, program):
        return {"modified": False}


@pytest.fixture
def grouped():
    register_pass(Grouped)
    Grouped.upgrades.clear()
    yield Grouped
    PASS_REGISTRY.pop(Grouped.name, None)


def test_config_group_is_built_from_a_mapping_and_round_trips(grouped):
    p = passes_from_recipe([{"type": "test_grouped", "fields": {"weights": {"bits": 3, "group_size": 64}}}])[0]
    assert p.weights == WeightGroup(bits=3, group_size=64) and p.scale == 1.0
    assert p.to_dict() == {"type": "test_grouped", "version": 2, "fields": {"weights": {"bits": 3, "group_size": 64}, "scale": 1.0}}
    assert passes_from_recipe([p.to_dict()])[0] == p


def test_unknown_key_in_a_config_group_names_pass_group_and_key(grouped):
    with pytest.raises(RecipeError, match=r"'test_grouped\.weights' has no field 'bitz': its fields are bits, group_size"):
        passes_from_recipe([{"type": "test_grouped", "fields": {"weights": {"bitz": 3}}}])


def test_wrong_type_in_a_config_group_names_pass_group_and_field(grouped):
    with pytest.raises(RecipeError, match=r"test_grouped\.weights\.bits = 'four' has the wrong type: expected int"):
        passes_from_recipe([{"type": "test_grouped", "fields": {"weights": {"bits": "four"}}}])
    with pytest.raises(RecipeError, match=r"test_grouped\.weights\.group_size = 1\.5 has the wrong type"):
        passes_from_recipe([{"type": "test_grouped", "fields": {"weights": {"group_size": 1.5}}}])
    with pytest.raises(RecipeError, match=r"test_grouped\.weights must be a mapping"):
        passes_from_recipe([{"type": "test_grouped", "fields": {"weights": 4}}])


def test_older_recipe_is_upgraded_by_the_pass(grouped):
    p = passes_from_recipe([{"type": "test_grouped", "version": 1, "fields": {"bits": 2, "scale": 0.5}}])[0]
    assert Grouped.upgrades == [1]
    assert p == Grouped(weights=WeightGroup(bits=2), scale=0.5)


def test_newer_recipe_than_the_pass_is_rejected(grouped):
    with pytest.raises(RecipeError, match="'test_grouped' is at version 2; the recipe asks for version 3"):
        passes_from_recipe([{"type": "test_grouped", "version": 3, "fields": {}}])
    assert Grouped.upgrades == []


@dataclass
class FreezeV2(Freeze):
    """Test pass at version 2 that does not say how to read version 1."""

    name: ClassVar[str] = "test_freeze_v2"
    version: ClassVar[int] = 2


def test_pass_that_bumps_its_version_without_an_upgrade_rejects_old_recipes():
    register_pass(FreezeV2)
    try:
        with pytest.raises(RecipeError, match="'test_freeze_v2' is at version 2 and cannot read recipes of version 1"):
            passes_from_recipe([{"type": "test_freeze_v2", "version": 1, "fields": {}}])
    finally:
        PASS_REGISTRY.pop(FreezeV2.name, None)


def test_registering_a_pass_without_run_fails_naming_it():
    @dataclass
    class NoRun(Pass):
        name: ClassVar[str] = "test_no_run"

    with pytest.raises(TypeError, match="NoRun cannot be registered: it does not define run"):
        register_pass(NoRun)
    assert "test_no_run" not in PASS_REGISTRY
