"""GPTQ's Cholesky failure names the layer and the cause: NaN/inf weights, a NaN Hessian, or too little damp."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import ConfigError, FxpressError
from fxpress.passes.quantize.config import WeightQuant
from fxpress.passes.quantize.gptq import WeightSpec, gptq, hessian
from fxpress.passes.quantize.quantize import Quantize
from fxpress.zoo import tiny_causal_lm

SPEC = WeightSpec(bits=4, group_size=-1, symmetric=False)


def _inputs(k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, k, generator=generator)
    h, _ = hessian(torch.randn(64, k, generator=generator))
    return weight, h


def test_well_conditioned_inputs_quantize():
    weight, h = _inputs()
    assert gptq(weight, h, SPEC, name="layer.q").dequantize().shape == weight.shape


def test_nan_weight_is_named_with_its_layer_and_position():
    weight, h = _inputs()
    weight[3, 5] = float("nan")
    weight[4, 0] = float("inf")
    with pytest.raises(FxpressError, match=r"GPTQ on layers\.0\.q_proj\.weight: its weight has 2 NaN/inf values "
                                           r"\(first at row 3, column 5\)"):
        gptq(weight, h, SPEC, name="layers.0.q_proj.weight")


def test_nan_hessian_names_the_calibration_activations():
    weight, h = _inputs()
    h[2, 2] = float("inf")
    with pytest.raises(FxpressError, match=r"layers\.1\.down\.weight: the Hessian of its calibration inputs has NaN/inf"):
        gptq(weight, h, SPEC, name="layers.1.down.weight")


def test_an_indefinite_hessian_suggests_a_larger_damp():
    weight, h = _inputs(4)
    h = torch.eye(4, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 5.0  # eigenvalues 6 and -4: no dampening of 1% of the diagonal fixes it
    with pytest.raises(ConfigError, match=r"GPTQ on mlp\.up\.weight: .*not positive definite.*"
                                          r"quantize\.weights\.damp \(now 0\.01, e\.g\. 0\.1\)"):
        gptq(weight, h, SPEC, damp=0.01, name="mlp.up.weight")
    with pytest.raises(ConfigError, match=r"now 0\.0, e\.g\. 0\.01"):
        gptq(weight, h, SPEC, damp=0.0, name="mlp.up.weight")


def test_compile_names_the_linear_with_nan_weights():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    # PassError from GPTQ; a NaN check at capture (another branch) may name the same tensor first
    with pytest.raises(FxpressError, match=r"layers\.1\.mlp\.down_proj\.weight.*NaN"):
        fxpress.compile(model, passes=[Quantize(weights=WeightQuant(method="gptq", group_size=32))],
                        calibration=calib, verify=False, progress=False)
