"""TVM build: import into Relax (fxpress converters + float-preserving ATen ones), build for llvm, save atomically."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fxpress.artifact_names import TVM_MANIFEST
from fxpress.atomic import check_target, staged_dir
from fxpress.errors import ConfigError, LoweringError
from fxpress.integrity import record_digests
from fxpress.lowering.artifacts import TVM_LIBRARY, TVM_WEIGHTS, artifact_metadata
from fxpress.lowering.export import reexport, refuse_bfloat16
from fxpress.lowering.tvm.registry import convert_map
from fxpress.lowering.tvm.relax_helpers import dtype_of, restore, rows_view, shape_of
from fxpress.program import Program
from fxpress.weights import format_bytes


def _convert_aten_linear(node: Any, importer: Any) -> Any:
    """aten.linear in the input's float type (TVM's frontend emits out_dtype float32 whatever the input, so a
    float64 program would round its LM head), as `row_dot.dense_kernel`: the weight read in its stored [n, k]
    layout, where TVM's own `linear` transposes the whole weight on every call and runs an unscheduled matmul."""
    from tvm import relax

    args = importer.retrieve_args(node)
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if not _static_matrix(weight) or dtype_of(weight) != dtype_of(x):
        return importer.block_builder.emit(relax.op.linear(x, weight, bias, dtype_of(x)))
    return _dense_linear(importer.block_builder, x, weight, bias)


def _static_matrix(value: Any) -> bool:
    """A 2-D tensor of known shape (a weight), the case the dense kernel is built for."""
    from tvm import tirx

    shape = getattr(value.ty, "shape", None)
    dims = getattr(shape, "values", None)
    return dims is not None and len(dims) == 2 and all(isinstance(d, tirx.IntImm) for d in dims)


def _dense_linear(bb: Any, x: Any, weight: Any, bias: Any) -> Any:
    from tvm import relax

    from fxpress.lowering.tvm.row_dot import dense_kernel

    n, k = (int(d) for d in shape_of(weight))
    dtype = dtype_of(x)
    x2, rows, lead = rows_view(bb, x, k)
    gv = bb.add_func(dense_kernel(n, k, dtype), "dense_linear")
    y = bb.emit(relax.call_tir(gv, [x2, weight], out_ty=relax.TensorType([rows, n], dtype)))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return restore(bb, y, lead, n)


def _convert_aten_matmul(node: Any, importer: Any) -> Any:
    """aten.matmul / mm / bmm in the inputs' float type (TVM's frontend fixes out_dtype to float32)."""
    from tvm import relax

    lhs, rhs = importer.retrieve_args(node)[:2]
    return importer.block_builder.emit(relax.op.linear_algebra.matmul(lhs, rhs, out_dtype=dtype_of(lhs)))


# ATen converters that replace the frontend's own: they keep the input's float type (float64 after Precision)
ATEN_CONVERTERS: dict[str, Callable] = {
    "linear.default": _convert_aten_linear,
    **dict.fromkeys(("matmul.default", "mm.default", "bmm.default"), _convert_aten_matmul),
}


HOST_TARGET = "host"  # llvm for this machine's CPU (AVX2 / AVX-512 where it has them); "llvm" is portable x86-64


def host_target() -> dict[str, str]:
    """LLVM for the CPU this process runs on, named as LLVM names it (e.g. 'emeraldrapids')."""
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}


def _target(target: Any) -> Any:
    """A TVM Target from 'host', a target string ('llvm', 'llvm -mcpu=skylake-avx512') or a config dict.

    Why 'host' is the default: generic x86-64 ('llvm' alone) has no AVX2/FMA, so every vector kernel runs
    several times slower; an artifact built for the host needs a CPU with the same features to run.
    """
    import tvm

    if target == HOST_TARGET:
        target = host_target()
    elif isinstance(target, str):
        target = {"kind": target} if " " not in target else target
    try:
        return tvm.target.Target(target)
    except Exception as err:  # TVM raises its own error types for unknown targets
        raise ConfigError(f"target {target!r} is not a TVM target: use 'host' (this CPU), 'llvm' (portable x86-64) "
                          "or {'kind': 'llvm', 'mcpu': 'skylake-avx512'}") from err


def _pipeline(target: Any) -> Any:
    """TVM's CPU pipeline without operator fusion, plus dlight's CPU schedules (GEMV, reductions).

    FuseOps/FuseTIR fail on the attention graphs transformers emits (a RenewDefs check in TVM 0.27), so
    operators stay unfused; dlight parallelises and vectorises the decode-time matrix-vector products.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _run(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = (cpu.library_dispatch_passes(target) + [relax.transform.LegalizeOps()]
                      + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
                      + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return _run


def to_relax(program: Program) -> tuple[Any, list[np.ndarray], list[str], Any]:
    """The Relax IRModule (weights as parameters), the weights, their names, and the signature."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep, sig = reexport(program)
    table = {**convert_map(), **ATEN_CONVERTERS}
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=False,
                                    custom_convert_map=table)
    except Exception as err:  # the frontend raises KeyError/ValueError/TVM errors for unsupported ops
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(f"TVM's PyTorch frontend could not import the program: {type(err).__name__}: {first}") from err
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    # The exporter's upper bounds (8192 positions, 1024 rows) make the memory planner reserve the worst case.
    mod["main"] = func.without_attr("tir_var_upper_bound")
    arrays = [p.numpy() for p in params.get("main", [])]
    return mod, arrays, _dedupe_names(arrays), sig


def _dedupe_names(arrays: list[np.ndarray]) -> list[str]:
    """One stored name per distinct tensor: tied weights (embedding = lm_head) are saved once."""
    names: list[str] = []
    seen: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        key = (a.shape, str(a.dtype))
        twin = next((j for j in seen.get(key, []) if np.array_equal(arrays[j], a)), None)
        names.append(names[twin] if twin is not None else f"p{i:04d}")
        if twin is None:
            seen.setdefault(key, []).append(i)
    return names


def refuse_store_backed(program: Program) -> None:
    """TVM's frontend takes the weights' values and its runner binds them all in memory: a store-backed program
    (weights outside memory) is refused before any work, with the memory the TVM path would need."""
    store = program.weights
    if store is None:
        return
    need = format_bytes(store.total_bytes())
    raise LoweringError(
        f"the TVM lowering needs the weights in memory ({need} for this program), but they are in a weight store "
        f"(budget {format_bytes(store.budget) if store.budget else 'none'}): export ONNX instead (it streams them), "
        f"or compile / load the program in memory (no max_memory, or fxpress.load(..., lazy=False)) if {need} fits"
    )


def export_tvm(program: Program, path: str | os.PathLike, target: Any = HOST_TARGET, schedule: bool = True,
               overwrite: bool = False) -> dict[str, Any]:
    """Build `program` for `target` and write the artifact directory at `path` (atomically); returns statistics.

    The directory holds `model-<id>.so` (the Relax VM executable), `weights.safetensors` and `fxpress.json`.
    A directory at `path` that fxpress did not write is refused before the build unless `overwrite`.
    `target`: 'host' (this CPU's instruction set; the manifest records it), 'llvm' (any x86-64), or a TVM target.
    """
    import tvm

    if not isinstance(program, Program):
        raise ConfigError(f"export_tvm needs an fxpress Program (e.g. compiled.program), got {type(program).__name__}")
    path = check_target(path, directory=True, overwrite=overwrite)
    refuse_bfloat16(program, "TVM's PyTorch frontend")
    refuse_store_backed(program)
    tgt = _target(target)
    mod, arrays, names, sig = to_relax(program)
    try:
        pipeline = _pipeline(tgt) if schedule else "default"
        executable = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except Exception as err:  # build failures come as TVM errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(f"TVM could not build the program for {tgt}: {type(err).__name__}: {first}") from err
    library = TVM_LIBRARY.format(uuid.uuid4().hex[:12])
    with staged_dir(path, overwrite=overwrite) as tmp:
        executable.export_library(str(tmp / library))
        files = _write_weights(tmp, library, names, arrays)
        manifest = artifact_metadata(program, sig, {"target": str(tgt), "library": library, "weights": TVM_WEIGHTS,
                                                    "params": names, "files": files,
                                                    "integrity": record_digests(tmp, files)})
        (tmp / TVM_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"path": str(path), "bytes": sum(files.values()), "weight_bytes": files[TVM_WEIGHTS],
            "library_bytes": files[library], "target": str(tgt)}


def _write_weights(directory: Path, library: str, names: list[str], arrays: list[np.ndarray]) -> dict[str, int]:
    """Save each distinct weight once beside the library; returns the artifact's files and their sizes."""
    from safetensors.numpy import save_file

    unique: dict[str, np.ndarray] = {}
    for name, array in zip(names, arrays):
        unique.setdefault(name, np.ascontiguousarray(array))
    save_file(unique, str(directory / TVM_WEIGHTS))
    return {f: (directory / f).stat().st_size for f in (library, TVM_WEIGHTS)}
