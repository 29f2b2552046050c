"""Streaming artifacts (issue #13, item 5): save, load and ONNX/TVM export of store-backed programs."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from fxpress import graph as G
from fxpress.errors import ArtifactError, ConfigError, LoweringError
from fxpress.lowering.onnx import export_onnx
from fxpress.passes import FoldHadamard, Quantize, Rotate
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize.config import WeightQuant
from fxpress.serialize import load_program, save_program
from fxpress.shards import plan_shards
from fxpress.weights import is_placeholder

capture_module = importlib.import_module("fxpress.capture")  # fxpress.capture is also a function
BUDGET = 10_000  # bytes: far below the tiny model's ~190 KB of fp32 weights


# a tiny tied Llama (~190 KB of fp32 weights): tied, so the saved artifact records an alias
CONFIG = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def programs():
    """The same W4 compile twice: in memory, and store-backed under a 10 KB budget."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    passes = [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(bits=4, group_size=32))]
    in_memory, stored = capture_module.capture(model), capture_module.capture_stored(model, budget=BUDGET)
    for program in (in_memory, stored):
        run_passes(program, passes, progress=False)
    return in_memory, stored


@pytest.fixture(scope="module")
def saved(programs, tmp_path_factory):
    """The store-backed program saved in shards of at most 20 KB."""
    directory = tmp_path_factory.mktemp("saved") / "program"
    save_program(programs[1], directory, shard_bytes=20_000)
    return directory


IDS = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))


def test_plan_shards_respects_the_limit():
    assert plan_shards({"a": 5, "b": 5, "c": 5, "d": 20, "e": 1}, limit=10) == [["a", "b"], ["c"], ["d"], ["e"]]


def test_save_writes_shards_whose_tensors_equal_the_in_memory_program(programs, saved):
    in_memory, stored = programs
    manifest = json.loads((saved / "manifest.json").read_text())
    shards = sorted(set(manifest["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"weights-00001-of-{len(shards):05d}.safetensors"
    assert set(manifest["integrity"]["sha256"]) == {"program.json", *shards}
    for shard in shards:  # at most 20 KB of tensors, or one tensor larger than that alone (the embedding)
        with safe_open(str(saved / shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or (saved / shard).stat().st_size <= 20_000 + 4096
    compared = 0
    for name, shard in manifest["weight_map"].items():
        if not name.startswith("state."):
            continue
        with safe_open(str(saved / shard), framework="pt") as f:
            value = f.get_tensor(name)
        expected = G.get_param(in_memory.module, name[len("state."):])
        assert torch.equal(value, expected), name
        compared += 1
    assert compared >= 20
    assert stored.weights.memory_bytes() <= BUDGET


@pytest.mark.parametrize("lazy", [True, False])
def test_round_trip_gives_identical_logits(programs, saved, lazy):
    in_memory, _ = programs
    loaded, _ = load_program(saved, lazy=lazy)
    assert (loaded.weights is not None) == lazy
    if lazy:
        assert all(is_placeholder(p) for p in loaded.module.parameters())
        assert loaded.weights.stats["reads"] == 0  # nothing read until the program runs
    torch.testing.assert_close(loaded(IDS), in_memory(IDS), rtol=0, atol=0)


def test_lazy_load_is_automatic_above_the_size(saved, monkeypatch):
    serialize = importlib.import_module("fxpress.serialize")
    monkeypatch.setattr(serialize, "LAZY_ABOVE", 1000)
    assert load_program(saved)[0].weights is not None
    monkeypatch.setattr(serialize, "LAZY_ABOVE", 10**9)
    assert load_program(saved)[0].weights is None


def test_old_single_file_artifacts_still_load(programs, saved, tmp_path):
    """Format 1: one weights.safetensors, no weight_map."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((saved / "manifest.json").read_text())
    tensors = {}
    for shard in set(manifest["weight_map"].values()):
        tensors.update(load_file(str(saved / shard)))
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, str(old / "weights.safetensors"))
    (old / "program.json").write_bytes((saved / "program.json").read_bytes())
    del manifest["weight_map"], manifest["integrity"]
    manifest["version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no recorded digests"):
        loaded, _ = load_program(old, lazy=True)
    torch.testing.assert_close(loaded(IDS), programs[0](IDS), rtol=0, atol=0)


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_a_missing_or_corrupt_shard_is_named(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    shard = copy / "weights-00002-of-" f"{len(list(copy.glob('weights-*'))):05d}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{shard.name}.*tensors changed: .*does not match"):
        load_program(copy)
    shard.unlink()
    with pytest.raises(ArtifactError, match=f"{shard.name}' is missing"):
        load_program(copy)


def test_a_shard_missing_without_digests_is_named_before_work(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["integrity"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = sorted(copy.glob("weights-*"))[-1]
    shard.unlink()
    for lazy in (True, False):
        with pytest.warns(UserWarning), pytest.raises(ArtifactError, match=f"{shard.name}' is missing"):
            load_program(copy, lazy=lazy)


def test_bad_shard_size_is_refused_before_work(programs, tmp_path):
    with pytest.raises(ConfigError, match="shard_bytes"):
        save_program(programs[1], tmp_path / "x", shard_bytes=0)
    assert not (tmp_path / "x").exists()


def test_store_backed_onnx_export_streams_and_matches_the_in_memory_export(programs, tmp_path):
    from fxpress.runtime.runners import OnnxRunner

    in_memory, stored = programs
    (tmp_path / "memory").mkdir(), (tmp_path / "stored").mkdir()  # one model (and genai_config.json) a folder
    export_onnx(in_memory, tmp_path / "memory" / "memory.onnx")
    reads = stored.weights.stats["reads"]
    stats = export_onnx(stored, tmp_path / "stored" / "stored.onnx")
    assert stats["external_data"] is True and stats["matmulnbits"] >= 14
    assert stats["streamed"]["tensors"] >= 14 and stats["streamed"]["largest"] <= 300 * 64 * 4
    assert stored.weights.stats["reads"] > reads  # read from the store, not from memory
    assert stored.weights.memory_bytes() <= BUDGET  # the export put nothing in the store's memory
    data = list((tmp_path / "stored").glob("stored.onnx.*.data"))
    assert len(data) == 1 and data[0].stat().st_size >= stats["streamed"]["bytes"]
    expected = OnnxRunner(tmp_path / "memory" / "memory.onnx")(IDS)
    actual = OnnxRunner(tmp_path / "stored" / "stored.onnx")(IDS)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual, in_memory(IDS), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="external_data=False"):
        export_onnx(stored, tmp_path / "inline.onnx", external_data=False)


def test_loaded_store_backed_program_exports_to_onnx(saved, programs, tmp_path):
    from fxpress.runtime.runners import OnnxRunner

    loaded, _ = load_program(saved, lazy=True)
    export_onnx(loaded, tmp_path / "loaded.onnx")
    torch.testing.assert_close(OnnxRunner(tmp_path / "loaded.onnx")(IDS), programs[0](IDS), rtol=1e-4, atol=1e-4)


def test_tvm_export_of_a_store_backed_program_names_the_budget(programs, tmp_path):
    pytest.importorskip("tvm")
    from fxpress.lowering.tvm import export_tvm

    with pytest.raises(LoweringError, match="in memory.*KiB"):
        export_tvm(programs[1], tmp_path / "tvm")
    assert not (tmp_path / "tvm").exists()


def test_store_backed_float_program_keeps_large_weights_out_of_constant_folding(tmp_path):
    """Unquantized linears: their transposes are left to ONNX Runtime, not folded into in-memory initializers."""
    import onnx

    from fxpress.runtime.runners import OnnxRunner

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    stored = capture_module.capture_stored(model, budget=BUDGET)
    stats = export_onnx(stored, tmp_path / "fp32.onnx")
    proto = onnx.load(str(tmp_path / "fp32.onnx"), load_external_data=False)
    inline = [t.name for t in proto.graph.initializer if len(t.raw_data) >= 1024]
    assert not inline and stats["streamed"]["tensors"] >= 14
    torch.testing.assert_close(OnnxRunner(tmp_path / "fp32.onnx")(IDS), capture_module.capture(model)(IDS),
                               rtol=1e-4, atol=1e-4)
