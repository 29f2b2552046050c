"""Every fxpress op has a reference kernel, a fake kernel, and a lowering for ONNX and for TVM."""

from __future__ import annotations

import pytest
import torch

import fxpress.lowering.onnx  # noqa: F401  (registers the ONNX translations)
import fxpress.lowering.tvm  # noqa: F401  (registers the TVM converters)
import fxpress.runtime  # noqa: F401  (defines the ops)
from fxpress.runtime.ops import EXPORT_TARGETS, LOWERING_TARGETS, OPS, missing_parts

pytest.importorskip("onnxscript")


def _all_op_modules_imported() -> None:
    """Ops defined in runtime modules that runtime/__init__ does not import yet still count."""
    import importlib
    import pkgutil

    import fxpress.runtime as rt

    for info in pkgutil.iter_modules(rt.__path__):
        if info.name not in ("runners", "generate"):
            importlib.import_module(f"fxpress.runtime.{info.name}")
    fxpress.lowering.onnx.register_translations()
    fxpress.lowering.tvm.register_converters()


def test_every_op_has_an_onnx_and_a_tvm_lowering():
    _all_op_modules_imported()
    assert OPS, "no fxpress ops are defined"
    assert missing_parts() == {}, f"ops without a lowering: {missing_parts()}"
    for spec in OPS.values():
        assert set(LOWERING_TARGETS) <= set(spec.lowerings), spec.name


def test_every_op_has_a_reference_and_a_fake_kernel():
    _all_op_modules_imported()
    for spec in OPS.values():
        assert callable(spec.kernel) and callable(spec.fake), spec.name
        assert spec.doc, f"fxpress::{spec.name} has no doc"
        assert spec.overload is getattr(torch.ops.fxpress, spec.name).default


def test_translation_tables_cover_every_op():
    from fxpress.lowering.onnx import translation_table
    from fxpress.lowering.tvm import convert_map

    _all_op_modules_imported()
    assert set(translation_table()) == {spec.overload for spec in OPS.values()}
    assert set(convert_map()) == {f"{name}.default" for name in OPS}


def test_export_targets_name_their_exporters():
    """One table of targets: each names an importable exporter; only per-op targets need op lowerings."""
    assert set(LOWERING_TARGETS) == {name for name, target in EXPORT_TARGETS.items() if target.per_op}
    assert {"onnx", "tvm", "hls", "fpga"} <= set(EXPORT_TARGETS)
    for target in EXPORT_TARGETS.values():
        assert callable(target.export_function()), target.name


def test_an_onnx_lowering_without_materialize_is_refused():
    from fxpress.lowering.onnx.registry import ONNX_OPS, OnnxOp, onnx_lowering

    class Unfinished(OnnxOp):
        op = "linear_nbit"
        inputs = 5

    with pytest.raises(TypeError, match="Unfinished lowers 'linear_nbit' but does not define materialize"):
        onnx_lowering(Unfinished)
    assert "Unfinished" not in ONNX_OPS
