"""The pass contract: registry, recipes that round-trip, validation before work, order, equivalence checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fxpress
from fxpress.errors import ConfigError, PassError, PassOrderError, RecipeError
from fxpress.passes.base import PASS_REGISTRY, Pass, check_range, register_pass
from fxpress.recipe import load_recipe, passes_from_recipe, recipe_dict, save_recipe


@dataclass
class ScaleLinears(Pass):
    """Test pass: scales every linear weight by `factor` (function-preserving only when factor == 1)."""

    name: ClassVar[str] = "test_scale_linears"
    preserves_function: ClassVar[bool] = True
    not_after: ClassVar[tuple[str, ...]] = ("test_freeze",)
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
    """Test pass that changes nothing; ScaleLinears must not run after it."""

    name: ClassVar[str] = "test_freeze"

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
