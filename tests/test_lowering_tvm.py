"""TVM lowering: TensorIR kernels for packed weights and the Hadamard, KV cache, artifacts on disk."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("tvm")

from _lowering_cases import grouped_program, ops_program, relative_error, ties_inputs, ties_program  # noqa: E402

from fxpress.capture import capture  # noqa: E402
from fxpress.errors import ArtifactError, ConfigError  # noqa: E402
from fxpress.lowering.tvm import export_tvm  # noqa: E402
from fxpress.runtime.generate import generate  # noqa: E402
from fxpress.runtime.runners import TorchRunner, TvmRunner, load_runner  # noqa: E402
from fxpress.zoo import tiny_causal_lm  # noqa: E402


@pytest.mark.parametrize(
    "case",
    [dict(), dict(block=576, zeros=False), dict(k=80, block=32, bits=3), dict(bits=2, k=64, block=64)],
    ids=["w4g64_asym", "w4_per_channel_sym", "w3_partial_block", "w2"],
)
def test_every_op_matches_pytorch(tmp_path, case):
    program = ops_program(**case)
    stats = export_tvm(program, tmp_path / "ops")
    k = case.get("k", 576)
    assert stats["weight_bytes"] < 96 * k * 4 / 2  # packed bytes are stored, not float weights
    runner = TvmRunner(tmp_path / "ops")
    x = torch.randn(5, 3, k)  # a batch size the build never saw
    assert relative_error(runner(x), program(x)) < 1e-5


def test_activation_quantization_rounds_ties_like_pytorch(tmp_path):
    program = ties_program()
    export_tvm(program, tmp_path / "ties")
    x = ties_inputs()
    assert torch.equal(TvmRunner(tmp_path / "ties")(x), program(x))


def test_grouped_experts_match_pytorch(tmp_path):
    program = grouped_program()
    export_tvm(program, tmp_path / "moe")
    runner = TvmRunner(tmp_path / "moe")
    for rows in (3, 8, 11):
        x = torch.randn(rows, 64)
        assert relative_error(runner(x), program(x)) < 1e-5


def test_rotated_w4a4kv4_lm_with_kv_cache_matches_pytorch_and_generates_the_same_tokens(tmp_path):
    """Rotate + FoldHadamard + W4A4KV4 on a tiny Llama: every op in one graph, through the KV cache.

    The TensorIR butterfly sums in a different order than PyTorch's radix-16 matmuls; the last-ulp
    differences flip a few 4-bit activation codes, so logits agree to rounding, not bit for bit
    (the same program without activation quantization matches to 1e-6).
    """
    import copy

    from fxpress.calibration import Calibration
    from fxpress.passes import FoldHadamard, Quantize, Rotate
    from fxpress.passes.manager import run_passes
    from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant

    program = capture(tiny_causal_lm("llama"))
    program.calibration = Calibration(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    run_passes(program, [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(bits=4, group_size=32),
                                                            activations=ActQuant(bits=4),
                                                            kv_cache=KVQuant(bits=4))],
               progress=False)
    export_tvm(copy.deepcopy(program), tmp_path / "llama")
    runner, ref = TvmRunner(tmp_path / "llama"), TorchRunner(program)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    full, ours = ref(ids), runner(ids)
    assert relative_error(ours, full) < 0.2
    assert (ours.argmax(-1) == full.argmax(-1)).float().mean() >= 0.95
    logits, keys, values = runner.step(ids[:, :6], *runner.empty_cache(2))
    assert relative_error(runner.step(ids[:, 6:], keys, values)[0], ours[:, 6:]) < 1e-4  # cache == full sequence
    assert torch.equal(generate(runner, ids[:, :3], 8), generate(ref, ids[:, :3], 8))
    sampled = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    assert torch.equal(generate(runner, ids[:, :3], 8, **sampled), generate(ref, ids[:, :3], 8, **sampled))


def test_artifact_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="target"):
        export_tvm(ops_program(k=64, n=32, block=16), tmp_path / "bad", target="no-such-target")
    assert not os.listdir(tmp_path)
    path = tmp_path / "ops"
    export_tvm(ops_program(k=64, n=32, block=16), path)
    assert sorted(os.listdir(tmp_path)) == ["ops"]  # no temporary directory left behind
    manifest = json.loads((path / "fxpress.json").read_text())
    weights = path / manifest["weights"]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_runner(path)
    weights.write_bytes(data)
    assert isinstance(load_runner(path), TvmRunner)
    (path / "fxpress.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match="not an fxpress artifact"):
        load_runner(path)
    other = tmp_path / "empty"
    other.mkdir()
    with pytest.raises(ArtifactError, match="not an fxpress TVM artifact"):
        load_runner(other)


# --- MoE routing ops that TVM's frontend lacks (rewritten in lowering/export.py) ---


def test_histc_by_comparison_equals_torch_histc():
    from fxpress.lowering.export import histc_by_comparison

    ids = torch.randint(0, 4, (64,)).float()
    assert torch.equal(histc_by_comparison(ids, 4, 0, 3), torch.histc(ids, 4, 0, 3))
    values = torch.randn(200) * 3
    assert torch.equal(histc_by_comparison(values, 7, -2.0, 2.5), torch.histc(values, 7, -2.0, 2.5))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_moe_experts_lower_to_tvm_and_match_pytorch(tmp_path, family):
    program = capture(tiny_causal_lm(family))
    export_tvm(program, tmp_path / "moe")
    runner = load_runner(tmp_path / "moe")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    assert relative_error(runner(ids), program(ids)) < 1e-5


# --- helper B (session 2): quantize_act codes across runtimes ---------------------------------------------
def test_searched_activation_quantizers_give_pytorchs_codes_on_real_activations(tmp_path):
    """Same inputs, same codes in TVM as in PyTorch, for every clip ratio the search chose."""
    from _act_cases import searched_act_case

    program, rows = searched_act_case()
    export_tvm(program, tmp_path / "acts")
    assert torch.equal(TvmRunner(tmp_path / "acts")(rows), program(rows))


def test_deepseek_v3_lowers_to_tvm_and_matches_pytorch(tmp_path):
    """DeepSeek-V3's MLA attention and grouped routing: same-rank symbolic views, new_empty and unsorted topk
    are rewritten for TVM's frontend in lowering/export.py; the KV cache and greedy decoding still agree."""
    program = capture(tiny_causal_lm("deepseek_v3"))
    export_tvm(program, tmp_path / "ds")
    runner = load_runner(tmp_path / "ds")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = program(ids)
    assert relative_error(runner(ids), expected) < 1e-5
    logits, keys, values = runner.step(ids[:, :5], *runner.empty_cache(2))
    assert relative_error(runner.step(ids[:, 5:], keys, values)[0], expected[:, 5:]) < 1e-5
    assert torch.equal(generate(runner, ids[:, :3], 6), generate(TorchRunner(program), ids[:, :3], 6))
