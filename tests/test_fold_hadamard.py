"""FoldHadamard: online R3/R4 Hadamards inserted where the graph needs them, folded offline, still exact."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from fxpress import graph as G
from fxpress.capture import capture
from fxpress.errors import ConfigError, PassError
from fxpress.passes.fold_hadamard.fold_hadamard import HADAMARD_OP, FoldHadamard
from fxpress.passes.manager import relative_error, run_passes
from fxpress.zoo import tiny_causal_lm

TOL = 1e-4


@cache
def _captured(family: str, **overrides):
    return capture(tiny_causal_lm(family, **overrides))


def program(family: str, **overrides):
    return copy.deepcopy(_captured(family, **overrides))


def _hadamards(p) -> list[torch.fx.Node]:
    return [n for n in p.graph.nodes if n.target is HADAMARD_OP]


def _decode_error(original, p) -> float:
    ids = original.example_inputs[0]
    ref = original.run(ids, *original.empty_cache(ids.shape[0]))
    out = p.run(ids, *p.empty_cache(ids.shape[0]))
    step = ids[:, :1]
    return relative_error(p.run(step, out[1], out[2])[0], original.run(step, ref[1], ref[2])[0])


def test_r4_before_every_down_projection_and_r3_before_the_cache():
    original = program("llama", hidden_size=96, intermediate_size=192)
    p = copy.deepcopy(original)
    (result,) = run_passes(p, [FoldHadamard()], progress=False)
    assert result.stats["equivalence_rel_error"] < TOL and _decode_error(original, p) < TOL
    assert result.stats["sizes"] == {24: "24 = 12*2 (paley1(q=11))", 192: "192 = 12*16 (paley1(q=11))"}
    assert len(_hadamards(p)) == 3 * 2 and result.stats["online_hadamards"] == 6
    for block in G.decoder_blocks(p.module):
        (down,) = block.mlp.writers
        assert down.input.target is HADAMARD_OP
        att = block.attention.attention
        assert att.q_in.target is HADAMARD_OP  # queries rotated after RoPE
        assert att.k_new.target is HADAMARD_OP  # keys rotated before they enter the cache
    bases = {n.args[1].target for n in _hadamards(p)}
    assert len(bases) == 2  # one base buffer per size, shared by all layers
    assert p.metadata["fold_hadamard"]["r3_nodes"] and p.metadata["fold_hadamard"]["r4_nodes"]


def test_every_fused_expert_gets_r4():
    original = program("mixtral")
    p = copy.deepcopy(original)
    (result,) = run_passes(p, [FoldHadamard(r3=False)], progress=False)
    assert result.stats["r4_down_projections"] == 2 and result.stats["r4_expert_tensors"] == 2
    for moe in G.moe_blocks(p.module):
        assert all(u.input.target is HADAMARD_OP for u in moe.expert_down)
    assert result.stats["equivalence_rel_error"] < TOL and _decode_error(original, p) < TOL


def test_latent_attention_rotates_keys_at_the_attention_input():
    original = program("deepseek_v3")
    p = copy.deepcopy(original)
    (result,) = run_passes(p, [FoldHadamard()], progress=False)
    assert result.stats["r3_attention_layers"] == 2 and result.stats["r3_keys_rotated_in_cache"] == 0
    assert result.stats["r4_down_projections"] == 3  # dense MLP, shared expert, fused experts
    assert result.stats["equivalence_rel_error"] < TOL and _decode_error(original, p) < TOL


@pytest.mark.parametrize("fallback", ["orthogonal", "block"])
def test_sizes_without_a_construction_use_the_reported_fallback(fallback):
    original = program("llama", intermediate_size=92)  # 92 = 23*4: no Hadamard of order 92 is built
    p = copy.deepcopy(original)
    (result,) = run_passes(p, [FoldHadamard(fallback=fallback, r3=False)], progress=False)
    assert result.stats["fallbacks"] == [f"92 = 23*4 ({fallback} fallback)"]
    assert any("fallback" in w for w in result.warnings)
    assert result.stats["equivalence_rel_error"] < TOL


def test_fallback_error_and_bad_fields_are_clear():
    p = program("llama", intermediate_size=92)
    nodes = len(p.graph.nodes)
    with pytest.raises(PassError, match="no Hadamard matrix of size 92"):
        run_passes(p, [FoldHadamard(fallback="error")], progress=False)
    assert len(p.graph.nodes) == nodes  # refused before any change
    with pytest.raises(ConfigError, match="does nothing"):
        FoldHadamard(r3=False, r4=False).validate()
    with pytest.raises(ConfigError, match="fallback"):
        FoldHadamard(fallback="nearest").validate()


def test_rewritten_graph_exports_again():
    p = program("llama")
    run_passes(p, [FoldHadamard()], progress=False)
    ep = torch.export.export(p.module, p.example_inputs, strict=False)
    assert sum(1 for n in ep.graph.nodes if "fxpress.hadamard" in str(n.target)) == 6
    assert relative_error(ep.module()(*p.example_inputs)[0], p.reference_logits()) < 1e-6
