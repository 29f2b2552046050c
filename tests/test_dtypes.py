"""fp16/bf16 models compile: weights keep their dtype, the KV cache is in the model's dtype, outputs stay close.

Tolerances are in units of the dtype's eps (bf16 7.8e-3, fp16 9.8e-4), relative to the largest logit:
the program runs the same ATen ops as eager PyTorch, so a plain capture agrees to 2 eps; a rotation rounds
every rewritten weight back to the dtype once, which moves the logits by a few eps (the pass manager
allows 8, see passes/manager.py); 4-bit weights move them by ~0.12 whatever the dtype, so a half-precision
quantized program is held to the float32 program's quantization error plus 8 eps.
"""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import ConfigError, LoweringError
from fxpress.passes import FoldHadamard, Precision, Quantize, Rotate
from fxpress.passes.manager import NOISE_EPS, equivalence_tolerance, run_passes
from fxpress.passes.quantize.config import WeightQuant
from fxpress.zoo import tiny_causal_lm

HALF = (torch.bfloat16, torch.float16)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max())


def _eager(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _pipeline(method: str) -> list:
    return [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(method=method, group_size=32))]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_capture_keeps_the_model_dtype_and_a_kv_cache_in_it(dtype):
    model = tiny_causal_lm("llama").to(dtype)
    cm = fxpress.compile(model, passes=[], progress=False)
    program = cm.program
    assert program.info.activation_dtype == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in program.module.parameters()} == {dtype}
    keys, values = program.empty_cache(2)
    assert keys.dtype == values.dtype == dtype
    assert program.example_inputs[1].dtype == program.example_inputs[2].dtype == dtype
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    assert [n.meta["val"].dtype for n in placeholders[1:]] == [dtype, dtype]
    logits = cm(IDS)
    assert logits.dtype == dtype
    assert _rel(logits, _eager(model)) <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rotate_fold_quantize_in_half_precision(dtype, method):
    model = tiny_causal_lm("llama")
    float_cm = fxpress.compile(model, passes=_pipeline(method), calibration=CALIB, progress=False)
    float_error = _rel(float_cm(IDS), _eager(model))
    half = model.to(dtype)
    cm = fxpress.compile(half, passes=_pipeline(method), calibration=CALIB, progress=False)
    eps = torch.finfo(dtype).eps
    for result in cm.report.results[:2]:  # rotate, fold_hadamard: function kept within the dtype's noise
        assert result.stats["equivalence_rel_error"] <= NOISE_EPS * eps
    floats = {t.dtype for t in cm.program.module.parameters() if t.is_floating_point()}
    assert floats == {dtype}  # unquantized weights (norms, lm_head, embeddings) stay in the model's dtype
    assert cm.program.example_inputs[1].dtype == dtype
    logits = cm(IDS)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert _rel(logits, _eager(half)) <= float_error + NOISE_EPS * eps


def test_a_bf16_moe_model_compiles_with_gptq():
    model = tiny_causal_lm("qwen2_moe").to(torch.bfloat16)
    cm = fxpress.compile(model, passes=_pipeline("gptq"), calibration=CALIB, progress=False)
    assert cm.report.results[-1].stats["linears_quantized"] > 0
    assert {t.dtype for t in cm.program.module.parameters() if t.is_floating_point()} == {torch.bfloat16}
    assert _rel(cm(IDS), _eager(model)) < 0.3  # 4-bit weights of a random model: ~0.12 (float32 alike)


def test_equivalence_tolerance_widens_only_for_half_precision():
    rotate = Rotate()
    assert equivalence_tolerance(rotate, torch.zeros(1)) == rotate.tolerance
    assert equivalence_tolerance(rotate, torch.zeros(1, dtype=torch.float64)) == rotate.tolerance
    assert equivalence_tolerance(rotate, torch.zeros(1, dtype=torch.bfloat16)) == NOISE_EPS * 2.0**-7


def test_half_programs_save_and_load_in_their_dtype(tmp_path):
    cm = fxpress.compile(tiny_causal_lm("llama").to(torch.bfloat16), passes=_pipeline("rtn"), progress=False)
    loaded = fxpress.load(cm.save(tmp_path / "program"))
    assert loaded.program.info.activation_dtype == "bfloat16"
    assert {t.dtype for t in loaded.program.module.parameters() if t.is_floating_point()} == {torch.bfloat16}
    assert loaded.program.empty_cache(1)[0].dtype == torch.bfloat16
    assert torch.equal(loaded(IDS), cm(IDS))


def test_compile_dtype_casts_a_copy_and_rejects_non_float_types():
    model = tiny_causal_lm("llama")
    cm = fxpress.compile(model, passes=[], dtype=torch.float16, progress=False)
    assert cm.program.info.activation_dtype == "float16"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast in place
    assert _rel(cm(IDS), _eager(model)) < 8 * torch.finfo(torch.float16).eps
    with pytest.raises(ConfigError, match="dtype=torch.int8"):
        fxpress.compile(model, passes=[], dtype=torch.int8)


def test_fp16_runs_in_onnx_runtime_and_tvm_and_bf16_names_the_float32_export(tmp_path):
    from fxpress.runtime.runners import load_runner

    model = tiny_causal_lm("llama")
    cm = fxpress.compile(model, passes=[Quantize(weights=WeightQuant(group_size=32))], dtype="float16", progress=False)
    runner = load_runner(cm.export("onnx", tmp_path / "fp16.onnx"))
    assert _rel(runner(IDS), cm(IDS)) < 8 * torch.finfo(torch.float16).eps  # another summation order
    runner = load_runner(cm.export("tvm", tmp_path / "fp16_tvm"))
    assert _rel(runner(IDS), cm(IDS)) < 8 * torch.finfo(torch.float16).eps
    bf16 = fxpress.compile(model, passes=[Quantize(weights=WeightQuant(group_size=32))], dtype=torch.bfloat16,
                           progress=False)
    with pytest.raises(LoweringError, match=r"bfloat16.*Precision\(dtype='float32'\)"):
        bf16.export("onnx", tmp_path / "bf16.onnx")
    assert not (tmp_path / "bf16.onnx").exists()
    with pytest.raises(LoweringError, match="bfloat16, which TVM"):
        bf16.export("tvm", tmp_path / "bf16_tvm")
    assert not (tmp_path / "bf16_tvm").exists()
    run_passes(bf16.program, [Precision(dtype="float32")], progress=False)  # the fix the error names
    (tmp_path / "fp32").mkdir()  # one ONNX model per folder: its genai_config.json describes it
    runner = load_runner(bf16.export("onnx", tmp_path / "fp32" / "bf16_as_fp32.onnx"))
    assert _rel(runner(IDS), bf16(IDS)) < 1e-5
