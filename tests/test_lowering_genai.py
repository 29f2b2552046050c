"""ONNX causal LMs in onnxruntime-genai's form: fused ORT kernels, per-layer KV I/O, genai_config.json, Generator."""

from __future__ import annotations

import collections
import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from _lowering_cases import ops_program, relative_error  # noqa: E402

from fxpress.capture import capture  # noqa: E402
from fxpress.errors import ConfigError  # noqa: E402
from fxpress.lowering.onnx import export_onnx  # noqa: E402
from fxpress.passes import FoldHadamard, Quantize, Rotate  # noqa: E402
from fxpress.passes.manager import run_passes  # noqa: E402
from fxpress.passes.quantize import WeightQuant  # noqa: E402
from fxpress.runtime.generate import generate  # noqa: E402
from fxpress.runtime.runners import OnnxRunner, TorchRunner  # noqa: E402
from fxpress.zoo import tiny_causal_lm  # noqa: E402


def _kinds(path) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for n in onnx.load(str(path)).graph.node)


def _check_parity(path, program, tol: float = 1e-5) -> OnnxRunner:
    """Prefill, prefill + decode with the cache, and greedy tokens: the artifact against the PyTorch program."""
    runner, ref = OnnxRunner(path), TorchRunner(program)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    full = ref(ids)
    assert relative_error(runner(ids), full) < tol
    logits, keys, values = runner.step(ids[:1, :7], *runner.empty_cache(1))
    assert relative_error(runner.step(ids[:1, 7:], keys, values)[0], full[:1, 7:]) < tol  # several tokens after a past
    assert torch.equal(generate(runner, ids[:, :4], 10), generate(ref, ids[:, :4], 10))
    return runner


@pytest.fixture(scope="module")
def w4_llama():
    program = capture(tiny_causal_lm("llama"))
    run_passes(program, [Quantize(weights=WeightQuant(bits=4, group_size=32, symmetric=True))], progress=False)
    return program


def test_w4_llama_runs_on_fused_kernels_and_matches_pytorch(tmp_path, w4_llama):
    path = tmp_path / "m.onnx"
    stats = export_onnx(w4_llama, path)
    kinds = _kinds(path)
    assert kinds[("com.microsoft", "GroupQueryAttention")] == 2 and stats["attention_unfused"] == []
    assert kinds[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 4  # every norm after a residual add
    # per layer: one q/k/v and one gate/up kernel instead of five, plus o and down (the head stays float)
    assert kinds[("com.microsoft", "MatMulNBits")] == 2 * 4 and stats["matmulnbits_fused_away"] == 2 * 3
    assert not {("", "Softmax"), ("", "Expand")} & set(kinds)  # no decomposed attention, no KV heads expanded
    # o_proj reads GroupQueryAttention's [b, s, h*d] as it is: no trip through SDPA's [b, h, s, d] and back
    assert stats["attention_layout_round_trips_removed"] == 2 and kinds[("", "Transpose")] == 0
    model = onnx.load(str(path))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 3 for n in nbits)  # symmetric int4: no zero points
    _check_parity(path, w4_llama)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_fused_attention_in_other_families(tmp_path, family):
    program = capture(tiny_causal_lm(family))
    stats = export_onnx(program, tmp_path / "m.onnx")
    assert stats["group_query_attention"] == program.info.num_layers and stats["io"] == "genai"
    _check_parity(tmp_path / "m.onnx", program)


def test_rotated_model_keeps_rope_and_r3_outside_attention(tmp_path):
    """R3 (an online Hadamard on queries and keys after RoPE) sits between RoPE and attention: RoPE stays in the
    graph, GroupQueryAttention gets the rotated queries and keys, and the cache holds what the program holds."""
    program = capture(tiny_causal_lm("llama"))
    run_passes(program, [Rotate(), FoldHadamard()], progress=False)
    stats = export_onnx(program, tmp_path / "m.onnx")
    assert stats["group_query_attention"] == 2
    runner = _check_parity(tmp_path / "m.onnx", program)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    _, keys, _ = runner.step(ids, *runner.empty_cache(1))
    _, ref_keys, _ = TorchRunner(program).step(ids, *runner.empty_cache(1))
    assert relative_error(keys, ref_keys) < 1e-5


def test_unfused_export_keeps_the_stacked_cache(tmp_path, w4_llama):
    stats = export_onnx(w4_llama, tmp_path / "m.onnx", fused=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "past_keys", "past_values"]
    assert "group_query_attention" not in stats and not (tmp_path / "genai_config.json").exists()


def test_genai_config_is_written_and_a_foreign_one_is_refused_before_work(tmp_path, w4_llama):
    export_onnx(w4_llama, tmp_path / "a.onnx")
    config = json.loads((tmp_path / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "a.onnx" and decoder["num_hidden_layers"] == 2
    assert decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16
    with pytest.raises(ConfigError, match="does not describe 'b.onnx'"):
        export_onnx(w4_llama, tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


def test_genai_generator_gives_fxpress_greedy_tokens(tmp_path, w4_llama):
    og = pytest.importorskip("onnxruntime_genai")
    export_onnx(w4_llama, tmp_path / "model.onnx")
    model = og.Model(str(tmp_path))
    prompt = torch.randint(0, 255, (1, 6), generator=torch.Generator().manual_seed(4))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    tokens = np.asarray(generator.get_sequence(0))
    expected = generate(OnnxRunner(tmp_path / "model.onnx"), prompt, 16)[0].numpy()
    assert len(tokens) > prompt.shape[1] + 1 and np.array_equal(tokens, expected[: len(tokens)])
    assert np.array_equal(expected, generate(TorchRunner(w4_llama), prompt, 16)[0].numpy())


def test_auto_accuracy_level_is_measured_and_reported(tmp_path):
    stats = export_onnx(ops_program(k=64, n=32, block=16), tmp_path / "m.onnx", accuracy_level="auto")
    assert stats["accuracy_level"] in (0, 4) and set(stats["accuracy_level_ms"]) == {0, 4}
    meta = json.loads(dict((p.key, p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props)["fxpress.info"])
    assert meta["accuracy_level"] == stats["accuracy_level"]
    with pytest.raises(ConfigError, match="auto"):
        export_onnx(ops_program(k=64, n=32, block=16), tmp_path / "x.onnx", accuracy_level="fast")


def test_fused_and_unfused_artifacts_agree(tmp_path, w4_llama):
    export_onnx(w4_llama, tmp_path / "f.onnx")
    export_onnx(copy.deepcopy(w4_llama), tmp_path / "u" / "u.onnx", fused=False)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(6))
    assert relative_error(OnnxRunner(tmp_path / "f.onnx")(ids), OnnxRunner(tmp_path / "u" / "u.onnx")(ids)) < 1e-5


def test_packed_embedding_tables_do_not_hide_the_attentions(tmp_path):
    """A 4-bit embedding table (fxpress::embedding_nbit) leaves no aten.embedding for the residual-stream finder:
    attentions are found from their SDPA nodes, so they still fuse."""
    from fxpress.passes.quantize import TableQuant

    program = capture(tiny_causal_lm("llama"))
    run_passes(program, [Quantize(weights=WeightQuant(bits=4, group_size=32),
                                  tables=TableQuant(embedding_bits=4, lm_head_bits=4, group_size=32))], progress=False)
    stats = export_onnx(program, tmp_path / "m.onnx")
    assert stats["group_query_attention"] == stats["rotary_in_attention"] == stats["packed_qkv_attention"] == 2
    names = [t.name for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    assert sum(n.startswith("rotary_") for n in names) == 2  # one cos and one sin cache for all layers
    _check_parity(tmp_path / "m.onnx", program)
