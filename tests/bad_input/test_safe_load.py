"""Crafted program.json files: code hidden in symbolic expressions, guards, range constraints or op targets must be
refused by `fxpress.load` with an ArtifactError naming the string and the file, and must never run (the marker
file each payload would create stays absent). Digests are rewritten so the validator, not the checksum, is tested.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactError
from fxpress.integrity import record_digests
from fxpress.zoo import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cm = fxpress.compile(tiny_causal_lm("llama"), passes=[], progress=False)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    return cm.save(tmp_path_factory.mktemp("genuine") / "prog"), ids, cm(ids)


def craft(saved_dir: Path, tmp_path: Path, edit: Callable[[dict], None], digests: bool = True) -> Path:
    """A copy of the saved program with program.json edited and the manifest's digests updated to match."""
    out = tmp_path / "crafted"
    shutil.copytree(saved_dir, out)
    data = json.loads((out / "program.json").read_text())
    edit(data)
    (out / "program.json").write_text(json.dumps(data))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["integrity"] = record_digests(out, ("program.json", "weights.safetensors")) if digests else None
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def touch(marker: Path) -> str:
    return f"__import__('pathlib').Path('{marker}').touch()"


def first_expr(data: dict) -> dict:
    values = data["graph_module"]["graph"]["sym_int_values"]
    return values[next(iter(values))]["as_expr"]


def refused(path: Path, marker: Path, names: str, ids: torch.Tensor) -> None:
    """Load must fail naming `names` and program.json, and nothing may have run."""
    with pytest.raises(ArtifactError, match=names) as err:
        loaded = fxpress.load(path)
        loaded(ids)  # only reached if the load wrongly succeeded: a guard payload runs on the first call
    assert "program.json" in str(err.value)
    assert not marker.exists()


EXPR_PAYLOADS = {
    "sympify_import": lambda e, m: f"{e} + 0*({touch(m)} is None)",
    "unicode_lookalike": lambda e, m: f"{e} + 0*(__𝐢𝐦𝐩𝐨𝐫𝐭__('pathlib').Path('{m}').touch() is None)",
    "attribute_access": lambda e, m: f"Symbol('s70').__class__.__init__.__globals__['os'].system('touch {m}')",
    "lambda": lambda e, m: f"(lambda: {touch(m)})()",
    "symbol_kwarg": lambda e, m: f"Symbol('s70', positive={touch(m)})",
    "symbol_name": lambda e, m: f"Symbol('__import__')('pathlib').Path('{m}').touch()",
    "unknown_function": lambda e, m: f"Function('eval')('{touch(m)}')",
}


@pytest.mark.parametrize("payload", sorted(EXPR_PAYLOADS))
def test_code_in_a_symbolic_expression_is_refused_and_never_runs(saved, tmp_path, payload):
    directory, ids, _ = saved
    marker = tmp_path / "marker"

    def edit(data):
        expr = first_expr(data)
        expr["expr_str"] = EXPR_PAYLOADS[payload](expr["expr_str"], marker)

    refused(craft(directory, tmp_path, edit), marker, "refusing expr_str", ids)


GUARD_PAYLOADS = {
    "appended_expression": lambda m: f"{touch(m)} is None",
    "guard_then_code": lambda m: f"L['input_ids'].size()[0] == 2 or {touch(m)}",
    "attribute_access": lambda m: f"L['input_ids'].__class__.__init__.__globals__['os'].system('touch {m}') == 0",
    "input_name_injection": lambda m: f"L['input_ids'] if {touch(m)} else 1",
    "builtin_call": lambda m: f"eval(\"{touch(m)}\") == 1",
}


@pytest.mark.parametrize("payload", sorted(GUARD_PAYLOADS))
def test_code_in_guards_is_refused_and_never_runs(saved, tmp_path, payload):
    directory, ids, _ = saved
    marker = tmp_path / "marker"
    path = craft(directory, tmp_path, lambda data: data["guards_code"].append(GUARD_PAYLOADS[payload](marker)))
    refused(path, marker, "refusing guards_code entry", ids)


@pytest.mark.parametrize("target", ["builtins.eval", "torch.os.system", "_operator.attrgetter", "math.os.system",
                                    "torch.ops.aten.__class__.mro", "torch.ops.evil.op.default", "#ext.op",
                                    "torch.ops.aten.add.Tensor\nimport os", "torch.ops.aten.аdd.Tensor"])
def test_op_targets_off_the_allow_list_are_refused(saved, tmp_path, target):
    directory, ids, _ = saved
    marker = tmp_path / "marker"

    def edit(data):
        nodes = data["graph_module"]["graph"]["nodes"]
        node = next(n for n in nodes if n["target"] == "torch.ops.aten.embedding.default")
        node["target"] = target

    refused(craft(directory, tmp_path, edit), marker, "refusing target", ids)


@pytest.mark.parametrize("bounds", [{"min_val": "__import__('os')", "max_val": 8192}, {"min_val": 1.5, "max_val": 2},
                                    {"min_val": 1, "max_val": 8192, "expr": "1"}])
def test_range_constraints_hold_only_integer_bounds(saved, tmp_path, bounds):
    directory, ids, _ = saved
    marker = tmp_path / "marker"
    refused(craft(directory, tmp_path, lambda data: data["range_constraints"].update(s70=bounds)), marker,
            "refusing range constraint 's70'", ids)
    evil_name = {"s70')+__import__('os": {"min_val": 1, "max_val": 2}}
    named = craft(directory, tmp_path / "named", lambda data: data["range_constraints"].update(evil_name))
    refused(named, marker, "refusing range constraint", ids)


def test_genuine_program_loads_with_identical_outputs_and_rebuilt_guards(saved):
    directory, ids, expected = saved
    loaded = fxpress.load(directory)
    assert torch.equal(loaded(ids), expected)
    empty = torch.zeros(2, 2, 2, 0, 16)
    with pytest.raises(AssertionError, match="Guard failed"):  # the rebuilt guards still check input shapes
        loaded.program.module(ids, empty[:, :1], empty)


# torch.export writes guards like this one for SmolLM2's KV cache (a length that may broadcast)
BROADCAST_GUARD = ("(L['input_ids'].size()[1] + L['past_keys'].size()[3]) == 1 or (L['past_values'].size()[3] + "
                   "L['input_ids'].size()[1]) == (L['input_ids'].size()[1] + L['past_keys'].size()[3])")


def test_guards_joined_by_or_and_not_load_and_still_check(saved, tmp_path):
    directory, ids, expected = saved
    holds = craft(directory, tmp_path / "holds", lambda data: data["guards_code"].append(BROADCAST_GUARD))
    assert torch.equal(fxpress.load(holds)(ids), expected)
    fails = "L['input_ids'].size()[0] == 3 or not (L['input_ids'].size()[1] == 7 and L['input_ids'].size()[0] > 1)"
    loaded = fxpress.load(craft(directory, tmp_path / "fails", lambda data: data["guards_code"].append(fails)))
    with pytest.raises(AssertionError, match="Guard failed"):  # ids are 2 x 7: both sides of the `or` are false
        loaded(ids)


def test_artifacts_without_digests_load_with_a_warning_and_are_still_validated(saved, tmp_path):
    directory, ids, expected = saved
    old = craft(directory, tmp_path / "old", lambda data: None, digests=False)
    with pytest.warns(UserWarning, match="no recorded digests"):
        assert torch.equal(fxpress.load(old)(ids), expected)
    marker = tmp_path / "marker"
    crafted = craft(directory, tmp_path, lambda data: data["guards_code"].append(f"{touch(marker)} is None"),
                    digests=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused(crafted, marker, "refusing guards_code", ids)


def test_the_payloads_are_live_without_the_validator(saved, tmp_path, monkeypatch):
    """Control: with the validator switched off, torch's deserializer runs both payloads (so the tests above can fail)."""
    import fxpress.serialize

    directory, ids, _ = saved
    monkeypatch.setattr(fxpress.serialize, "safe_program_json", lambda raw, path: raw)
    expr_marker, guard_marker = tmp_path / "expr", tmp_path / "guard"

    def edit(data):
        expr = first_expr(data)
        expr["expr_str"] = EXPR_PAYLOADS["sympify_import"](expr["expr_str"], expr_marker)
        data["guards_code"].append(f"{touch(guard_marker)} is None")

    crafted = craft(directory, tmp_path, edit)
    try:
        fxpress.load(crafted)(ids)
    except Exception:  # noqa: BLE001 - the guard payload makes the guard fail after it ran
        pass
    assert expr_marker.exists() and guard_marker.exists()


def test_deep_nesting_custom_objects_and_unknown_verifiers_are_refused(saved, tmp_path):
    directory, ids, _ = saved
    marker = tmp_path / "marker"

    def deep(data):
        first_expr(data)["expr_str"] = "(" * 5000 + "s70" + ")" * 5000

    refused(craft(directory, tmp_path / "deep", deep), marker, "nested too deeply", ids)
    objects = {"evil": {"name": "evil", "class_fqn": "__torch__.torch.classes.os.system"}}
    custom = craft(directory, tmp_path / "custom", lambda d: d["graph_module"]["graph"]["custom_obj_values"].update(objects))
    refused(custom, marker, "refusing custom_obj_values", ids)
    verifiers = craft(directory, tmp_path / "verifiers", lambda d: d.update(verifiers=["__import__('os')"]))
    refused(verifiers, marker, "refusing verifiers", ids)


def test_manifest_dtypes_must_be_torch_dtypes(saved, tmp_path):
    directory, _, _ = saved
    crafted = Path(shutil.copytree(directory, tmp_path / "dtypes"))
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["example_dtypes"][0] = "torch.load"
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json: example_dtypes holds 'torch.load'"):
        fxpress.load(crafted)
