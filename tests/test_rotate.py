"""Rotate (R1, R2, norm folding, untying) keeps every architecture's logits and KV-cache decoding exact."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from fxpress import graph as G
from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.errors import ConfigError, PassError, PassOrderError
from fxpress.passes.base import pass_from_dict
from fxpress.passes.fold_hadamard.fold_hadamard import FoldHadamard
from fxpress.passes.manager import relative_error, run_passes, validate_pipeline
from fxpress.passes.rotate.rotate import Rotate, dfrot_refine, quantize_rtn
from fxpress.zoo import FAMILIES, tiny_causal_lm, tiny_encoder

TOL = 1e-4


def _perturb_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm scales, so folding them is actually tested (fresh models have all-ones scales)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model


@cache
def _captured(family: str):
    if family == "llama96":  # hidden 96 = 12*8, head_dim 24 = 12*2, intermediate 192 = 12*16: Paley sizes
        return capture(_perturb_norms(tiny_causal_lm("llama", hidden_size=96, intermediate_size=192)))
    return capture(_perturb_norms(tiny_causal_lm(family)))


def program(family: str):
    return copy.deepcopy(_captured(family))


def assert_decode_matches(original, rotated, ids: torch.Tensor) -> None:
    """Prefill, then decode two tokens from each program's own cache: logits must agree."""
    b = ids.shape[0]
    ref = original.run(ids, *original.empty_cache(b))
    out = rotated.run(ids, *rotated.empty_cache(b))
    assert relative_error(out[0], ref[0]) < TOL
    step = ids[:, :2].flip(1)
    ref2 = original.run(step, ref[1], ref[2])[0]
    out2 = rotated.run(step, out[1], out[2])[0]
    assert relative_error(out2, ref2) < TOL


@pytest.mark.parametrize("family", ["llama96", *FAMILIES])
def test_r1_to_r4_preserve_logits_and_decoding(family):
    original = program(family)
    p = program(family)
    rot, fold = run_passes(p, [Rotate(), FoldHadamard()], progress=False)
    assert rot.stats["equivalence_rel_error"] < TOL and fold.stats["equivalence_rel_error"] < TOL
    assert rot.stats["norms_folded"] == 2 * original.info.num_layers + 1
    assert rot.stats["r1_writers"] >= 2 * original.info.num_layers
    assert fold.stats["r3_attention_layers"] == original.info.num_layers
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        assert rot.stats["r1_fused_expert_tensors"] >= 2 and fold.stats["r4_expert_tensors"] >= 1
    if family == "deepseek_v3":
        assert rot.stats["r2_layers"] == 0 and rot.warnings  # latent attention: R2 skipped and said so
    else:
        assert rot.stats["r2_layers"] == original.info.num_layers
    assert_decode_matches(original, p, original.example_inputs[0])
    # the weights really moved: a rotation, not a no-op
    q_name = next(u.weight.target for u in G.linear_uses(p.graph))
    assert not torch.allclose(G.get_param(p.module, q_name), G.get_param(original.module, q_name), atol=1e-3)


def test_rotation_changes_the_cache_basis_but_not_attention():
    original, p = program("llama"), program("llama")
    run_passes(p, [Rotate(), FoldHadamard()], progress=False)
    ids = original.example_inputs[0]
    ref = original.run(ids, *original.empty_cache(ids.shape[0]))
    out = p.run(ids, *p.empty_cache(ids.shape[0]))
    assert not torch.allclose(out[1], ref[1], atol=1e-3) and not torch.allclose(out[2], ref[2], atol=1e-3)
    # R3 and R2 are orthogonal per head: each cached key/value vector keeps its length
    assert torch.allclose(out[1].norm(dim=-1), ref[1].norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert torch.allclose(out[2].norm(dim=-1), ref[2].norm(dim=-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["orthogonal", "hadamard"])
def test_modes_and_seeds_are_reproducible(mode):
    a, b, c = program("llama96"), program("llama96"), program("llama96")
    run_passes(a, [Rotate(mode=mode, seed=1)], progress=False)
    run_passes(b, [Rotate(mode=mode, seed=1)], progress=False)
    run_passes(c, [Rotate(mode=mode, seed=2)], progress=False)
    name = next(u.weight.target for u in G.linear_uses(a.graph))
    assert torch.equal(G.get_param(a.module, name), G.get_param(b.module, name))
    assert not torch.equal(G.get_param(a.module, name), G.get_param(c.module, name))


class _RMSNorm(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(0.5 + torch.rand(n))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _Expert(torch.nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.gate = torch.nn.Linear(h, i, bias=False)
        self.up = torch.nn.Linear(h, i, bias=False)
        self.down = torch.nn.Linear(i, h, bias=True)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class PerExpertLM(torch.nn.Module):
    """A tiny MoE LM with per-expert nn.Linear experts, a writer bias, a stream bias and a tied head."""

    def __init__(self, vocab=64, h=48, i=96, experts=4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, h)
        self.norm = _RMSNorm(h)
        self.router = torch.nn.Linear(h, experts, bias=False)
        self.experts = torch.nn.ModuleList(_Expert(h, i) for _ in range(experts))
        self.shift = torch.nn.Parameter(torch.randn(h) * 0.1)
        self.final = _RMSNorm(h)
        self.head = torch.nn.Linear(h, vocab, bias=True)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        y = self.norm(x)
        probs = torch.softmax(self.router(y), -1)
        top, idx = probs.topk(2, -1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top)
        moe = sum(gates[..., e:e + 1] * expert(y) for e, expert in enumerate(self.experts))
        x = x + moe + self.shift
        return self.head(self.final(x))


def test_per_expert_linears_tied_head_and_biases():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    p = capture(PerExpertLM(), example_inputs=(ids,))
    ref = p.reference_logits()
    rot, fold = run_passes(p, [Rotate(), FoldHadamard(r3=False)], progress=False)
    assert rot.stats["untied_embeddings"] == 1 and rot.stats["r1_writers"] == 4
    assert rot.stats["r1_readers"] == 1 + 4 * 2 + 1  # router, gate/up per expert, head
    assert fold.stats["r4_down_projections"] == 4 and fold.stats["sizes"] == {96: "96 = 12*8 (paley1(q=11))"}
    assert relative_error(p.reference_logits(), ref) < TOL


@pytest.mark.slow
def test_smollm2_r1_to_r4_match_logits_and_decoding(smollm2_program, eval_windows):
    original = copy.deepcopy(smollm2_program)
    ids = eval_windows[:2, :48]
    original.example_inputs = (ids, *original.empty_cache(2))
    p = copy.deepcopy(original)
    rot, fold = run_passes(p, [Rotate(), FoldHadamard()], progress=False)
    assert rot.stats["r1"] == "random Hadamard 576 = 36*16 (paley2(q=17))"
    assert rot.stats["untied_embeddings"] == 1 and rot.stats["norms_folded"] == 61 and rot.stats["r2_layers"] == 30
    assert fold.stats["sizes"] == {64: "64 = 1*64 (trivial)", 1536: "1536 = 12*128 (paley1(q=11))"}
    assert rot.stats["equivalence_rel_error"] < TOL and fold.stats["equivalence_rel_error"] < TOL
    assert_decode_matches(original, p, ids)


@pytest.mark.slow
def test_dfrot_lowers_the_weighted_quantization_loss_on_smollm2(smollm2_program, calib_windows):
    p = copy.deepcopy(smollm2_program)
    p.calibration = Calibration(calib_windows[:1, :64])
    (result,) = run_passes(p, [Rotate(mode="dfrot", dfrot_steps=6)], progress=False)
    d = result.stats["dfrot"]
    assert d["rows"] == 61 * 64 and d["loss_end"] < d["loss_start"]
    assert result.stats["equivalence_rel_error"] < TOL
    assert result.stats["r1"].startswith("DFRot-refined random Hadamard")


def test_dfrot_refine_accepts_a_custom_quantizer_and_stays_orthogonal():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 32, generator=g, dtype=torch.float64)
    a[:4, 3] = 80.0  # massive-activation rows
    weight = torch.ones(256, dtype=torch.float64)
    weight[:4] = 100.0
    r0 = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    r, losses = dfrot_refine(a, weight, r0, lambda x: quantize_rtn(x, 3), 10)
    assert torch.allclose(r @ r.T, torch.eye(32, dtype=torch.float64), atol=1e-10)
    assert min(losses) < losses[0]
    calls = []
    rot = Rotate(mode="dfrot").with_quantizer(lambda x: calls.append(1) or quantize_rtn(x, 4))
    rot._act_quantizer()(a.float())
    assert calls


def test_bad_configs_and_orders_fail_before_any_work():
    with pytest.raises(ConfigError, match="mode"):
        validate_pipeline([Rotate(mode="random")])
    with pytest.raises(ConfigError, match="dfrot_bits"):
        validate_pipeline([Rotate(dfrot_bits=1)])
    with pytest.raises(ConfigError, match="calibration"):
        validate_pipeline([Rotate(mode="dfrot")], has_calibration=False)
    with pytest.raises(PassOrderError, match="'rotate' cannot run after 'quantize'"):
        validate_pipeline([Rotate()], history=["quantize"])
    with pytest.raises(PassOrderError, match="fold_hadamard"):
        validate_pipeline([FoldHadamard(), Rotate()])
    spec = Rotate(mode="dfrot", seed=5, dfrot_steps=7).to_dict()
    assert spec["type"] == "rotate" and pass_from_dict(spec) == Rotate(mode="dfrot", seed=5, dfrot_steps=7)


def test_layernorm_models_get_a_clear_error():
    ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    p = capture(tiny_encoder("bert"), example_inputs=(ids,))
    nodes = [n.name for n in p.graph.nodes]
    weights = {k: v.clone() for k, v in p.module.state_dict().items()}
    with pytest.raises(PassError, match="LayerNorm"):
        run_passes(p, [Rotate()], progress=False)
    assert [n.name for n in p.graph.nodes] == nodes  # the error came before any change
    assert all(torch.equal(v, weights[k]) for k, v in p.module.state_dict().items())


class _FusedNormMLP(torch.nn.Module):
    """torch.nn.RMSNorm exports as one aten.rms_norm op with the scale inside it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 32)
        self.norm = torch.nn.RMSNorm(32, eps=1e-6)
        self.up = torch.nn.Linear(32, 80)
        self.down = torch.nn.Linear(80, 32)
        self.final = torch.nn.RMSNorm(32)
        self.head = torch.nn.Linear(32, 50)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.final.weight.uniform_(0.5, 1.5)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(self.final(x))


def test_fused_rms_norm_ops_are_folded():
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    p = capture(_FusedNormMLP().eval(), example_inputs=(ids,))
    assert sum(1 for n in p.graph.nodes if G.op_name(n) == "rms_norm") == 2
    ref = p.reference_logits()
    rot, fold = run_passes(p, [Rotate(), FoldHadamard()], progress=False)
    assert rot.stats["norms_folded"] == 2 and fold.stats["sizes"] == {80: "80 = 20*4 (paley1(q=19))"}
    assert all(n.args[2] is None for n in p.graph.nodes if G.op_name(n) == "rms_norm")
    assert relative_error(p.reference_logits(), ref) < TOL
