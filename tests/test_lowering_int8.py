"""8-bit activation quantizers lowered to ONNX Runtime's int8 kernels (fusion.fuse_int8_activations, issue #15).

W8A8 becomes MatMulInteger on PyTorch's own int8 codes (exact integer products); W4A8 becomes MatMulNBits at
accuracy_level 4 (MLAS quantizes activations per block: close, not exact); what does not fit stays a fake quant.
SmolLM2's speed and perplexity: benchmarks/bench_int8.py.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from _lowering_cases import relative_error  # noqa: E402

from fxpress.calibration import Calibration  # noqa: E402
from fxpress.capture import capture  # noqa: E402
from fxpress.errors import ConfigError  # noqa: E402
from fxpress.lowering.onnx import export_onnx  # noqa: E402
from fxpress.passes import Quantize  # noqa: E402
from fxpress.passes.manager import run_passes  # noqa: E402
from fxpress.passes.quantize import ActQuant, WeightQuant  # noqa: E402
from fxpress.runtime.generate import generate  # noqa: E402
from fxpress.runtime.runners import OnnxRunner, TorchRunner  # noqa: E402
from fxpress.zoo import tiny_causal_lm  # noqa: E402

LINEARS = 14  # tiny llama: 2 layers x 7 linears (lm_head stays float)
IDS = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_llama():
    program = capture(tiny_causal_lm("llama"))
    program.calibration = Calibration(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    return program


def _quantized(program, weights: WeightQuant, activations: ActQuant):
    program = copy.deepcopy(program)
    run_passes(program, [Quantize(weights=weights, activations=activations)], progress=False)
    return program


def _export(program, path, **options) -> tuple[dict, onnx.ModelProto, Counter]:
    stats = export_onnx(program, path, **options)
    model = onnx.load(path)
    return stats, model, Counter((n.domain, n.op_type) for n in model.graph.node)


def _quantizers(ops: Counter) -> int:
    return sum(count for (domain, op), count in ops.items() if domain == "fxpress" and op.startswith("QuantizeAct"))


def _levels(model: onnx.ModelProto) -> Counter:
    """MatMulNBits per (bits, accuracy_level)."""
    levels = Counter()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            levels[(attrs["bits"], attrs.get("accuracy_level", 0))] += 1
    return levels


@pytest.mark.parametrize("symmetric_weights", [False, True])
def test_w8a8_runs_matmulinteger_on_pytorchs_codes(tmp_path, tiny_llama, symmetric_weights):
    program = _quantized(tiny_llama, WeightQuant(bits=8, group_size=-1, symmetric=symmetric_weights), ActQuant(bits=8))
    stats, model, ops = _export(program, tmp_path / "w8a8.onnx")
    # q/k/v and gate/up share one MatMulNBits each before the rewrite: 4 per layer, every quantizer gone
    assert stats["int8_matmulinteger"] == ops[("", "MatMulInteger")] == 8
    assert _quantizers(ops) == 0 and stats["int8_quantizers_kept"] == 0 and not model.functions
    assert _levels(model) == Counter()  # no 8-bit MatMulNBits left (lm_head is a float MatMul)
    zero_points = [len(n.input) == 4 for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert all(zero_points) != symmetric_weights and any(zero_points) != symmetric_weights
    # The codes and integer products are PyTorch's exactly; the float sum order and the final scale multiply
    # ((sum a*w) * w_scale * a_scale against sum (a*a_scale)*(w*w_scale)) differ by float32 rounding: ~3e-7 here.
    runner, ref = OnnxRunner(tmp_path / "w8a8.onnx"), TorchRunner(program)
    full = ref(IDS)
    assert relative_error(runner(IDS), full) < 2e-6
    logits, keys, values = runner.step(IDS[:, :7], *runner.empty_cache(3))
    assert relative_error(runner.step(IDS[:, 7:], keys, values)[0], full[:, 7:]) < 2e-6
    assert torch.equal(generate(runner, IDS[:, :4], 6), generate(ref, IDS[:, :4], 6))


@pytest.fixture(scope="module")
def w4a8(tiny_llama):
    return _quantized(tiny_llama, WeightQuant(bits=4, group_size=32), ActQuant(bits=8))


def test_w4a8_runs_matmulnbits_at_accuracy_level_4(tmp_path, tiny_llama, w4a8):
    stats, model, ops = _export(w4a8, tmp_path / "w4a8.onnx", int8_activations="all")
    assert stats["int8_matmulnbits_level4"] == 8 and _levels(model) == Counter({(4, 4): 8})
    assert _quantizers(ops) == 0 and stats["int8_matmulinteger"] == 0
    # MLAS quantizes each block of 32 activations to int8 with its own scale (PyTorch: one scale per row), so the
    # codes differ and the gap is one 8-bit activation quantization's noise: measured 1.03e-2 relative on these
    # random-weight logits, 1.02x the gap between the PyTorch program and the same weights without ActQuant
    # (W4A16). SmolLM2: benchmarks/bench_int8.py.
    full = TorchRunner(w4a8)(IDS)
    act_noise = relative_error(full, TorchRunner(_quantized(tiny_llama, WeightQuant(bits=4, group_size=32),
                                                            ActQuant()))(IDS))
    fused_error = relative_error(OnnxRunner(tmp_path / "w4a8.onnx")(IDS), full)
    assert 1e-4 < fused_error < min(1.5 * act_noise, 2e-2)


def test_w4a8_keeps_the_exact_fake_quant_by_default(tmp_path, w4a8):
    stats, model, ops = _export(w4a8, tmp_path / "exact.onnx")
    assert stats["int8_matmulnbits_level4"] == 0 and _levels(model) == Counter({(4, 0): 8})
    assert _quantizers(ops) == stats["int8_quantizers_kept"] == 8
    assert relative_error(OnnxRunner(tmp_path / "exact.onnx")(IDS), TorchRunner(w4a8)(IDS)) < 1e-5


@pytest.mark.parametrize("case", ["asymmetric_activations", "group_wise_w8"])
def test_unfusable_8bit_quantizers_stay_exact_fake_quant(tmp_path, tiny_llama, case):
    if case == "asymmetric_activations":  # MatMulInteger takes one zero point per tensor, not per row
        weights, activations = WeightQuant(bits=8, group_size=-1), ActQuant(bits=8, symmetric=False)
    else:  # one scale per 32 columns: one MatMulInteger per group would be needed
        weights, activations = WeightQuant(bits=8, group_size=32), ActQuant(bits=8)
    program = _quantized(tiny_llama, weights, activations)
    stats, model, ops = _export(program, tmp_path / f"{case}.onnx")
    assert ops[("", "MatMulInteger")] == stats["int8_matmulinteger"] == 0
    assert _quantizers(ops) == 8 and _levels(model) == Counter({(8, 0): 8})
    assert stats["int8_quantizers_kept"] == 8
    assert relative_error(OnnxRunner(tmp_path / f"{case}.onnx")(IDS), TorchRunner(program)(IDS)) < 1e-5


def test_int8_activations_option_is_checked(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="int8_activations"):
        export_onnx(tiny_llama, tmp_path / "m.onnx", int8_activations="fast")
