"""Rotated fp32 programs (rotate + fold_hadamard: R1-R4) in ONNX Runtime and TVM match PyTorch.

SmolLM2's figure (exports take minutes) is in benchmarks/results/lowering.md (`bench_lowering.py --rotated`).
"""

from __future__ import annotations

import pytest
import torch

from fxpress.capture import capture
from fxpress.passes import FoldHadamard, Rotate
from fxpress.passes.manager import run_passes
from fxpress.runtime.runners import load_runner
from fxpress.zoo import tiny_causal_lm


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def rotated_llama():
    program = capture(tiny_causal_lm("llama"))
    run_passes(program, [Rotate(), FoldHadamard()], progress=False)
    assert any("hadamard" in str(n.target) for n in program.module.graph.nodes)  # R3/R4 run online
    return program


@pytest.mark.parametrize("target", ["onnx", "tvm"])
def test_rotated_fp32_llama_matches_pytorch_with_its_online_hadamards(tmp_path, rotated_llama, target):
    pytest.importorskip("onnxruntime" if target == "onnx" else "tvm")
    program = rotated_llama
    path = tmp_path / ("m.onnx" if target == "onnx" else "m_tvm")
    if target == "onnx":
        from fxpress.lowering.onnx import export_onnx

        export_onnx(program, path)
    else:
        from fxpress.lowering.tvm import export_tvm

        export_tvm(program, path)
    runner = load_runner(path)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    expected = program(ids)
    actual = runner(ids)
    assert _rel(actual, expected) < 1e-5
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
