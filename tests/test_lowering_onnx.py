"""ONNX lowering: parity with PyTorch, real low-bit kernels, fxpress functions, KV cache, atomic artifacts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from _lowering_cases import grouped_program, ops_program, relative_error, ties_inputs, ties_program  # noqa: E402

from fxpress.capture import capture  # noqa: E402
from fxpress.errors import ArtifactError, ConfigError  # noqa: E402
from fxpress.lowering.onnx import export_onnx  # noqa: E402
from fxpress.runtime.generate import generate  # noqa: E402
from fxpress.runtime.runners import OnnxRunner, TorchRunner, load_runner  # noqa: E402
from fxpress.zoo import tiny_causal_lm  # noqa: E402


def _ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph.node]


@pytest.fixture(scope="module")
def tiny_llama():
    return capture(tiny_causal_lm("llama"))


CASES = {
    "w4g64": dict(),  # 4-bit asymmetric, g64, K = 576 = 9 * 64
    "w4_per_channel_sym": dict(block=576, zeros=False),  # re-blocked to 64 for MatMulNBits
    "w4_partial_block": dict(k=80, block=32),  # partial last block (80 = 2.5 * 32)
    "w2g32": dict(bits=2, block=32),
    "w8g16": dict(bits=8, k=64, block=16),
    "w3_fallback": dict(bits=3),  # no MatMulNBits kernel: DequantizeLinear with a warning
}


@pytest.mark.parametrize(
    "name,weights",
    [(name, "matmulnbits") for name in CASES]
    + [(name, "dequantizelinear") for name in ("w4g64", "w4_per_channel_sym", "w4_partial_block", "w2g32")],
)
def test_every_op_matches_pytorch(tmp_path, name, weights):
    case = CASES[name]
    program = ops_program(**case)
    stats = export_onnx(program, tmp_path / "ops.onnx", weights=weights)
    model = onnx.load(tmp_path / "ops.onnx")
    onnx.checker.check_model(model)
    kinds = _ops(model)
    if weights == "matmulnbits" and case.get("bits", 4) != 3:
        assert ("com.microsoft", "MatMulNBits") in kinds and stats["matmulnbits"] == 1
    else:
        assert ("", "DequantizeLinear") in kinds and stats["dequantizelinear"] == 1
    assert bool(stats["warnings"]) == (weights == "matmulnbits" and case.get("bits") == 3)
    assert {d for d, _ in kinds} <= {"", "com.microsoft", "fxpress"}
    x = torch.randn(5, 3, case.get("k", 576), generator=torch.Generator().manual_seed(0))  # a batch the export never saw
    expected = program(x)
    actual = OnnxRunner(tmp_path / "ops.onnx")(x)
    assert relative_error(actual, expected) < 1e-5


def test_activation_quantization_rounds_ties_like_pytorch(tmp_path):
    program = ties_program()
    export_onnx(program, tmp_path / "ties.onnx")
    x = ties_inputs()
    assert torch.equal(OnnxRunner(tmp_path / "ties.onnx")(x), program(x))


def test_packed_weights_shrink_the_file(tmp_path):
    w4 = export_onnx(ops_program(k=1024, n=256, block=32), tmp_path / "w4.onnx")
    w2 = export_onnx(ops_program(k=1024, n=256, block=32, bits=2), tmp_path / "w2.onnx")
    fp32_bytes = 1024 * 256 * 4
    assert w2["bytes"] < w4["bytes"] < fp32_bytes * 0.2


def test_hadamard_is_a_function_of_small_factors_not_a_dense_matmul(tmp_path):
    export_onnx(ops_program(), tmp_path / "ops.onnx")
    model = onnx.load(tmp_path / "ops.onnx")
    functions = {f.name: f for f in model.functions}
    hadamard = [f for name, f in functions.items() if name.startswith("Hadamard")]
    assert len(hadamard) == 1 and hadamard[0].domain == "fxpress"
    assert any(name.startswith("QuantizeAct_s4") for name in functions)
    assert any(name.startswith("QuantizeAct_a8") for name in functions)
    constants = [onnx.numpy_helper.to_array(a.t) for n in hadamard[0].node if n.op_type == "Constant" for a in n.attribute]
    matrices = [c for c in constants if c.ndim == 2]
    # normalised ±1 Sylvester factors (H_16 / 4): orthogonal, so the function needs no scaling pass of its own
    assert matrices and all(c.shape == (16, 16) and set(np.unique(c)) <= {-0.25, 0.25} for c in matrices)
    assert all(np.allclose(c @ c.T, np.eye(16)) for c in matrices)
    node_types = {n.op_type for n in hadamard[0].node}
    assert node_types <= {"Shape", "Constant", "Reshape", "MatMul", "Mul", "Cast", "Transpose", "Identity"}


def test_function_bodies_run_in_the_onnx_reference_evaluator(tmp_path):
    from onnx.reference import ReferenceEvaluator

    program = ops_program(k=64, n=32, block=16, bits=8)
    export_onnx(program, tmp_path / "ops.onnx", weights="dequantizelinear")
    x = torch.randn(2, 3, 64)
    out = ReferenceEvaluator(str(tmp_path / "ops.onnx")).run(None, {"input_0": x.numpy()})[0]
    assert relative_error(torch.from_numpy(out), program(x)) < 1e-5


@pytest.mark.parametrize("weights", ["matmulnbits", "dequantizelinear"])
def test_grouped_experts_match_pytorch(tmp_path, weights):
    program = grouped_program()
    export_onnx(program, tmp_path / "moe.onnx", weights=weights)
    runner = OnnxRunner(tmp_path / "moe.onnx")
    for rows in (3, 8, 11):  # fewer rows than offsets cover, exactly, and more (the rest are zero)
        x = torch.randn(rows, 64)
        assert relative_error(runner(x), program(x)) < 1e-5


def test_causal_lm_keeps_the_kv_cache_and_matches_pytorch(tmp_path, tiny_llama):
    path = tmp_path / "llama.onnx"
    export_onnx(tiny_llama, path)
    model = onnx.load(path)
    names = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    per_layer = [f"{kind}.{i}.{kv}" for i in range(2) for kv in ("key", "value") for kind in ("past_key_values",)]
    assert names == (["input_ids", "attention_mask", *per_layer],  # onnxruntime-genai's I/O
                     ["logits", *(n.replace("past_key_values", "present") for n in per_layer)])
    dims = [d.dim_param or d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "past"
    # the causal mask is additive: no all-masked-row guard over every attention score (IsNaN + Where per layer)
    assert ("", "IsNaN") not in _ops(model)
    runner, ref = OnnxRunner(path), TorchRunner(tiny_llama)
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    full = ref(ids)
    assert relative_error(runner(ids), full) < 1e-5
    logits, keys, values = runner.step(ids[:, :7], *runner.empty_cache(3))
    logits2, keys2, _ = runner.step(ids[:, 7:], keys, values)
    assert keys2.shape[3] == 11
    assert relative_error(logits2, full[:, 7:]) < 1e-5
    assert torch.equal(generate(runner, ids[:, :4], 12), generate(ref, ids[:, :4], 12))


def test_rotated_w4a4kv4_program_matches_pytorch_and_generates_the_same_tokens(tmp_path, tiny_llama):
    import copy

    from fxpress.calibration import Calibration
    from fxpress.passes import FoldHadamard, Quantize, Rotate
    from fxpress.passes.manager import run_passes
    from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant

    program = copy.deepcopy(tiny_llama)
    program.calibration = Calibration(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    run_passes(program, [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(bits=4, group_size=32),
                                                            activations=ActQuant(bits=4),
                                                            kv_cache=KVQuant(bits=4))],
               progress=False)
    stats = export_onnx(program, tmp_path / "w4a4kv4.onnx")
    assert stats["matmulnbits"] == 14 and stats["functions"] >= 3
    runner, ref = OnnxRunner(tmp_path / "w4a4kv4.onnx"), TorchRunner(program)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    full = ref(ids)
    assert relative_error(runner(ids), full) < 1e-4
    logits, keys, values = runner.step(ids[:, :6], *runner.empty_cache(2))
    assert relative_error(runner.step(ids[:, 6:], keys, values)[0], full[:, 6:]) < 1e-4
    assert torch.equal(generate(runner, ids[:, :3], 8), generate(ref, ids[:, :3], 8))


def test_atomic_write_and_clear_errors(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="weight format"):
        export_onnx(tiny_llama, tmp_path / "m.onnx", weights="int4")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(tiny_llama, tmp_path / "m.onnx", opset=20)
    with pytest.raises(ConfigError, match=".onnx"):
        export_onnx(tiny_llama, tmp_path / "m.bin")
    assert not os.listdir(tmp_path)  # errors come before any work
    path = tmp_path / "m.onnx"
    export_onnx(ops_program(k=64, n=32, block=16), path)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary files left behind
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        load_runner(tmp_path / "cut.onnx")
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ArtifactError, match="not an fxpress artifact"):
        load_runner(tmp_path / "foreign.onnx")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_runner(tmp_path / "missing.onnx")


def test_large_weights_go_to_external_data(tmp_path):
    program = ops_program(k=64, n=32, block=16)
    stats = export_onnx(program, tmp_path / "ext.onnx", external_data=True)
    assert stats["external_data"] and len(list(tmp_path.glob("ext.onnx.*.data"))) == 1  # named per export
    onnx.checker.check_model(str(tmp_path / "ext.onnx"))
    x = torch.randn(2, 3, 64)
    assert relative_error(OnnxRunner(tmp_path / "ext.onnx")(x), program(x)) < 1e-5


@pytest.mark.slow
def test_smollm2_onnx_matches_pytorch_and_generates_the_same_tokens(tmp_path, smollm2_program, eval_windows):
    path = tmp_path / "smollm2.onnx"
    export_onnx(smollm2_program, path)
    runner, ref = OnnxRunner(path), TorchRunner(smollm2_program)
    windows = eval_windows[:2, :64]
    expected = ref(windows)
    actual = runner(windows)
    assert relative_error(actual, expected) <= 1e-3
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.99
    prompt = eval_windows[:1, :24]
    assert torch.equal(generate(runner, prompt, 12), generate(ref, prompt, 12))


# --- helper B (session 2): quantize_act codes across runtimes ---------------------------------------------
def test_searched_activation_quantizers_give_pytorchs_codes_on_real_activations(tmp_path):
    """Same inputs, same codes: the ONNX function computes the scale, division, clip and half-to-even
    rounding in PyTorch's order, for every clip ratio the search chose (arbitrary floats like 0.65)."""
    from _act_cases import searched_act_case

    program, rows = searched_act_case()  # searched symmetric activations and asymmetric KV configurations
    export_onnx(program, tmp_path / "acts.onnx")
    assert torch.equal(OnnxRunner(tmp_path / "acts.onnx", threads=1)(rows), program(rows))
