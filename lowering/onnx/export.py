"""ONNX export: re-export, translate with torch.onnx (dynamo), materialize, check, write atomically."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fxpress.artifact_names import METADATA_KEY
from fxpress.atomic import check_target, companion_name, staged_file
from fxpress.errors import ConfigError, LoweringError
from fxpress.lowering.artifacts import ONNX_DIGESTS_KEY, artifact_metadata, initializer_digests
from fxpress.lowering.export import reexport, refuse_bfloat16
from fxpress.lowering.onnx.builder import Materializer
from fxpress.lowering.onnx.external import ExternalData, lazy_store_initializers, optimize_streamed
from fxpress.lowering.onnx.registry import ONNX_OPS, translation_table
from fxpress.program import Program

WEIGHT_FORMATS = ("matmulnbits", "dequantizelinear")
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with margin for the graph itself


def _rename_dims(model: Any, names: dict[str, str]) -> None:
    """Give dynamic dims readable names (batch, seq, past) on the graph's inputs and outputs."""
    import onnx_ir as ir

    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        dims = []
        for d in value.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                text = str(d.value) if hasattr(d, "value") else str(d)
                dims.append(pattern.sub(lambda m: names[m.group(1)], text) if text != "None" else None)
        value.shape = ir.Shape(dims)


def _validate(program: Program, path: str | os.PathLike, weights: str, opset: int, accuracy_level: int) -> Path:
    if not isinstance(program, Program):
        raise ConfigError(f"export_onnx needs an fxpress Program (e.g. compiled.program), got {type(program).__name__}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights = {weights!r} is not a weight format: choose one of {', '.join(WEIGHT_FORMATS)}")
    if not isinstance(opset, int) or opset < 21:
        raise ConfigError(f"opset = {opset!r}: the ONNX lowering needs opset >= 21 (blocked DequantizeLinear, INT4)")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ConfigError(f"ONNX artifact path '{path}' should end in .onnx")
    refuse_bfloat16(program, "ONNX Runtime's CPU kernels (Mul, MatMulNBits)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level = {accuracy_level!r}: MatMulNBits takes 0 (float), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
    return path


def to_onnx_model(program: Program, weights: str = "matmulnbits", opset: int = 21, accuracy_level: int = 0,
                  optimize: bool = True, additive_masks: bool = True, sink: ExternalData | None = None,
                  ) -> tuple[Any, dict[str, Any]]:
    """The materialized onnx_ir Model and export statistics.

    A store-backed program's initializers read the weight store when their values are needed; with `sink` (what
    export_onnx gives such a program) every large initializer is written to its external data file as it is made.
    """
    ep, sig = reexport(program, additive_masks=additive_masks)
    table = translation_table()
    try:
        onnx_program = torch.onnx.export(
            ep, sig.example_args, dynamo=True, opset_version=opset, input_names=list(sig.input_names),
            output_names=list(sig.output_names), custom_translation_table=table, optimize=False, verbose=False,
        )
        lazy_store_initializers(onnx_program.model, program.weights)
        if optimize and program.weights is not None:  # after the placeholders read the store
            optimize_streamed(onnx_program.model)
        elif optimize:
            onnx_program.optimize()
    except LoweringError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(f"torch.onnx.export failed on the compiled program: {type(err).__name__}: {first}") from err
    model = onnx_program.model
    for node in model.graph.all_nodes():  # the exporter's per-node stack traces: megabytes on a real model
        node.metadata_props.clear()
    stats = Materializer(model, weights, opset, accuracy_level, sink).run(ONNX_OPS)
    if sink is not None:
        sink.put_initializers(model.graph)
        stats["streamed"] = dict(sink.stats)
    _rename_dims(model, sig.dim_names)
    meta = artifact_metadata(program, sig, {"weights": weights, "opset": opset, "accuracy_level": accuracy_level})
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    model.metadata_props[ONNX_DIGESTS_KEY] = json.dumps(initializer_digests(model, sink.digests if sink else None))
    model.producer_name = "fxpress"
    return model, stats


def _initializer_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def export_onnx(program: Program, path: str | os.PathLike, weights: str = "matmulnbits", opset: int = 21,
                accuracy_level: int = 0, external_data: bool | None = None, optimize: bool = True,
                check: bool = True, additive_masks: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write `program` as an ONNX model at `path` (atomically); returns statistics (sizes, kernels used).

    weights: "matmulnbits" (ONNX Runtime's int kernels) or "dequantizelinear" (standard ONNX, opset >= 21).
    accuracy_level: MatMulNBits compute type; 0 = the activations' float type (matches PyTorch), 4 = int8
    activations (faster, ~1e-2 relative error); runners apply the same level to fused DequantizeLinear.
    external_data: None = only when the weights exceed 2 GB (then `<path>.<id>.data` is written beside the model);
    always for a store-backed program, whose weights go from the store to that file one tensor at a time.
    optimize: run onnxscript's graph optimizer (constant folding, fusions) on the exported graph.
    additive_masks: a causal LM's boolean attention mask becomes additive (no all-masked-row guard; see
    lowering/export.py); False keeps the exporter's guarded form.
    overwrite: replace `path` even when it is not an fxpress ONNX file (checked before any work).
    """
    path = _validate(program, path, weights, opset, accuracy_level)
    check_target(path, directory=False, overwrite=overwrite)
    if program.weights is not None:  # store-backed: weights streamed from the store to external data
        if external_data is False:
            raise ConfigError("external_data=False: a store-backed program's weights are streamed to an external data "
                              "file beside the model; drop external_data (or load the program in memory)")
        args = (weights, opset, accuracy_level, optimize, additive_masks)
        files, stats = _write_streamed(program, path, args, check, overwrite)
        external_data = True
    else:
        model, stats = to_onnx_model(program, weights, opset, accuracy_level, optimize, additive_masks)
        if external_data is None:
            external_data = _initializer_bytes(model) > EXTERNAL_DATA_BYTES
        files = _write(model, path, external_data, check, overwrite)
    stats.update({"path": str(path), "bytes": sum(f.stat().st_size for f in files), "external_data": external_data,
                  "weights": weights, "opset": opset})
    return stats


def _write_streamed(program: Program, path: Path, args: tuple, check: bool,
                    overwrite: bool) -> tuple[list[Path], dict[str, Any]]:
    """Export into a staging folder, each initializer written to `<path>.<id>.data` as it is made; then publish."""
    import onnx_ir as ir

    data_name = companion_name(path, ".data")
    with staged_file(path, overwrite=overwrite) as tmp:
        sink = ExternalData(tmp.parent / data_name)
        try:
            model, stats = to_onnx_model(program, *args, sink=sink)
        finally:
            sink.close()
        ir.save(model, tmp)
        if check:
            _check(tmp)
    return [path, path.parent / data_name], stats


def _write(model: Any, path: Path, external_data: bool, check: bool, overwrite: bool) -> list[Path]:
    """Save into a staging folder beside `path`, check, then publish (fxpress.atomic); returns the files."""
    import onnx_ir as ir

    data_name = companion_name(path, ".data") if external_data else None
    with staged_file(path, overwrite=overwrite) as tmp:
        ir.save(model, tmp, external_data=data_name)
        if check:
            _check(tmp)
    return [path] + ([path.parent / data_name] if data_name else [])


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise LoweringError(f"the exported ONNX model does not pass onnx.checker: {str(err).splitlines()[0]}") from err
