"""fxpress.graph: linears, norms, the residual stream, blocks, attention and MoE found from the ATen graph alone."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from fxpress import graph as G
from fxpress.capture import capture
from fxpress.zoo import tiny_causal_lm, tiny_config


@cache
def _captured(family: str):
    return capture(tiny_causal_lm(family))


def program(family: str):
    return copy.deepcopy(_captured(family))


def test_linear_uses_describe_fused_expert_axes():
    gm = program("mixtral").module
    uses = G.linear_uses(gm.graph)
    grouped = [u for u in uses if u.kind == "grouped_mm"]
    assert len(grouped) == 4  # gate_up and down per layer
    gate_up = next(u for u in grouped if u.name.endswith("gate_up_proj"))
    down = next(u for u in grouped if u.name.endswith("down_proj"))
    cfg = tiny_config("mixtral")
    assert gate_up.fused_experts and (gate_up.in_axis, gate_up.out_axis) == (-1, -2)
    assert gate_up.in_features() == cfg.hidden_size and gate_up.out_features() == 2 * cfg.intermediate_size
    assert down.in_features() == cfg.intermediate_size and down.out_features() == cfg.hidden_size
    plain = [u for u in uses if u.kind == "linear"]
    assert all(u.in_features() == G.last_dim(u.input) for u in plain)


def test_rms_norms_are_found_with_their_scale_and_eps():
    gm = program("llama").module
    norms = G.find_norms(gm.graph)
    cfg = tiny_config("llama")
    stream_norms = [n for n in norms if n.dim == cfg.hidden_size]
    assert len(stream_norms) == 2 * cfg.num_hidden_layers + 1
    assert all(n.kind == "rms" and n.weight is not None and n.eps == pytest.approx(cfg.rms_norm_eps) for n in stream_norms)
    assert all(G.op_name(n.output) == "mul" for n in stream_norms)
    readers, others = G.norm_consumers(stream_norms[0])
    assert [u.name.split(".")[-2] for u in readers] == ["q_proj", "k_proj", "v_proj"] and not others
    assert [u.name.split(".")[-2] for u in G.norm_readers(stream_norms[-1])] == ["lm_head"]


def test_qwen3_per_head_norms_are_not_on_the_stream():
    gm = program("qwen3_moe").module
    stream = G.residual_stream(gm, strict=False)
    assert len(G.find_norms(gm.graph)) == len(stream.norms) + 4  # q_norm and k_norm of both layers
    assert all(n.dim == stream.hidden for n in stream.norms)


def test_residual_stream_readers_and_writers_of_a_dense_model():
    gm = program("llama").module
    stream = G.residual_stream(gm, strict=False)
    assert stream.hidden == 64 and len(stream.adds) == 4
    assert len(stream.readers) == 2 * 5 + 1  # q, k, v, gate, up per layer + lm_head
    assert len(stream.writers) == 2 * 2  # o_proj, down_proj per layer
    assert [stream.writer_segment[w.node] for w in stream.writers] == [0, 1, 2, 3]
    assert [stream.segment[r.input] for r in G.final_readers(stream)] == [4]
    assert len(stream.scales) == len(stream.norms) == 5  # norm scales not folded yet
    with pytest.raises(G.GraphPatternError, match="fold the norm scales"):
        G.residual_stream(gm, strict=True)


def test_blocks_and_attention_of_a_gqa_model():
    gm = program("llama").module
    blocks = G.decoder_blocks(gm)
    cfg = tiny_config("llama")
    assert len(blocks) == cfg.num_hidden_layers
    for block in blocks:
        att = block.attention.attention
        assert block.attention.kind == "attention" and block.mlp.kind == "mlp"
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 2, 16)
        assert att.rope and att.v_simple and att.o_simple
        assert att.k_cache is not None and att.v_cache is not None and G.op_name(att.k_cache) == "cat"
        assert [u.name.split(".")[-2] for u in att.q_proj + att.k_proj + att.v_proj] == ["q_proj", "k_proj", "v_proj"]
        assert att.o_proj.name.endswith("o_proj.weight")
        assert block.attention.norm is not None and block.mlp.norm is not None
        assert [w.name.split(".")[-2] for w in block.mlp.writers] == ["down_proj"]


def test_moe_router_experts_and_shared_experts():
    gm = program("qwen2_moe").module
    moes = G.moe_blocks(gm)
    assert len(moes) == 2
    for moe in moes:
        assert moe.num_experts == 4 and moe.top_k == 2
        assert moe.router.out_features() == 4
        assert {u.name.split(".")[-1] for u in moe.expert_down} == {"down_proj"} and moe.expert_down[0].fused_experts
        shared = sorted(u.name.split(".")[-2] for u in moe.shared)
        assert shared == ["down_proj", "gate_proj", "shared_expert_gate", "up_proj"]
        assert len(moe.shared_down) == 1


def test_deepseek_latent_attention_and_dense_first_layer():
    gm = program("deepseek_v3").module
    blocks = G.decoder_blocks(gm)
    assert blocks[0].mlp.kind == "mlp" and blocks[1].mlp.kind == "moe"
    att = blocks[0].attention.attention
    assert not att.v_simple  # values are a slice of kv_b_proj's per-head output: no plain R2
    assert att.v_proj[0].name.endswith("kv_b_proj.weight")
    stream = G.residual_stream(gm, strict=False)
    readers = {r.name.split(".")[-2] for r in stream.readers}
    assert {"q_a_proj", "kv_a_proj_with_mqa", "gate", "lm_head"} <= readers
    assert "q_b_proj" not in readers  # reads the latent, not the stream
    assert G.moe_blocks(gm)[0].shared_down[0].name.endswith("shared_experts.down_proj.weight")


def test_get_set_add_param_and_untie():
    p = program("llama")
    gm = p.module
    use = G.linear_uses(gm.graph)[0]
    w = G.get_param(gm, use.weight)
    G.set_param(gm, use.weight, w.double() * 2)
    assert G.get_param(gm, use.weight).dtype == torch.float32
    assert torch.equal(G.get_param(gm, use.weight), w * 2)
    new = G.add_param(gm, "extra.thing", torch.ones(3), before=use.node)
    assert new.op == "get_attr" and torch.equal(G.get_param(gm, new), torch.ones(3))
    copy_node = G.untie(gm, use.node, use.weight)
    assert use.node.args[1] is copy_node and torch.equal(G.get_param(gm, copy_node), w * 2)
    gm.graph.lint()


def test_every_block_yields_its_attention_and_down_projection():
    gm = program("qwen2_moe").module
    blocks = G.decoder_blocks(gm)
    attentions = G.attentions(blocks)
    assert [a.sdpa for a in attentions] == [b.attention.attention.sdpa for b in blocks]
    downs = G.down_projections(blocks)
    assert len(downs) == 2 * len(blocks) and all("down_proj" in u.name for u in downs)  # fused and shared experts
    assert all(b.attention.residual in G.residual_stream(gm, strict=False).nodes for b in blocks)


def test_ancestors_stop_at_and_stay_within_the_given_nodes():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.relu, (x,))
    b = graph.call_function(torch.neg, (a,))
    c = graph.call_function(torch.add, (b, x))
    graph.output(c)
    assert G.ancestors(c) == {c, b, a, x}
    assert G.ancestors(c, stop={b}) == {c, b, x}
    assert G.ancestors(c, within={b, a}) == {c, b, a}
    assert G.descendants(x) == {a, b, c, graph.output_node()} and G.descendants(x, depth=1) == {a, c}
