"""Integrity: a flipped bit, swapped safetensors offsets, a truncated file or an edited ONNX initializer is an
ArtifactError naming the file (and the tensor) before anything runs; artifacts without digests load with a warning.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactError
from fxpress.passes import Quantize
from fxpress.passes.quantize import WeightQuant
from fxpress.runtime.runners import OnnxRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def compiled():
    """A 4-bit quantized two-layer MLP: small, with real scale tensors (two of the same size)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    return fxpress.compile(mlp, passes=[Quantize(weights=WeightQuant(bits=4, group_size=32))],
                           example_inputs=(torch.randn(2, 64),), progress=False)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return compiled.save(tmp_path_factory.mktemp("saved") / "prog")


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return size, json.loads(f.read(size))


def flip_bit(path: Path, tensor: str) -> None:
    """Flip the lowest bit of the first byte of `tensor`'s data in a safetensors file."""
    size, head = header(path)
    data = bytearray(path.read_bytes())
    data[8 + size + head[tensor]["data_offsets"][0]] ^= 1
    path.write_bytes(bytes(data))


def swap_offsets(path: Path, a: str, b: str) -> None:
    """Swap two same-sized tensors' data offsets in the header (padded to its old length, so the file stays valid)."""
    size, head = header(path)
    head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
    text = json.dumps(head, separators=(",", ":")).encode().ljust(size)
    data = path.read_bytes()
    path.write_bytes(data[:8] + text + data[8 + size:])


def copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_a_flipped_bit_in_a_scale_names_the_file_and_the_tensor(saved, tmp_path):
    prog = copy(saved, tmp_path)
    flip_bit(prog / "weights.safetensors", "state.0_weight_q4_scales")
    with pytest.raises(ArtifactError, match=r"weights\.safetensors' \(tensors changed: state\.0_weight_q4_scales\)"):
        fxpress.load(prog)


def test_swapped_offsets_name_both_tensors_and_would_otherwise_give_wrong_logits(compiled, saved, tmp_path):
    prog = copy(saved, tmp_path)
    swap_offsets(prog / "weights.safetensors", "state.0_weight_q4_scales", "state.2_weight_q4_scales")
    with pytest.raises(ArtifactError, match="state.0_weight_q4_scales, state.2_weight_q4_scales"):
        fxpress.load(prog)
    manifest = json.loads((prog / "manifest.json").read_text())
    del manifest["integrity"]  # as an artifact saved before digests: loads, warns, and is silently wrong
    (prog / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no recorded digests"):
        loaded = fxpress.load(prog)
    x = torch.randn(3, 64)
    assert not torch.allclose(loaded(x), compiled(x))


@pytest.mark.parametrize("name", ["program.json", "weights.safetensors"])
def test_a_truncated_or_missing_file_is_named(saved, tmp_path, name):
    prog = copy(saved, tmp_path)
    data = (prog / name).read_bytes()
    (prog / name).write_bytes(data[: len(data) - 7])
    with pytest.raises(ArtifactError, match=f"{name}.* does not match the SHA-256"):
        fxpress.load(prog)
    (prog / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name}' is missing"):
        fxpress.load(prog)


def test_genuine_save_records_and_passes_its_digests(compiled, saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert set(manifest["integrity"]["sha256"]) == {"program.json", "weights.safetensors"}
    assert "state.0_weight_q4_scales" in manifest["integrity"]["tensors"]["weights.safetensors"]
    x = torch.randn(3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no digest warning for a fresh save
        assert torch.equal(fxpress.load(saved)(x), compiled(x))


@pytest.fixture(scope="module")
def onnx_path(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    compiled.export("onnx", path)
    return path


def _edit_onnx(src: Path, dst: Path, initializer: str | None = None, drop_digests: bool = False) -> None:
    import onnx

    model = onnx.load(str(src))
    for tensor in model.graph.initializer:
        if initializer and initializer in tensor.name:
            raw = bytearray(tensor.raw_data)
            raw[0] ^= 1
            tensor.raw_data = bytes(raw)
    if drop_digests:
        keep = [p for p in model.metadata_props if p.key != "fxpress.sha256"]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
    onnx.save(model, str(dst))


def test_an_edited_onnx_initializer_is_named(compiled, onnx_path, tmp_path):
    x = torch.randn(3, 64)
    assert torch.allclose(OnnxRunner(onnx_path)(x), compiled(x), atol=1e-5)  # the genuine export verifies
    _edit_onnx(onnx_path, tmp_path / "edited.onnx", initializer="0_weight_q4_packed.scales")
    with pytest.raises(ArtifactError, match=r"edited\.onnx.*initializers changed since export \(0_weight_q4_packed"):
        OnnxRunner(tmp_path / "edited.onnx")
    data = onnx_path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match="cut.onnx"):
        OnnxRunner(tmp_path / "cut.onnx")


def test_an_onnx_artifact_without_digests_runs_with_a_warning(compiled, onnx_path, tmp_path):
    _edit_onnx(onnx_path, tmp_path / "old.onnx", drop_digests=True)
    with pytest.warns(UserWarning, match="no recorded digests"):
        runner = OnnxRunner(tmp_path / "old.onnx")
    x = torch.randn(3, 64)
    assert torch.allclose(runner(x), compiled(x), atol=1e-5)


def test_tvm_weights_and_library_are_verified_before_loading(compiled, tmp_path):
    pytest.importorskip("tvm")
    from fxpress.runtime.runners import TvmRunner

    compiled.export("tvm", tmp_path / "tvm")
    art = Path(shutil.copytree(tmp_path / "tvm", tmp_path / "edited"))
    manifest = json.loads((art / "fxpress.json").read_text())
    x = torch.randn(3, 64)
    assert torch.allclose(TvmRunner(tmp_path / "tvm")(x), compiled(x), atol=1e-5)
    name = next(iter(manifest["integrity"]["tensors"]["weights.safetensors"]))
    flip_bit(art / "weights.safetensors", name)
    with pytest.raises(ArtifactError, match=rf"weights\.safetensors' \(tensors changed: {name}\)"):
        TvmRunner(art)
    shutil.copy(tmp_path / "tvm" / "weights.safetensors", art / "weights.safetensors")
    library = art / manifest["library"]
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    library.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{manifest['library']}' does not match the SHA-256"):
        TvmRunner(art)
