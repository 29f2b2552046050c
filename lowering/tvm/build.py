"""TVM build: import into Relax (fxpress converters + float-preserving, in-place ATen ones), build for the host CPU
(or portable llvm), save atomically."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxpress import graph as G
from fxpress.artifact_names import TVM_MANIFEST
from fxpress.atomic import check_target, staged_dir
from fxpress.errors import ConfigError, LoweringError
from fxpress.integrity import record_digests
from fxpress.lowering.artifacts import TVM_LIBRARY, TVM_WEIGHTS, artifact_metadata
from fxpress.lowering.export import reexport, refuse_bfloat16
from fxpress.lowering.tvm.attention import convert_grouped_attention, rewrite_attention
from fxpress.lowering.tvm.concat import concatenable, emit_concat, logical_shape
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
    """aten.matmul / mm / bmm in the inputs' float type (TVM's frontend fixes out_dtype to float32); x @ wᵀ
    with w a stored weight (what torch.export's decomposition makes of a linear) reads w in place."""
    from tvm import relax

    lhs, rhs = importer.retrieve_args(node)[:2]
    weight = _transposed_weight(node.args[1], importer)
    if weight is not None and dtype_of(weight) == dtype_of(lhs):
        return _dense_linear(importer.block_builder, lhs, weight, None)
    return importer.block_builder.emit(relax.op.linear_algebra.matmul(lhs, rhs, out_dtype=dtype_of(lhs)))


def _convert_aten_addmm(node: Any, importer: Any) -> Any:
    """aten.addmm(bias, x, wᵀ) (a linear with bias, decomposed) as the dense kernel plus the bias."""
    bias, lhs = importer.retrieve_args(node)[:2]
    weight = _transposed_weight(node.args[2], importer)
    plain = len(node.args) < 4 and not node.kwargs  # beta = alpha = 1
    if weight is not None and plain and dtype_of(weight) == dtype_of(lhs):
        return _dense_linear(importer.block_builder, lhs, weight, bias)
    return importer._addmm(node)  # the frontend's own


def _transposed_weight(arg: Any, importer: Any) -> Any:
    """The Relax weight w when the fx argument is permute(w, [1, 0]) / t(w) of a 2-D graph input, else None."""
    name = getattr(getattr(arg, "target", None), "__name__", "")
    if getattr(arg, "op", None) != "call_function" or name not in ("permute.default", "t.default"):
        return None
    if name == "permute.default" and list(arg.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return None
    source = arg.args[0]
    if getattr(source, "op", None) != "placeholder":
        return None
    weight = importer.env.get(source)
    return weight if weight is not None and _static_matrix(weight) else None


def _convert_aten_cat(node: Any, importer: Any) -> Any:
    """aten.cat along an outer axis (the KV cache's past + new) as row copies (`concat.emit_concat`); along the
    last axis (rotary halves) TVM's own concat stays, as it fuses into the elementwise ops around it."""
    from tvm import relax

    tensors, axis = _tensors_and_axis(node, importer)
    picks = tuple(_stacked_entry(arg) for arg in node.args[0])
    picked = [importer.env[arg.args[0]] if pick is not None else t for arg, pick, t in zip(node.args[0], picks, tensors)]
    if concatenable(picked, picks):
        rank = len(logical_shape(picked[0], picks[0]))
        if axis % rank != rank - 1:
            return emit_concat(importer.block_builder, picked, axis, picks=picks)
    return importer.block_builder.emit(relax.op.concat(tensors, axis=axis))


def _stacked_entry(arg: Any) -> int | None:
    """i when the fx argument is select(graph input, 0, i) (a layer's past keys or values in the stacked cache)."""
    if not G.is_op(arg, torch.ops.aten.select.int):
        return None
    source, dim, index = arg.args[:3]
    stacked = getattr(source, "op", None) == "placeholder" and dim == 0 and isinstance(index, int) and index >= 0
    return index if stacked else None


def _convert_aten_stack(node: Any, importer: Any) -> Any:
    """aten.stack (the per-layer KV tensors into one cache tensor) as row copies."""
    from tvm import relax

    tensors, axis = _tensors_and_axis(node, importer)
    if concatenable(tensors):
        return emit_concat(importer.block_builder, tensors, axis, stack=True)
    return importer.block_builder.emit(relax.op.stack(tensors, axis=axis))


def _tensors_and_axis(node: Any, importer: Any) -> tuple[list, int]:
    """The tensor list and the axis (positional or `dim=`, default 0) of an aten.cat / aten.stack."""
    args = importer.retrieve_args(node)
    return list(args[0]), args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


# ATen converters that replace the frontend's own: they keep the input's float type (float64 after Precision)
# and read weights and caches in place
ATEN_CONVERTERS: dict[str, Callable] = {
    "linear.default": _convert_aten_linear,
    **dict.fromkeys(("matmul.default", "mm.default", "bmm.default"), _convert_aten_matmul),
    "addmm.default": _convert_aten_addmm,
    **dict.fromkeys(("cat.default", "concat.default"), _convert_aten_cat),
    "stack.default": _convert_aten_stack,
    "grouped_attention.default": convert_grouped_attention,
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
    """TVM's CPU pipeline (legalize, fuse, lower), plus dlight's CPU schedules (GEMV, reductions).

    Operator fusion turns each chain of elementwise ops (norms, rotary embedding, SiLU gating) into one
    kernel: fewer kernels, fewer intermediate tensors and far fewer VM instructions per decode step.
    FuseTIR fails (a RenewDefs check in TVM 0.27) on a group in which one kernel reads the same tensor
    twice (the rotary table's concatenate(freqs, freqs)), and on some groups of quantized-activation graphs
    (inconsistent buffers for one var); such groups stay unfused, the rest is fused.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _run(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = (cpu.library_dispatch_passes(target)
                      + [relax.transform.DeadCodeElimination(),  # the weights' transposes the dense kernel skips
                         relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                         relax.transform.FoldConstant(), relax.transform.FuseOps(), _unfuse_repeated_reads(),
                         _fuse_tir_where_it_builds()]
                      + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
                      + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return _run


def _unfuse_repeated_reads() -> Any:
    """Module pass: a fused group in which one call_tir passes the same value twice stays a plain function."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="UnfuseRepeatedReads")
    def _run(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if _is_primitive(func) and _reads_twice(func):
                mod[gv] = func.without_attr("Primitive")
        return mod

    return _run


def _fuse_tir_where_it_builds() -> Any:
    """Module pass: FuseTIR, and where it fails, the groups it fails on (found by halving) stay unfused."""
    import tvm
    from tvm import relax

    def fused(mod: Any, groups: list) -> Any:
        """`mod` with only `groups` fused, or None when FuseTIR fails on them."""
        try:
            return relax.transform.FuseTIR()(_only_primitive(mod, groups))
        except Exception:  # TVM's internal checks raise their own error types
            return None

    @tvm.transform.module_pass(opt_level=0, name="FuseTIRWhereItBuilds")
    def _run(mod: Any, _ctx: Any) -> Any:
        groups = [gv for gv, f in mod.functions.items() if _is_primitive(f)]
        whole = fused(mod, groups)
        if whole is not None:
            return whole
        kept: list = []

        def keep_what_fuses(part: list) -> None:
            if fused(mod, kept + part) is not None:
                kept.extend(part)
            elif len(part) > 1:
                keep_what_fuses(part[:len(part) // 2])
                keep_what_fuses(part[len(part) // 2:])

        keep_what_fuses(groups)
        return relax.transform.FuseTIR()(_only_primitive(mod, kept))

    return _run


def _is_primitive(func: Any) -> bool:
    from tvm import relax

    return isinstance(func, relax.Function) and func.attrs is not None and "Primitive" in func.attrs


def _only_primitive(mod: Any, groups: list) -> Any:
    """A copy of `mod` where only `groups` are still fusion groups (the others become plain functions)."""
    keep = {gv.name_hint for gv in groups}
    out = mod.clone() if hasattr(mod, "clone") else type(mod)(mod.functions, mod.global_infos, mod.attrs)
    for gv, func in mod.functions.items():
        if _is_primitive(func) and gv.name_hint not in keep:
            out[gv] = func.without_attr("Primitive")
    return out


def _reads_twice(func: Any) -> bool:
    """Whether any call in `func` takes the same variable as two of its tensor arguments."""
    from tvm import relax

    found = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and len(expr.args) > 1 and isinstance(expr.args[1], relax.Tuple):
            args = [a for a in expr.args[1].fields if isinstance(a, relax.Var)]
            if _has_duplicate(args):
                found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


def _has_duplicate(values: list) -> bool:
    return any(a.same_as(b) for i, a in enumerate(values) for b in values[i + 1:])


def _rewrite(module: Any, sig: Any) -> Any:
    """The TVM lowering's graph rewrite before the re-export: attention over the un-repeated KV heads."""
    rewrite_attention(module)
    return sig


def to_relax(program: Program) -> tuple[Any, list[np.ndarray], list[str], Any]:
    """The Relax IRModule (weights as parameters), the weights, their names, and the signature."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep, sig = reexport(program, rewrite=_rewrite)
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
