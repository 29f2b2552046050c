"""Precision(float64): the same function in float64, and W4A4KV4 exports that agree with PyTorch code for code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from fxpress.calibration import Calibration, collect_activations  # noqa: E402
from fxpress.capture import capture  # noqa: E402
from fxpress.errors import ConfigError  # noqa: E402
from fxpress.passes import FoldHadamard, Precision, Quantize, Rotate, pass_from_dict, run_passes  # noqa: E402
from fxpress.passes.quantize import ActQuant, KVQuant, TableQuant, WeightQuant
from fxpress.runtime.runners import OnnxRunner, TorchRunner, TvmRunner  # noqa: E402
from fxpress.zoo import tiny_causal_lm  # noqa: E402

QUANTIZE_ACT = torch.ops.fxpress.quantize_act.default


def _ids(vocab: int, rows: int = 3, cols: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def _code_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| per row in units of the row's 4-bit step (range / 15): a flipped code is >= 1, while
    equal codes differ only by the ~1e-16 rounding of their float64 scales."""
    step = (expected.max(-1, keepdims=True) - expected.min(-1, keepdims=True)) / 15
    return float((np.abs(got - expected) / np.where(step > 0, step, 1.0)).max())


@pytest.fixture(scope="module")
def w4a4kv4():
    """A tiny rotated Llama, W4A4KV4 (asymmetric A4, searched clips, 4-bit tied table), in float64; a budget of
    5 activation bits puts some quantizers at 8, so the lowerings meet mixed precision too."""
    program = capture(tiny_causal_lm("llama", seed=0))
    program.calibration = Calibration(_ids(program.info.vocab_size, 8, 32, seed=0))
    run_passes(program, [Rotate(), FoldHadamard(),
                         Quantize(weights=WeightQuant(bits=4),
                                  activations=ActQuant(bits=4, clip_search=True, symmetric=False, avg_bits=5.0),
                                  kv_cache=KVQuant(bits=4, clip_ratio=0.95),
                                  tables=TableQuant(embedding_bits=4, group_size=32)),
                         Precision()], progress=False)
    return program


@pytest.fixture(scope="module")
def onnx_artifact(w4a4kv4, tmp_path_factory):
    from fxpress.lowering.onnx import export_onnx

    path = tmp_path_factory.mktemp("precision") / "m.onnx"
    stats = export_onnx(w4a4kv4.clone(), path)
    return path, stats


def test_float64_program_computes_the_float32_function():
    program = capture(tiny_causal_lm("llama", seed=0))
    ids = _ids(program.info.vocab_size)
    ref = program(ids)
    results = run_passes(program, [Precision()], progress=False)
    out = program(ids)  # float32 empty caches still work: inputs are cast on entry
    assert out.dtype == torch.float64 and _rel(out, ref) < 1e-5
    assert program.info.torch_activation_dtype == torch.float64
    stats = results[0].stats
    assert stats["tensors_converted"] > 0 and stats["dtype_args_rewritten"] > 0 and stats["inputs_cast"] == 2
    assert all(t.dtype != torch.float32 for t in program.module.state_dict().values())
    logits, keys, values = program.run(ids, *program.empty_cache(ids.shape[0], torch.float64))
    assert keys.dtype == values.dtype == torch.float64


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", 64])
def test_unsupported_dtype_is_a_config_error_before_work(dtype):
    program = capture(tiny_causal_lm("llama", seed=0))
    before = [n.name for n in program.graph.nodes]
    with pytest.raises(ConfigError, match="float64"):
        run_passes(program, [Rotate(), Precision(dtype=dtype)], progress=False)
    assert [n.name for n in program.graph.nodes] == before and not program.history


def test_recipe_round_trip():
    p = pass_from_dict(Precision().to_dict())
    assert isinstance(p, Precision) and p.dtype == "float64"


def test_onnx_float64_matches_pytorch_code_for_code(w4a4kv4, onnx_artifact):
    """Every quantize_act output of the artifact has PyTorch's codes, and the logits agree to ~1e-15."""
    import onnx

    path, stats = onnx_artifact
    assert stats["exact_float64"] > 0 and stats["matmulnbits"] == 0
    assert {n.args[1] for n in w4a4kv4.graph.nodes if n.target is QUANTIZE_ACT} == {4, 8}
    ids = _ids(w4a4kv4.info.vocab_size)
    names = [n.name for n in w4a4kv4.graph.nodes if n.target is QUANTIZE_ACT]
    model = onnx.load(path)
    exposed = [o for node in model.graph.node if node.op_type.startswith("QuantizeAct") for o in node.output]
    assert len(exposed) == len(names) > 0  # the re-export renames values: match them by content below
    for name in exposed:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.DOUBLE, None))
    probe = path.with_name("probe.onnx")
    onnx.save(model, probe)
    runner = OnnxRunner(probe, threads=1)
    past = dict(zip(("past_keys", "past_values"), (t.numpy() for t in runner.empty_cache(ids.shape[0]))))
    outs = runner.session.run(None, {"input_ids": ids.numpy(), **past})[3:]
    expected = [t[0].numpy() for t in collect_activations(w4a4kv4, names, [ids]).values()]
    for name, got in zip(exposed, outs):
        assert got.dtype == np.float64
        assert min(_code_error(got, e) for e in expected if e.shape == got.shape) < 1e-9, f"{name}: a code differs"
    ref = w4a4kv4(ids)
    logits = OnnxRunner(path, threads=1)(ids)
    assert logits.dtype == torch.float64
    assert (logits.argmax(-1) == ref.argmax(-1)).all() and _rel(logits, ref) < 1e-12


def test_tvm_float64_matches_pytorch(w4a4kv4, tmp_path):
    """A flipped 4-bit code moves the logits by > 1e-4 relative: at < 1e-12 every code agrees."""
    pytest.importorskip("tvm")
    from fxpress.lowering.tvm import export_tvm

    export_tvm(w4a4kv4.clone(), tmp_path / "tvm")
    runner = TvmRunner(tmp_path / "tvm")
    ids = _ids(w4a4kv4.info.vocab_size)
    ref = w4a4kv4(ids)
    logits = runner(ids)
    assert logits.dtype == torch.float64
    assert (logits.argmax(-1) == ref.argmax(-1)).all() and _rel(logits, ref) < 1e-12
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        runner(torch.tensor([[1, w4a4kv4.info.vocab_size]]))


def test_runners_reject_out_of_range_token_ids(w4a4kv4, onnx_artifact):
    vocab = w4a4kv4.info.vocab_size
    for runner in (TorchRunner(w4a4kv4), OnnxRunner(onnx_artifact[0], threads=1)):
        for bad in (vocab, -1):
            with pytest.raises(ConfigError, match=f"token id {bad} is outside"):
                runner(torch.tensor([[0, bad, 2]]))
        with pytest.raises(ConfigError, match="integer tensor"):
            runner(torch.zeros(1, 3))



def test_float64_ties_round_up_in_every_runtime(tmp_path):
    """Exact ties round up in float64 (margin 2^-30; float32 keeps half-to-even), the same in all three runtimes."""
    from _lowering_cases import ties_inputs, ties_program

    from fxpress.lowering.onnx import export_onnx
    from fxpress.lowering.tvm import export_tvm

    row = torch.tensor([[7.0, 2.5, -2.5, 0.5]])
    assert torch.ops.fxpress.quantize_act(row, 4, 1.0, True).tolist() == [[7.0, 2.0, -2.0, 0.0]]
    assert torch.ops.fxpress.quantize_act(row.double(), 4, 1.0, True).tolist() == [[7.0, 3.0, -2.0, 1.0]]
    program = ties_program()
    run_passes(program, [Precision()], progress=False)
    x = ties_inputs(64).double()
    ref = program(x)
    export_onnx(program.clone(), tmp_path / "ties.onnx")
    assert torch.equal(OnnxRunner(tmp_path / "ties.onnx", threads=1)(x), ref)
    pytest.importorskip("tvm")
    export_tvm(program.clone(), tmp_path / "tvm")
    assert torch.equal(TvmRunner(tmp_path / "tvm")(x), ref)
