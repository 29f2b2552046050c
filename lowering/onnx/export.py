"""ONNX export: re-export, translate with torch.onnx (dynamo), materialize, check, write atomically."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from fxpress.artifact_names import METADATA_KEY
from fxpress.atomic import check_target, companion_name, staged_file
from fxpress.errors import ConfigError, LoweringError
from fxpress.lowering.artifacts import ONNX_DIGESTS_KEY, artifact_metadata, initializer_digests
from fxpress.lowering.export import reexport, refuse_bfloat16
from fxpress.lowering.onnx.accuracy import measure_accuracy_level
from fxpress.lowering.onnx.builder import Materializer
from fxpress.lowering.onnx.external import ExternalData, lazy_store_initializers, optimize_streamed
from fxpress.lowering.onnx.fusion import INT8_MODES, fuse, fuse_int8_activations, gqa_translations
from fxpress.lowering.onnx.genai import genai_rewriter
from fxpress.lowering.onnx.genai_config import check_config_target, write_genai_config
from fxpress.lowering.onnx.registry import ONNX_OPS, translation_table
from fxpress.lowering.onnx.translate import decompose_only_when_needed
from fxpress.lowering.onnx.translate import optimize as optimize_model
from fxpress.program import Program
from fxpress.report import stopwatch

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


def _validate(program: Program, path: str | os.PathLike, weights: str, opset: int, accuracy_level: int | str,
              int8: str = "exact") -> Path:
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
    if accuracy_level not in (0, 1, 2, 3, 4, "auto"):
        raise ConfigError(f"accuracy_level = {accuracy_level!r}: MatMulNBits takes 0 (float), 1 (fp32), 2 (fp16), 3 (bf16), "
                          "4 (int8) or 'auto' (timed on this CPU)")
    if int8 not in INT8_MODES:
        raise ConfigError(f"int8_activations = {int8!r}: choose one of {', '.join(INT8_MODES)}")
    return path


def to_onnx_model(program: Program, weights: str = "matmulnbits", opset: int = 21, accuracy_level: int = 0,
                  optimize: bool = True, additive_masks: bool = True, fused: bool = True,
                  sink: ExternalData | None = None, int8_activations: str = "exact") -> tuple[Any, dict[str, Any]]:
    """The materialized onnx_ir Model and export statistics.

    fused: a causal LM gets onnxruntime-genai's I/O and ONNX Runtime's fused kernels (genai.py, fusion.py).
    A store-backed program's initializers read the weight store when their values are needed; with `sink` (what
    export_onnx gives such a program) every large initializer is written to its external data file as it is made,
    so the q/k/v and gate/up MatMulNBits stay separate there (merging them would write their weights twice).
    """
    lap = stopwatch()
    rewrite, done = genai_rewriter(program) if fused else (None, None)
    ep, sig = reexport(program, additive_masks=additive_masks, rewrite=rewrite)
    lap("reexport")
    table = {**translation_table(), **gqa_translations()}
    path_taken: dict[str, Any] = {}
    try:
        with decompose_only_when_needed(path_taken):
            onnx_program = torch.onnx.export(
                ep, sig.example_args, dynamo=True, opset_version=opset, input_names=list(sig.input_names),
                output_names=list(sig.output_names), custom_translation_table=table, optimize=False, verbose=False,
            )
        lazy_store_initializers(onnx_program.model, program.weights)
        if optimize and program.weights is not None:  # after the placeholders read the store
            optimize_streamed(onnx_program.model)
        elif optimize:
            optimize_model(onnx_program.model)
    except LoweringError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(f"torch.onnx.export failed on the compiled program: {type(err).__name__}: {first}") from err
    lap("torch_onnx_export")
    model = onnx_program.model
    for node in model.graph.all_nodes():  # the exporter's per-node stack traces: megabytes on a real model
        node.metadata_props.clear()
    materializer = Materializer(model, weights, opset, accuracy_level, sink)
    stats = materializer.run(ONNX_OPS)
    stats.update(path_taken)
    lap("materialize")
    extra = {"weights": weights, "opset": opset, "accuracy_level": accuracy_level, "io": "stacked"}
    if fused:
        stats.update(fuse(model, materializer, merge_weights=sink is None))
        stats.update(done.stats() if done else {})
        extra["io"] = stats.get("io", "stacked")
        lap("fuse")
    stats.update(fuse_int8_activations(model, materializer, int8_activations, new_weights=sink is None))
    if sink is not None:
        sink.put_initializers(model.graph)
        stats["streamed"] = dict(sink.stats)
    _rename_dims(model, sig.dim_names)
    meta = artifact_metadata(program, sig, extra)
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    model.metadata_props[ONNX_DIGESTS_KEY] = json.dumps(initializer_digests(model, sink.digests if sink else None))
    model.producer_name = "fxpress"
    lap("digests")
    stats["seconds"] = lap.times
    return model, stats


def _initializer_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def export_onnx(program: Program, path: str | os.PathLike, weights: str = "matmulnbits", opset: int = 21,
                accuracy_level: int | str = 0, external_data: bool | None = None, optimize: bool = True,
                check: bool = True, additive_masks: bool = True, overwrite: bool = False,
                fused: bool = True, int8_activations: str = "exact") -> dict[str, Any]:
    """Write `program` as an ONNX model at `path` (atomically); returns statistics (sizes, kernels used).

    weights: "matmulnbits" (ONNX Runtime's int kernels) or "dequantizelinear" (standard ONNX, opset >= 21).
    accuracy_level: MatMulNBits compute type; 0 = the activations' float type (matches PyTorch), 4 = int8
    activations (faster, ~1e-2 relative error); "auto" times both on this CPU (accuracy.py) and reports the
    choice and timings in the statistics; runners apply the same level to fused DequantizeLinear.
    external_data: None = only when the weights exceed 2 GB (then `<path>.<id>.data` is written beside the model);
    always for a store-backed program, whose weights go from the store to that file one tensor at a time.
    optimize: run onnxscript's graph optimizer (constant folding, fusions) on the exported graph.
    additive_masks: a causal LM's boolean attention mask becomes additive (no all-masked-row guard; see
    lowering/export.py); False keeps the exporter's guarded form.
    overwrite: replace `path` even when it is not an fxpress ONNX file (checked before any work).
    fused: a causal LM gets onnxruntime-genai's I/O (per-layer past_key_values.{i}.key/value, attention_mask,
    genai_config.json written beside it) and ONNX Runtime's fused kernels (GroupQueryAttention,
    SkipSimplifiedLayerNormalization, fused q/k/v and gate/up MatMulNBits); False keeps the plain form.
    int8_activations: what an 8-bit symmetric per-row activation quantizer (ActQuant(bits=8)) lowers to (fusion.py):
    "exact" (default) = fed to 8-bit per-channel weights (W8A8), MatMulInteger on the same int8 codes (ONNX
    Runtime's int8 GEMM, ~4x a float32 MatMul; the integer products are exact, so each linear equals PyTorch's up
    to float rounding), elsewhere the fake quant around float compute; "all" = that, and fed to 4-bit weights
    (W4A8) no fake quant: MatMulNBits at accuracy_level 4 quantizes the activations itself per block of K, finer
    than per row, so it is not the PyTorch program's numerics (SmolLM2: decode 0.7x W4A16, perplexity 2.7% *lower*
    than the PyTorch W4A8 program, outside bootstrap noise: benchmarks/bench_int8.py), hence opt-in; "none" = the
    fake quant everywhere. Counts in the statistics: int8_matmulinteger, int8_matmulnbits_level4,
    int8_quantizers_kept (8-bit quantizers left as fake quant: asymmetric, group-wise 8-bit weights, float64...).
    A store-backed (streamed) export keeps W8A8 as MatMulNBits (its weights are written already).
    """
    path = _validate(program, path, weights, opset, accuracy_level, int8_activations)
    check_target(path, directory=False, overwrite=overwrite)
    if fused and program.is_causal_lm:
        check_config_target(path, overwrite)
    if program.weights is not None and external_data is False:
        raise ConfigError("external_data=False: a store-backed program's weights are streamed to an external data "
                          "file beside the model; drop external_data (or load the program in memory)")
    timings = None
    if accuracy_level == "auto":
        accuracy_level, timings = measure_accuracy_level()
    options = {"weights": weights, "opset": opset, "accuracy_level": accuracy_level, "optimize": optimize,
               "additive_masks": additive_masks, "fused": fused, "int8_activations": int8_activations}
    start = time.perf_counter()
    if program.weights is not None:  # store-backed: weights streamed from the store to external data
        files, stats = _write_streamed(program, path, options, check, overwrite)
        external_data = True
    else:
        model, stats = to_onnx_model(program, **options)
        if external_data is None:
            external_data = _initializer_bytes(model) > EXTERNAL_DATA_BYTES
        start = time.perf_counter()
        files = _write(model, path, external_data, check, overwrite)
    stats["seconds"]["write_and_check"] = round(time.perf_counter() - start, 3)
    stats.update({"accuracy_level": accuracy_level, "accuracy_level_ms": timings})
    if stats.get("io") == "genai":  # after the model is in place: a config never names a missing model
        files.append(write_genai_config(path, program.info, (program.info.extra or {}).get("eos_token_id")))
    stats.update({"path": str(path), "bytes": sum(f.stat().st_size for f in files), "external_data": external_data,
                  "weights": weights, "opset": opset})
    return stats


def _write_streamed(program: Program, path: Path, options: dict[str, Any], check: bool,
                    overwrite: bool) -> tuple[list[Path], dict[str, Any]]:
    """Export into a staging folder, each initializer written to `<path>.<id>.data` as it is made; then publish."""
    import onnx_ir as ir

    data_name = companion_name(path, ".data")
    with staged_file(path, overwrite=overwrite) as tmp:
        sink = ExternalData(tmp.parent / data_name)
        try:
            model, stats = to_onnx_model(program, **options, sink=sink)
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
