"""The shipped Qwen2-MoE with a shared expert (fxpress/data/tiny_qwen2_moe/): it loads, fxpress captures its routed
and shared experts, and quantize_experts spends exactly its budget on the routed ones and keeps it close to fp32."""

from __future__ import annotations

import pytest
import torch

from fxpress.calibration import Calibration, program_inputs
from fxpress.capture import capture
from fxpress.data import token_windows
from fxpress.evaluate import perplexity
from fxpress.graph import expert_layers
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize_experts import ExpertBudget, QuantizeExperts

ROUTED_PARAMS = 4 * 8 * 3 * 128 * 256  # layers x routed experts x (gate, up, down) x hidden x expert width
FP32_PPL = 27.94  # the shipped weights on the first 4 x 128 "prose_eval" tokens (Genesis); 30.43 on all 390 windows


@pytest.fixture(scope="module")
def qwen2_moe():
    from fxpress.moe_model import load_tiny_qwen2_moe

    torch.manual_seed(0)
    return load_tiny_qwen2_moe()


def _ppl(fn, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return perplexity(fn, windows)


def _logits(program):
    def run(x: torch.Tensor) -> torch.Tensor:
        out = program.run(*program_inputs(program, x))
        return out[0] if isinstance(out, (tuple, list)) else out
    return run


def test_tiny_qwen2_moe_ships_with_a_shared_expert_and_its_own_vocabulary(qwen2_moe):
    model, tokenizer = qwen2_moe
    config = model.config
    assert config.model_type == "qwen2_moe" and config.shared_expert_intermediate_size == 256
    assert (config.num_experts, config.num_experts_per_tok, config.num_hidden_layers) == (8, 2, 4)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 6e6
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored fp16, computed fp32
    assert len(tokenizer) == 4096
    windows = token_windows(tokenizer, "prose_eval", 128, 4)
    assert int(windows.max()) < len(tokenizer) and float((windows == 0).float().mean()) < 0.05  # <unk> is rare
    ppl = _ppl(lambda x: model(input_ids=x).logits, windows)
    assert ppl == pytest.approx(FP32_PPL, abs=0.01), ppl  # uniform guessing would be 4096


def test_quantize_experts_spends_the_exact_budget_on_the_routed_experts(qwen2_moe):
    model, tokenizer = qwen2_moe
    program = capture(model)
    layers = expert_layers(program.module)
    assert len(layers) == 4
    for layer in layers:
        assert layer.fused and layer.num_experts == 8
        assert [u.name.split(".")[-2] for u in layer.shared] == ["gate_proj", "up_proj", "down_proj"]
        assert [g.name.split(".")[-2] for g in layer.gates] == ["shared_expert_gate"]
    windows = token_windows(tokenizer, "prose_eval", 128, 4)
    fp32 = _ppl(_logits(program), windows)
    assert fp32 == pytest.approx(FP32_PPL, abs=0.01)  # the captured program computes what the model does
    program.calibration = Calibration(token_windows(tokenizer, "prose_calib", 128, 8))
    run_passes(program, [QuantizeExperts(budget=ExpertBudget(avg_bits=3.0, trust_region=(0.0,)), verbose=False)])
    plan = program.metadata["quantize_experts"]
    hist = {int(b): n for b, n in plan["bits_histogram"].items()}
    assert sum(hist.values()) == ROUTED_PARAMS
    assert sum(b * n for b, n in hist.items()) // 8 == 1_179_648  # code bytes: exactly 3 bits per routed weight
    assert plan["avg_bits"] == 3.0 and len(plan["shared"]) == 12 and plan["shared_bits"] == 8
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("grouped_linear_nbit" in op for op in ops) == 4 * 2  # the fused gate_up and down of every layer
    assert sum("linear_nbit" in op and "grouped" not in op for op in ops) == 4 * 3  # the shared experts, 8 bits
    quantized = _ppl(_logits(program), windows)
    assert abs(quantized / fp32 - 1) < 0.03, (fp32, quantized)  # measured 27.60 against 27.94 on these 4 windows
