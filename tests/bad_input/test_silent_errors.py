"""No silent wrong results: NaN/inf, meta weights, non-tensor outputs, no-op passes and bad calibration are loud."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fxpress
from fxpress.calibration import Calibration, collect_activations
from fxpress.capture import capture
from fxpress.checks import non_finite
from fxpress.errors import CaptureError, ConfigError, PassError
from fxpress.passes import Quantize
from fxpress.passes.base import Pass
from fxpress.passes.manager import relative_error, run_passes
from fxpress.zoo import tiny_causal_lm


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


# -- weights at capture ------------------------------------------------------------------------------
@pytest.mark.parametrize("value,what", [(float("nan"), "1 NaN"), (float("inf"), "1 inf")])
def test_non_finite_weight_is_refused_at_compile_naming_the_parameter(value, what):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = value
    with pytest.raises(CaptureError, match=rf"weight 'model.layers.1.mlp.down_proj.weight' holds {what} among 8192 values"):
        fxpress.compile(model, passes=[Quantize()], progress=False)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = tiny_causal_lm("llama")
    with pytest.raises(CaptureError, match=r"weight 'model.embed_tokens.weight' is on the meta device.*Load the weights"):
        fxpress.compile(model, progress=False)


def test_uninitialised_lazy_module_is_refused():
    model = torch.nn.Sequential(torch.nn.LazyLinear(4))
    with pytest.raises(CaptureError, match=r"weight '0.weight' is not initialised \(a lazy module\)"):
        capture(model, (torch.randn(2, 8),))


def test_the_finite_scan_counts_exactly_and_is_not_fooled_by_an_overflowing_sum():
    halves = torch.full((1000,), 1000.0, dtype=torch.float16)  # the float16 sum would be inf
    big = torch.full((10,), 3e38)  # so would the float32 sum
    assert non_finite(halves) is None and non_finite(big) is None and non_finite(torch.ones(3, dtype=torch.long)) is None
    halves[3], big[0], big[1] = float("nan"), float("inf"), float("-inf")
    assert non_finite(halves) == "1 NaN among 1000 values"
    assert non_finite(big) == "2 inf among 10 values"


# -- outputs at capture ------------------------------------------------------------------------------
class _Outputs(torch.nn.Module):
    """Returns `kind` of output around one linear: a dict, a tuple with None, or a tuple with an int."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        y = self.linear(x)
        if self.kind == "dict":
            return {"scores": y, "hidden": y * 2}
        return (y, None) if self.kind == "none" else (y, 3)


@pytest.mark.parametrize("kind,pattern", [
    ("dict", r"_Outputs returns a dict with keys 'scores', 'hidden'; fxpress needs a tensor or a tuple of tensors"),
    ("none", r"_Outputs output\[1\] is None, not a tensor"),
    ("int", r"_Outputs output\[1\] is 3, not a tensor"),
])
def test_non_tensor_outputs_are_refused_at_capture(kind, pattern):
    with pytest.raises(CaptureError, match=pattern):
        fxpress.compile(_Outputs(kind), example_inputs=(torch.randn(2, 4),), progress=False)


def test_a_tuple_of_tensors_is_captured():
    class Two(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    cm = fxpress.compile(Two(), example_inputs=(torch.randn(2, 4),), progress=False)
    first, second = cm(torch.zeros(3, 4))
    assert torch.equal(first, torch.ones(3, 4)) and torch.equal(second, torch.zeros(3, 4))


# -- a pass's output ------------------------------------------------------------------------------------
@dataclass
class WriteValue(Pass):
    """Test pass: writes `value` into the first row of the last linear's weight (e.g. NaN, or a huge finite number)."""

    name: ClassVar[str] = "test_write_value"
    value: float = float("nan")

    def run(self, program):
        program.module.get_parameter("2.weight").data[0] = self.value
        return {}


@dataclass
class PreservingWriteValue(WriteValue):
    """The same, claiming to preserve the function: the equivalence check must not be fooled by NaN."""

    name: ClassVar[str] = "test_preserving_write_value"
    preserves_function: ClassVar[bool] = True


@pytest.mark.parametrize("verify", [True, False])
def test_a_pass_that_writes_nan_is_a_pass_error_naming_the_tensor(verify):
    with pytest.raises(PassError, match=r"'test_write_value' failed.*tensor '2.weight' holds 16 NaN among 64 values"):
        fxpress.compile(_mlp(), passes=[WriteValue()], example_inputs=(torch.randn(2, 8),), verify=verify, progress=False)


def test_a_pass_that_makes_the_output_overflow_is_a_pass_error_naming_the_output():
    with pytest.raises(PassError, match=r"'test_write_value' failed.*output 'output' holds .*inf"):
        fxpress.compile(_mlp(), passes=[WriteValue(3e38)], example_inputs=(torch.full((2, 8), 10.0),), progress=False)


def test_the_equivalence_check_treats_nan_as_failure():
    ref = torch.ones(2, 3)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.full((2, 3), float("nan")), ref) != relative_error(torch.full((2, 3), float("nan")), ref)
    assert not relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) <= 1.0
    assert not relative_error(ref, torch.tensor([[1.0, 1.0, float("inf")]] * 2)) <= 1.0
    with pytest.raises(PassError, match=r"'test_preserving_write_value' failed.*holds 16 NaN"):
        fxpress.compile(_mlp(), passes=[PreservingWriteValue()], example_inputs=(torch.randn(2, 8),), progress=False)


# -- passes with nothing to do --------------------------------------------------------------------------
def test_quantize_on_a_conv_net_warns_in_the_report_and_on_the_console():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)).eval()
    with pytest.warns(UserWarning, match=r"pass 'quantize' changed nothing: no linear layer, KV cache or embedding table"):
        cm = fxpress.compile(conv, passes=[Quantize()], example_inputs=(torch.randn(2, 3, 8, 8),), progress=False)
    result = cm.report["quantize"]
    assert result.modified is False
    assert any("no linear layer" in w for w in result.warnings)
    assert "warning [quantize]: no linear layer" in str(cm.report)


@dataclass
class DoNothing(Pass):
    """Test pass: reports that it modified nothing, without saying why."""

    name: ClassVar[str] = "test_do_nothing"

    def run(self, program):
        return {"modified": False}


def test_any_pass_that_modifies_nothing_warns_even_without_a_reason():
    with pytest.warns(UserWarning, match=r"pass 'test_do_nothing' changed nothing: it found nothing to do"):
        cm = fxpress.compile(_mlp(), passes=[DoNothing()], example_inputs=(torch.randn(2, 8),), progress=False)
    assert cm.report["test_do_nothing"].warnings == ["it found nothing to do: the program is unchanged"]


def test_quantize_on_an_mlp_does_not_warn(recwarn):
    cm = fxpress.compile(_mlp(), passes=[Quantize()], example_inputs=(torch.randn(2, 8),), progress=False)
    assert cm.report["quantize"].modified is True
    assert not [w for w in recwarn if "changed nothing" in str(w.message)]


# -- calibration, up front --------------------------------------------------------------------------------
def _compile_with(calibration):
    return fxpress.compile(tiny_causal_lm("llama"), passes=[], calibration=calibration, progress=False)


def test_calibration_ids_outside_the_vocabulary_name_the_sample():
    ids = torch.randint(0, 256, (4, 12))
    ids[2, 5] = 300
    with pytest.raises(ConfigError, match=r"calibration\[2\]: token id 300 is outside the model's vocabulary \[0, 256\)"):
        _compile_with(ids)
    ids[2, 5] = -1
    with pytest.raises(ConfigError, match=r"calibration\[2\]: token id -1 is outside"):
        _compile_with(ids)


def test_float_calibration_for_a_language_model_is_refused():
    with pytest.raises(ConfigError, match=r"calibration must be an integer tensor.*got torch.float32"):
        _compile_with(torch.rand(4, 12))


def test_calibration_samples_of_unequal_lengths_name_the_sample():
    samples = [torch.randint(0, 256, (12,)), torch.randint(0, 256, (12,)), torch.randint(0, 256, (9,))]
    with pytest.raises(ConfigError, match=r"calibration\[2\] has shape \(9,\).*calibration\[0\] has \(12,\).*equal lengths"):
        _compile_with(samples)


@pytest.mark.parametrize("empty,pattern", [
    ([], r"calibration is an empty list"),
    (torch.zeros(0, 12, dtype=torch.long), r"calibration must be a non-empty tensor"),
])
def test_empty_calibration_is_refused_before_capture(empty, pattern, monkeypatch):
    monkeypatch.setattr(fxpress.compiled, "capture", lambda *a, **k: pytest.fail("captured before checking calibration"))
    with pytest.raises(ConfigError, match=pattern):
        _compile_with(empty)


def test_calibration_longer_than_the_model_is_refused():
    with pytest.raises(ConfigError, match=r"calibration needs 600 positions.*limit of 512: use shorter calibration windows"):
        _compile_with(torch.randint(0, 256, (2, 600)))


def test_non_finite_calibration_for_a_generic_model_names_the_sample():
    data = torch.randn(4, 8)
    data[3, 1] = float("inf")
    with pytest.raises(ConfigError, match=r"calibration sample 'calibration\[3\]' holds 1 inf"):
        fxpress.compile(_mlp(), example_inputs=(torch.randn(2, 8),), calibration=data, progress=False)


def test_non_finite_calibration_activations_name_the_node_and_batch():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # finite weights whose products overflow
    program = capture(model, (torch.randn(2, 8),))
    program.calibration = Calibration(torch.cat([torch.zeros(4, 8), torch.full((4, 8), 1e10)]), batch_size=4)
    node = next(n for n in program.graph.nodes if n.target is torch.ops.aten.linear.default)
    with pytest.raises(ConfigError, match=rf"on calibration batch 1 the activation '{node.name}' holds .*inf"):
        collect_activations(program, [node.name])


def test_run_passes_validates_calibration_too():
    program = capture(tiny_causal_lm("llama"))
    program.calibration = Calibration(torch.full((2, 8), 999))
    with pytest.raises(ConfigError, match=r"calibration\[0\]: token id 999 is outside"):
        run_passes(program, [], progress=False)
