"""The weight store: checkpoint directories captured without their weights, a bounded overlay that spills."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxpress.errors import CaptureError, ConfigError, FxpressError
from fxpress.passes import FoldHadamard, Quantize, Rotate
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize.config import WeightQuant
from fxpress.weights import WeightStore, format_bytes, is_placeholder, parse_memory

capture_module = importlib.import_module("fxpress.capture")  # fxpress.capture is also a function


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory):
    """The tiny model as a user downloads one: config.json, sharded bf16 safetensors and their index."""
    directory = tmp_path_factory.mktemp("ckpt")
    copy.deepcopy(tiny_llama).to(torch.bfloat16).save_pretrained(directory, max_shard_size="60KB")
    return directory


def test_parse_memory_sizes_and_errors():
    assert parse_memory("4GiB") == 4 * 2**30
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5g") == int(1.5e9)
    assert parse_memory(1024) == 1024
    assert parse_memory(None) is None
    for bad in ("0", "lots", "4 parsecs", -5, True):
        with pytest.raises(ConfigError, match="max_memory"):
            parse_memory(bad)
    assert format_bytes(3 * 2**29) == "1.50 GiB"


def test_overlay_spills_beyond_budget_and_reads_back_identical():
    store = WeightStore(budget=3000)
    tensors = {f"w{i}": torch.randn(20, 20) for i in range(6)}  # 1600 bytes each
    for name, t in tensors.items():
        store.set(name, t)
    assert store.memory_bytes() <= 3000
    assert store.stats["spilled_tensors"] >= 4
    for name, t in tensors.items():
        assert torch.equal(store.get(name), t)
    clone = store.clone()
    clone.set("w0", torch.zeros(20, 20))
    assert torch.equal(store.get("w0"), tensors["w0"]) and torch.equal(clone.get("w0"), torch.zeros(20, 20))


def test_store_refuses_non_finite_rewrites():
    store = WeightStore()
    with pytest.raises(FxpressError, match="'bad'.*NaN"):
        store.set("bad", torch.tensor([1.0, float("nan")]))


def test_checkpoint_capture_holds_no_weights_and_matches(tiny_llama, checkpoint):
    assert (checkpoint / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 300, (2, 9))
    loaded = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()  # what a user would load
    reference = capture_module.capture(loaded)(ids)
    program = capture_module.capture_stored(str(checkpoint), dtype=torch.float32)
    assert all(is_placeholder(p) for p in program.module.parameters())
    assert program.weights.stats["reads"] == 0  # nothing read until a weight is needed
    torch.testing.assert_close(program(ids), reference, rtol=0, atol=0)
    assert program.weights.stats["reads"] > 0


def test_passes_through_a_tiny_budget_match_the_in_memory_compile(tiny_llama):
    ids = torch.randint(0, 300, (2, 7))
    passes = [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(bits=4, group_size=32))]
    in_memory = capture_module.capture(tiny_llama)
    stored = capture_module.capture_stored(tiny_llama, budget=10_000)
    run_passes(in_memory, passes, progress=False)
    run_passes(stored, passes, progress=False)
    assert stored.weights.stats["spilled_tensors"] > 0
    assert stored.weights.memory_bytes() <= 10_000
    torch.testing.assert_close(stored(ids), in_memory(ids), rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CaptureError, match="no \\*.safetensors"):
        capture_module.capture_stored(str(tmp_path))
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    dropped = next(k for k in index["weight_map"] if "q_proj" in k)
    del index["weight_map"][dropped]
    for name in {*index["weight_map"].values()}:
        (tmp_path / name).symlink_to(checkpoint / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CaptureError, match="lacks 1 weights.*q_proj"):
        capture_module.capture_stored(str(tmp_path))
    with pytest.raises(CaptureError, match="not a Hugging Face checkpoint"):
        capture_module.capture_stored(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_checkpoint_with_experts_saved_one_by_one(family, tmp_path):
    """transformers saves fused experts one expert at a time; the store stacks them back when they are read."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts_per_tok=2)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=4, **sizes))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                                   shared_expert_intermediate_size=64, **sizes))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    ids = torch.randint(0, 300, (2, 7))
    reference = capture_module.capture(type(model).from_pretrained(tmp_path, dtype=torch.float32).eval())(ids)
    program = capture_module.capture_stored(str(tmp_path), dtype=torch.float32, budget=10_000)
    torch.testing.assert_close(program(ids), reference, rtol=0, atol=0)


def test_tensorfile_round_trip_is_aligned_and_readable_by_safetensors(tmp_path):
    """fxpress.tensorfile writes ordinary safetensors files tensor by tensor and reads a tensor into a buffer at
    the address modulo 64 asked for, bit-identical."""
    from safetensors.torch import load_file

    from fxpress.tensorfile import read_tensor, write_tensors

    tensors = {"w": torch.randn(33, 7), "h": torch.randn(5).to(torch.bfloat16), "codes": torch.arange(9, dtype=torch.uint8),
               "flag": torch.tensor(True), "empty": torch.zeros(0, 4)}
    reads: list[str] = []
    write_tensors(tmp_path / "t.safetensors", {k: (t.shape, t.dtype) for k, t in tensors.items()},
                  lambda key: reads.append(key) or tensors[key])
    assert reads == list(tensors)  # each read once, in order, just before it is written
    theirs = load_file(tmp_path / "t.safetensors")
    for key, tensor in tensors.items():
        assert torch.equal(theirs[key], tensor)
        for align in (0, 4 if tensor.element_size() <= 4 else 8, 32):
            ours = read_tensor(tmp_path / "t.safetensors", key, align)
            assert torch.equal(ours, tensor) and ours.dtype == tensor.dtype
            if ours.numel():
                assert ours.data_ptr() % 64 == align
    with pytest.raises(ValueError, match="not the"):
        write_tensors(tmp_path / "bad.safetensors", {"w": ((3,), torch.float32)}, lambda key: torch.zeros(4))


def test_rotate_rewrites_large_weights_in_slices_with_the_same_bits(monkeypatch):
    """A weight rewritten a float64 slice at a time (in place or not) equals the whole-tensor rewrite."""
    from fxpress.runtime.hadamard import Rotation, random_hadamard_rotation

    rotate = importlib.import_module("fxpress.passes.rotate.rotate")
    weight = torch.randn(300, 64)
    dense = Rotation(64, matrix=torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0])
    for q in (random_hadamard_rotation(64), dense):
        transforms = [rotate._scale_axis(1, torch.rand(64, dtype=torch.float64) + 0.5), rotate._rotate_axis(q, 1)]
        with monkeypatch.context() as patch:
            patch.setattr(rotate, "REWRITE_SLICE_BYTES", 2**30)
            whole = rotate.rewrite(weight, transforms)
            patch.setattr(rotate, "REWRITE_SLICE_BYTES", 64 * 8 * 7)  # 7 rows a slice
            assert torch.equal(rotate.rewrite(weight, transforms), whole)
            own = weight.clone()
            assert rotate.rewrite(own, transforms, in_place=True) is own and torch.equal(own, whole)
