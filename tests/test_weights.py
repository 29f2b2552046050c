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
