"""torch.onnx's translation cut to what fxpress's graphs need (lowering/onnx/translate.py): the same artifact
as the exporter's full path, and the rotated model's scale-less norms fused."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fxpress.capture import capture  # noqa: E402
from fxpress.lowering.onnx import (
    export_onnx,  # noqa: E402
    translate,  # noqa: E402
)
from fxpress.lowering.onnx.fusion import UNIT_SCALE  # noqa: E402
from fxpress.passes import FoldHadamard, Quantize, Rotate  # noqa: E402
from fxpress.passes.manager import run_passes  # noqa: E402
from fxpress.passes.quantize import WeightQuant  # noqa: E402
from fxpress.runtime.runners import OnnxRunner, TorchRunner  # noqa: E402
from fxpress.zoo import tiny_causal_lm  # noqa: E402


def _outputs(path, ids: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), dtype=np.float32)
    return session.run(None, feeds)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_skipping_the_retrace_gives_the_exporters_artifact(tmp_path, monkeypatch, family):
    """Bit-identical outputs, and no more nodes, with and without torch.onnx's decomposition re-trace."""
    program = capture(tiny_causal_lm(family))
    run_passes(program, [Quantize(weights=WeightQuant(bits=4, group_size=32))], progress=False)
    fast = export_onnx(program, tmp_path / "fast" / "m.onnx")
    assert fast["decomposition"].startswith("skipped")
    monkeypatch.setattr(translate, "untranslatable_ops", lambda graph, registry: {"forced"})
    full = export_onnx(program, tmp_path / "full" / "m.onnx")
    assert full["decomposition"].startswith("torch.onnx")
    kinds = [collections.Counter(n.op_type for n in onnx.load(str(tmp_path / d / "m.onnx")).graph.node)
             for d in ("fast", "full")]
    assert sum(kinds[0].values()) <= sum(kinds[1].values()) and kinds[0]["MatMulNBits"] == kinds[1]["MatMulNBits"]
    ids = np.random.default_rng(0).integers(0, 256, (1, 9)).astype(np.int64)
    for a, b in zip(_outputs(tmp_path / "fast" / "m.onnx", ids), _outputs(tmp_path / "full" / "m.onnx", ids)):
        np.testing.assert_array_equal(a, b)


def test_in_place_and_list_ops_take_the_full_decomposition(tmp_path):
    """MoE routing (index_put_, chunk) needs the re-trace's functionalization: the export says so and still runs."""
    program = capture(tiny_causal_lm("qwen2_moe"))
    stats = export_onnx(program, tmp_path / "m.onnx")
    assert stats["decomposition"].startswith("torch.onnx")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    got, ref = OnnxRunner(tmp_path / "m.onnx")(ids), TorchRunner(program)(ids)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_training_forms_are_rewritten_to_what_the_decomposition_makes():
    class Casts(torch.nn.Module):
        def forward(self, x):
            c = torch.tensor([2.0]).detach_()
            return x.to(torch.float64).to("cpu", torch.float32) * c

    ep = torch.export.export(Casts(), (torch.ones(3),), strict=False)
    changed = translate.rewrite_training_forms(ep.graph_module)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert changed >= 3 and torch.ops.aten._to_copy.default in targets
    assert not targets & {torch.ops.aten.detach_.default, torch.ops.aten.to.dtype, torch.ops.aten.to.device}
    assert torch.equal(ep.module()(torch.ones(3)), torch.full((3,), 2.0))


def test_rotated_norms_without_scales_fuse(tmp_path):
    """Rotate folds every RMSNorm scale into the next weights; the norms still become (Skip)SimplifiedLayerNorm
    with one shared scale of ones, and the artifact matches the program."""
    program = capture(tiny_causal_lm("llama"))
    run_passes(program, [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(bits=4, group_size=32))],
               progress=False)
    stats = export_onnx(program, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    kinds = collections.Counter(n.op_type for n in model.graph.node)
    assert stats["skip_simplified_layer_norm"] == kinds["SkipSimplifiedLayerNormalization"] == 4
    assert kinds["Pow"] == 0 and kinds["Constant"] == 0
    units = [i for i in model.graph.initializer if i.name.startswith(UNIT_SCALE)]
    assert len(units) == 1 and np.all(onnx.numpy_helper.to_array(units[0]) == 1)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    got, ref = OnnxRunner(tmp_path / "m.onnx")(ids), TorchRunner(program)(ids)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


