"""Calibration-driven passes on store-backed programs give what they give in memory, or refuse clearly."""

from __future__ import annotations

import pytest
import torch

from fxpress.calibration import Calibration
from fxpress.capture import capture, capture_stored
from fxpress.errors import ConfigError
from fxpress.passes import Rotate
from fxpress.passes.manager import run_passes
from fxpress.passes.prune_tokens import PruneTokens, baselines
from fxpress.passes.quantize_experts import ExpertAnalysis, ExpertBudget, ExpertWeights, QuantizeExperts
from fxpress.passes.threshold_neurons import data as tn_data
from fxpress.runtime.runners import TorchRunner
from fxpress.zoo import tiny_causal_lm

BUDGET = 20_000  # bytes: well below every tiny model's weights, so the overlay spills


def _calibration(vocab: int = 256) -> Calibration:
    return Calibration(torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0)))


def _pair(family: str) -> tuple:
    """The same tiny model captured in memory and store-backed under a small budget, with one calibration."""
    model = tiny_causal_lm(family, seed=0)
    memory, stored = capture(model), capture_stored(model, budget=BUDGET)
    memory.calibration = stored.calibration = _calibration()
    assert stored.weights is not None and stored.weights.total_bytes() > BUDGET
    return memory, stored


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _same_result(memory, stored, ids: torch.Tensor) -> None:
    torch.testing.assert_close(stored(ids), memory(ids), rtol=0, atol=1e-6)


# --- quantize_experts ---------------------------------------------------------------------------------
EXPERT_SETTINGS = {
    "uniform-w4": QuantizeExperts(budget=ExpertBudget(avg_bits=4, allocation="uniform"), verbose=False),
    "uniform-gptq": QuantizeExperts(budget=ExpertBudget(avg_bits=4, allocation="uniform"),
                                    weights=ExpertWeights(method="gptq"), verbose=False),
    "frequency": QuantizeExperts(budget=ExpertBudget(avg_bits=3.0, allocation="frequency"), verbose=False),
    "moqa-output": QuantizeExperts(analysis=ExpertAnalysis(sensitivity="output", layer_calibration=True),
                                   verbose=False),
    "moqa-kl": QuantizeExperts(budget=ExpertBudget(trust_region=(0.0,)), analysis=ExpertAnalysis(sensitivity="kl"),
                               verbose=False),
}


@pytest.mark.parametrize("setting", list(EXPERT_SETTINGS))
def test_quantize_experts_store_backed_matches_in_memory(setting, one_torch_thread):
    memory, stored = _pair("mixtral")
    run_passes(memory, [EXPERT_SETTINGS[setting]])
    run_passes(stored, [EXPERT_SETTINGS[setting]])
    plan = memory.metadata["quantize_experts"]
    assert stored.metadata["quantize_experts"]["experts"] == plan["experts"]
    assert stored.metadata["quantize_experts"]["avg_bits"] == plan["avg_bits"]
    names = [n.target for n in stored.graph.nodes if n.op == "get_attr" and "qweight" in str(n.target)]
    assert names, "no packed expert weights"
    for name in names:  # every packed expert tensor lives in the store, and equals the in-memory one
        assert name in stored.weights
        assert torch.equal(stored.weights.get(name), getattr(memory.module, name))
    _same_result(memory, stored, _ids())


def test_quantize_experts_fisher_streams_when_the_model_fits(one_torch_thread):
    model = tiny_causal_lm("qwen3_moe", seed=0)
    memory, stored = capture(model), capture_stored(model, budget=10**9)
    memory.calibration = stored.calibration = _calibration()
    setting = QuantizeExperts(budget=ExpertBudget(trust_region=(0.0,)), verbose=False)
    run_passes(memory, [setting])
    run_passes(stored, [setting])
    assert stored.metadata["quantize_experts"]["experts"] == memory.metadata["quantize_experts"]["experts"]
    _same_result(memory, stored, _ids())


@pytest.mark.parametrize("sensitivity", ["fisher", "loss"])
def test_quantize_experts_full_model_gradients_over_budget_refused(sensitivity):
    _, stored = _pair("mixtral")
    reads = stored.weights.stats["reads"]
    with pytest.raises(ConfigError, match=rf"sensitivity='{sensitivity}'.*sensitivity='output'.*'uniform'"):
        QuantizeExperts(analysis=ExpertAnalysis(sensitivity=sensitivity), verbose=False).run(stored)
    assert stored.weights.stats["reads"] == reads  # refused before any weight was read


# --- dfrot, the prune baselines, prune_tokens, threshold data, TorchRunner ----------------------------
def test_dfrot_store_backed_matches_in_memory(one_torch_thread):
    memory, stored = _pair("llama")
    for program in (memory, stored):
        run_passes(program, [Rotate(mode="dfrot", dfrot_steps=3)])
    _same_result(memory, stored, _ids())


def test_prune_baselines_store_backed_match_in_memory(one_torch_thread):
    memory, stored = _pair("llama")
    samples = memory.calibration.batches[:4]
    scores = baselines.influence(memory, samples)
    streamed = baselines.influence(stored, samples)
    assert streamed.keys() == scores.keys()
    for key, value in scores.items():
        assert streamed[key] == pytest.approx(value, abs=1e-6)
    dropped = min((s, key) for key, s in scores.items() if key[1] == "block")[1]
    for program in (memory, stored):
        baselines.drop(program, [dropped])
    _same_result(memory, stored, _ids())


def test_prune_tokens_router_training_refused_store_backed():
    _, stored = _pair("llama")
    with pytest.raises(ConfigError, match="store-backed.*max_memory.*baselines"):
        PruneTokens(sparsity=0.3).run(stored)


def test_threshold_data_and_torch_runner_store_backed(one_torch_thread):
    memory, stored = _pair("llama")
    ids = _ids()
    node = next(n.name for n in memory.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    for key, value in tn_data.activations(memory, [node], ids).items():
        torch.testing.assert_close(tn_data.activations(stored, [node], ids)[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(tn_data.model_outputs(stored, ids), tn_data.model_outputs(memory, ids), rtol=0, atol=1e-6)
    inputs, _ = tn_data.training_data(stored)
    assert inputs.dtype == torch.long
    torch.testing.assert_close(TorchRunner(stored)(ids), TorchRunner(memory)(ids), rtol=0, atol=1e-6)
