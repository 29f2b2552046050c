"""TVM lowering: Relax from the re-exported program, a converter per `fxpress` op, built for llvm.

re-export → import (from_exported_program + fxpress converters) → build → save:
- `fxpress::linear_nbit` (and the grouped MoE variant) become TensorIR kernels that read the packed
  MatMulNBits bytes directly (unpack, subtract the zero point, scale, accumulate), so the weights stay
  low-bit in memory and on disk; `fxpress::hadamard` is a TensorIR butterfly (n log n adds) plus one
  K x K contraction; activation quantization and threshold neurons are Relax ops;
- weights stay function parameters (`keep_params_as_input`) and are saved beside the library in a
  safetensors file, packed bytes as uint8;
- the artifact is a directory (library, weights, `fxpress.json` manifest), built in a temporary
  directory and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fxpress.errors import ConfigError, LoweringError
from fxpress.lowering.export import reexport
from fxpress.program import Program
from fxpress.runtime.ops import OPS, register_lowering

MANIFEST = "fxpress.json"
LIBRARY = "model-{}.so"  # unique per export: dlopen caches libraries by path, so a re-export needs a new name
WEIGHTS = "weights.safetensors"
ARTIFACT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# TensorIR kernels
# --------------------------------------------------------------------------------------------------
def _code(T: Any, buf: Any, row: Any, block_ix: Any, pos: Any, bits: int) -> Any:
    """The `bits`-bit code at bit offset `pos` of buf[row, block_ix, :] (low bits first, may straddle bytes)."""
    mask = (1 << bits) - 1
    byte = pos // 8
    shift = pos % 8
    low = T.Cast("int32", buf[row, block_ix, byte])
    if 8 % bits == 0:  # 1, 2, 4, 8 bits never straddle a byte
        return T.bitwise_and(T.shift_right(low, shift), mask)
    high = T.if_then_else(shift + bits > 8, T.Cast("int32", buf[row, block_ix, byte + 1]), 0)
    return T.bitwise_and(T.shift_right(T.bitwise_or(low, T.shift_left(high, 8)), shift), mask)


def _accumulate_row(k: int, k_blocks: int, block: int, bits: int, dtype: str) -> Any:
    """TVMScript macro shared by the packed kernels: y[r, j] += Σ_k x[r, k] · (code[j, k] − zero) · scale, block by
    block (y[r, j] must be zeroed first); inlined where it is called, so each kernel stays one loop nest."""
    from tvm.script import tirx as T

    @T.macro
    def accumulate(x: Any, qw: Any, sc: Any, zp: Any, y: Any, r: Any, j: Any) -> None:
        for b in range(k_blocks):
            zero = T.Cast(dtype, _code(T, zp, j, 0, b * bits, bits))
            partial = T.Cast(dtype, 0)
            for i in range(T.min(block, k - b * block)):
                partial = partial + x[r, b * block + i] * (T.Cast(dtype, _code(T, qw, j, b, i * bits, bits)) - zero)
            y[r, j] = y[r, j] + partial * sc[j, b]

    return accumulate


def linear_nbit_kernel(n: int, k: int, k_blocks: int, block: int, bits: int, zero_bytes: int,
                       dtype: str = "float32") -> Any:
    """y[r, j] = Σ_k x[r, k] · (code[j, k] − zero[j, k / block]) · scale[j, k / block], rows symbolic.

    Parallel over output channels; each weight byte is read once per row, never expanded to float in memory.
    """
    from tvm.script import tirx as T

    bytes_per_block = block * bits // 8
    accumulate = _accumulate_row(k, k_blocks, block, bits, dtype)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, qw: T.Buffer((n, k_blocks, bytes_per_block), "uint8"),
               sc: T.Buffer((n, k_blocks), dtype), zp: T.Buffer((n, 1, zero_bytes), "uint8"), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, k), dtype)
        y = T.match_buffer(var_y, (rows, n), dtype)
        with T.sblock("root"):
            for j in T.parallel(n):
                for r in range(rows):
                    y[r, j] = T.Cast(dtype, 0)
                    accumulate(x, qw, sc, zp, y, r, j)

    return kernel


def grouped_linear_nbit_kernel(n: int, k: int, k_blocks: int, block: int, bits: int, zero_bytes: int,
                               experts: int, expert: int, offset_dtype: str, dtype: str = "float32") -> Any:
    """One expert's rows [offsets[e-1], offsets[e]) of the grouped matmul (linear_nbit's loop body); other rows are 0."""
    from tvm.script import tirx as T

    bytes_per_block = block * bits // 8
    accumulate = _accumulate_row(k, k_blocks, block, bits, dtype)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, offsets: T.Buffer((experts,), offset_dtype),
               qw: T.Buffer((n, k_blocks, bytes_per_block), "uint8"), sc: T.Buffer((n, k_blocks), dtype),
               zp: T.Buffer((n, 1, zero_bytes), "uint8"), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, k), dtype)
        y = T.match_buffer(var_y, (rows, n), dtype)
        with T.sblock("root"):
            for j in T.parallel(n):
                for r in range(rows):
                    y[r, j] = T.Cast(dtype, 0)
                    start = T.Cast("int64", offsets[expert - 1]) if expert > 0 else T.int64(0)
                    if start <= r and r < T.Cast("int64", offsets[expert]):
                        accumulate(x, qw, sc, zp, y, r, j)

    return kernel


def embedding_nbit_kernel(vocab: int, dim: int, k_blocks: int, block: int, bits: int, zero_bytes: int,
                          ids_dtype: str, dtype: str = "float32") -> Any:
    """y[r, c] = (code[id, c] − zero[id, c / block]) · scale[id, c / block] with id = ids[r] (clamped into the
    table, so a bad id reads a real row instead of foreign memory); only the gathered rows are unpacked."""
    from tvm.script import tirx as T

    bytes_per_block = block * bits // 8

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_ids: T.handle, qw: T.Buffer((vocab, k_blocks, bytes_per_block), "uint8"),
               sc: T.Buffer((vocab, k_blocks), dtype), zp: T.Buffer((vocab, 1, zero_bytes), "uint8"), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        rows = T.int64()
        ids = T.match_buffer(var_ids, (rows,), ids_dtype)
        y = T.match_buffer(var_y, (rows, dim), dtype)
        with T.sblock("root"):
            for r in T.parallel(rows):
                for c in range(dim):
                    row = T.max(T.min(T.Cast("int64", ids[r]), T.int64(vocab - 1)), T.int64(0))
                    b = c // block
                    code = T.Cast(dtype, _code(T, qw, row, b, (c % block) * bits, bits))
                    zero = T.Cast(dtype, _code(T, zp, row, 0, b * bits, bits))
                    y[r, c] = (code - zero) * sc[row, b]

    return kernel


def butterfly_kernel(k: int, m: int, dtype: str = "float32") -> Any:
    """Walsh-Hadamard butterfly over each of the k segments of length m = 2^s of every row, scaled 1/sqrt(m)."""
    from tvm.script import tirx as T

    n = k * m
    stages = int(math.log2(m))
    scale = 1.0 / math.sqrt(m)
    half = m // 2

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, n), dtype)
        y = T.match_buffer(var_y, (rows, n), dtype)
        with T.sblock("root"):
            for r in T.parallel(rows):
                for i in range(n):
                    y[r, i] = x[r, i] * T.Cast(dtype, scale)
                for seg in range(k):
                    for s in range(stages):
                        for p in range(half):
                            lo = seg * m + (p // T.shift_left(1, s)) * T.shift_left(2, s) + p % T.shift_left(1, s)
                            a = y[r, lo]
                            c = y[r, lo + T.shift_left(1, s)]
                            y[r, lo] = a + c
                            y[r, lo + T.shift_left(1, s)] = a - c

    return kernel


# --------------------------------------------------------------------------------------------------
# converters: fx node -> Relax expression (one per fxpress op, registered in the op table)
# --------------------------------------------------------------------------------------------------
def _shape(value: Any) -> list:
    """The (possibly symbolic) dims of a Relax tensor value."""
    return list(value.ty.shape.values)


def _dtype(value: Any) -> str:
    return str(value.ty.dtype)


def _rows_view(bb: Any, x: Any, last: int) -> tuple[Any, Any, list]:
    """x [..., last] as [rows, last] (rows symbolic), plus the leading shape to restore."""
    from tvm import relax, tirx

    lead = _shape(x)[:-1]
    rows = tirx.const(1, "int64")
    for d in lead:
        rows = rows * d
    return bb.emit(relax.op.reshape(x, [rows, last])), rows, lead


def _restore(bb: Any, y: Any, lead: list, last: int) -> Any:
    from tvm import relax

    return bb.emit(relax.op.reshape(y, [*lead, last] if lead else [last]))


def _arg(importer: Any, node: Any, i: int) -> Any:
    """Positional argument i of an fx node: its Relax value for tensors, the constant otherwise."""
    value = node.args[i] if i < len(node.args) else None
    return importer.env[value] if hasattr(value, "op") else value


def _zero_input(bb: Any, zp: Any, n: int, k_blocks: int, bits: int) -> tuple[Any, int]:
    """Zero points as (n, 1, bytes); a symmetric weight gets its implicit 2^(bits-1) packed as a constant."""
    from tvm import relax

    if zp is None:
        import torch

        from fxpress.runtime.quant import pack_codes

        codes = torch.full((n, k_blocks), 1 << (bits - 1), dtype=torch.int64)
        packed = pack_codes(codes, bits).numpy().reshape(n, 1, -1)
        return relax.const(packed), packed.shape[-1]
    width = int(_shape(zp)[1])
    return bb.emit(relax.op.reshape(zp, [n, 1, width])), width


def _convert_linear_nbit(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, qw, sc, zp, bias = (_arg(importer, node, i) for i in range(5))
    bits, block, k = (int(_arg(importer, node, i)) for i in (5, 6, 7))
    n, k_blocks = (int(d) for d in _shape(qw)[:2])
    dtype = _dtype(x)
    x2, rows, lead = _rows_view(bb, x, k)
    zp3, zero_bytes = _zero_input(bb, zp, n, k_blocks, bits)
    gv = bb.add_func(linear_nbit_kernel(n, k, k_blocks, block, bits, zero_bytes, dtype), f"linear_nbit_{bits}b")
    y = bb.emit(relax.call_tir(gv, [x2, qw, sc, zp3], out_ty=relax.TensorType([rows, n], dtype)))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return _restore(bb, y, lead, n)


def _convert_embedding_nbit(node: Any, importer: Any) -> Any:
    from tvm import relax, tirx

    bb = importer.block_builder
    ids, qw, sc, zp = (_arg(importer, node, i) for i in range(4))
    bits, block, dim = (int(_arg(importer, node, i)) for i in (4, 5, 6))
    vocab, k_blocks = (int(d) for d in _shape(qw)[:2])
    dtype = _dtype(sc)
    lead = _shape(ids)
    rows = tirx.const(1, "int64")
    for d in lead:
        rows = rows * d
    flat = bb.emit(relax.op.reshape(ids, [rows]))
    zp3, zero_bytes = _zero_input(bb, zp, vocab, k_blocks, bits)
    kernel = embedding_nbit_kernel(vocab, dim, k_blocks, block, bits, zero_bytes, _dtype(ids), dtype)
    gv = bb.add_func(kernel, f"embedding_nbit_{bits}b")
    y = bb.emit(relax.call_tir(gv, [flat, qw, sc, zp3], out_ty=relax.TensorType([rows, dim], dtype)))
    return _restore(bb, y, lead, dim)


def _convert_grouped_linear_nbit(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, offsets = _arg(importer, node, 0), _arg(importer, node, 1)
    qweights = [importer.env[a] for a in node.args[2]]
    scales = _arg(importer, node, 3)
    zeros = [importer.env[a] for a in node.args[4]]
    bits = [int(b) for b in node.args[5]]
    block, k = int(node.args[6]), int(node.args[7])
    experts = len(qweights)
    n, k_blocks = (int(d) for d in _shape(scales)[1:3])
    dtype = _dtype(x)
    rows = _shape(x)[0]
    total = None
    for e in range(experts):
        sc = bb.emit(relax.op.take(scales, relax.const(e, "int64"), axis=0))
        zp3, width = _zero_input(bb, zeros[e], n, k_blocks, bits[e])
        kernel = grouped_linear_nbit_kernel(n, k, k_blocks, block, bits[e], width, experts, e,
                                            _dtype(offsets), dtype)
        gv = bb.add_func(kernel, f"grouped_linear_nbit_e{e}")
        y = bb.emit(relax.call_tir(gv, [x, offsets, qweights[e], sc, zp3], out_ty=relax.TensorType([rows, n], dtype)))
        total = y if total is None else bb.emit(relax.op.add(total, y))
    return total


def _convert_hadamard(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, base = _arg(importer, node, 0), _arg(importer, node, 1)
    n = int(_shape(x)[-1])
    k = int(_shape(base)[0])
    m = n // k
    if n % k or m & (m - 1):
        raise LoweringError(f"fxpress::hadamard: last dim {n} is not {k} * 2^m")
    dtype = _dtype(x)
    x2, rows, lead = _rows_view(bb, x, n)
    gv = bb.add_func(butterfly_kernel(k, m, dtype), f"hadamard_butterfly_{k}x{m}")
    y = bb.emit(relax.call_tir(gv, [x2], out_ty=relax.TensorType([rows, n], dtype)))
    if k > 1:  # y[r, i, :] = Σ_l base[l, i] · y[r, l, :]: one K x K contraction per column
        grid = bb.emit(relax.op.reshape(y, [rows, k, m]))
        mixed = bb.emit(relax.op.matmul(relax.op.permute_dims(base, [1, 0]), grid))
        y = bb.emit(relax.op.reshape(mixed, [rows, n]))
    return _restore(bb, y, lead, n)


def _convert_quantize_act(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x = _arg(importer, node, 0)
    bits, clip, symmetric = int(_arg(importer, node, 1)), float(_arg(importer, node, 2)), bool(_arg(importer, node, 3))
    dtype = _dtype(x)

    def c(v: float) -> Any:
        return relax.const(v, dtype)

    op = relax.op

    import torch

    from fxpress.runtime.quant import TIE_OFFSET

    margin = TIE_OFFSET.get(getattr(torch, dtype, None), 0.0)  # float64: exact ties round up (runtime/quant.py)

    def round_even(v: Any) -> Any:  # torch.round rounds halves to even; Relax's round rounds them away from 0
        if margin:
            v = bb.emit(op.add(v, c(margin)))
        low = bb.emit(op.floor(v))
        frac = bb.emit(op.subtract(v, low))
        tie = op.add(low, op.floor_mod(low, c(2.0)))
        up = op.where(op.greater(frac, c(0.5)), op.add(low, c(1.0)), low)
        return bb.emit(op.where(op.equal(frac, c(0.5)), tie, up))

    if symmetric:
        maxq = (1 << (bits - 1)) - 1
        scale = bb.emit(op.multiply(op.max(op.abs(x), axis=-1, keepdims=True), c(clip / max(maxq, 1))))
        scale = bb.emit(op.where(op.greater(scale, c(0.0)), scale, c(1.0)))
        codes = round_even(bb.emit(op.clip(op.divide(x, scale), -maxq - 1, maxq)))
        return bb.emit(op.multiply(codes, scale))
    maxq = (1 << bits) - 1
    high = bb.emit(op.multiply(op.maximum(op.max(x, axis=-1, keepdims=True), c(0.0)), c(clip)))
    low = bb.emit(op.multiply(op.minimum(op.min(x, axis=-1, keepdims=True), c(0.0)), c(clip)))
    scale = bb.emit(op.divide(op.subtract(high, low), c(float(maxq))))
    scale = bb.emit(op.where(op.greater(scale, c(0.0)), scale, c(1.0)))
    # as the reference kernel: zero = round(clamp(-low / scale)), code = round(clamp(x / scale + zero))
    zero = round_even(bb.emit(op.clip(op.divide(op.negative(low), scale), 0, maxq)))
    codes = round_even(bb.emit(op.clip(op.add(op.divide(x, scale), zero), 0, maxq)))
    return bb.emit(op.multiply(op.subtract(codes, zero), scale))


def _convert_threshold_linear(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, conn, threshold, relu = (_arg(importer, node, i) for i in range(4))
    dtype = _dtype(x)
    weight = bb.emit(relax.op.permute_dims(relax.op.astype(conn, dtype), [1, 0]))
    out = bb.emit(relax.op.subtract(relax.op.matmul(x, weight), relax.op.astype(threshold, dtype)))
    return bb.emit(relax.op.nn.relu(out)) if relu else out


_CONVERTERS: dict[str, Callable] = {
    "linear_nbit": _convert_linear_nbit,
    "embedding_nbit": _convert_embedding_nbit,
    "grouped_linear_nbit": _convert_grouped_linear_nbit,
    "hadamard": _convert_hadamard,
    "quantize_act": _convert_quantize_act,
    "threshold_linear": _convert_threshold_linear,
}


def register_converters() -> None:
    """Register this module's converter for every fxpress op that exists now (idempotent)."""
    import fxpress.runtime  # noqa: F401  (defines the ops)

    for name, fn in _CONVERTERS.items():
        if name in OPS and "tvm" not in OPS[name].lowerings:
            register_lowering(name, "tvm")(fn)


def _convert_aten_linear(node: Any, importer: Any) -> Any:
    """aten.linear in the input's float type: TVM's frontend emits it with out_dtype float32 whatever the input
    (a float64 program, after the Precision pass, would otherwise round its LM head to float32)."""
    from tvm import relax

    args = importer.retrieve_args(node)
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    return importer.block_builder.emit(relax.op.linear(x, weight, bias, _dtype(x)))


def _convert_aten_matmul(node: Any, importer: Any) -> Any:
    """aten.matmul / mm / bmm in the inputs' float type (TVM's frontend fixes out_dtype to float32)."""
    from tvm import relax

    lhs, rhs = importer.retrieve_args(node)[:2]
    return importer.block_builder.emit(relax.op.linear_algebra.matmul(lhs, rhs, out_dtype=_dtype(lhs)))


def convert_map() -> dict[str, Callable]:
    """from_exported_program's custom_convert_map: keyed by the node target's __name__ ('linear_nbit.default')."""
    register_converters()
    missing = [spec.qualname for spec in OPS.values() if "tvm" not in spec.lowerings]
    if missing:
        raise LoweringError(f"no TVM converter for {', '.join(missing)}: add one with register_lowering(op, 'tvm')")
    return {spec.overload.__name__: spec.lowerings["tvm"] for spec in OPS.values()}


# ATen converters that replace the frontend's own: they keep the input's float type (float64 after Precision)
ATEN_CONVERTERS: dict[str, Callable] = {
    "linear.default": _convert_aten_linear,
    **dict.fromkeys(("matmul.default", "mm.default", "bmm.default"), _convert_aten_matmul),
}


# --------------------------------------------------------------------------------------------------
# build and save
# --------------------------------------------------------------------------------------------------
def _target(target: Any) -> Any:
    import tvm

    if isinstance(target, str):
        target = {"kind": target}
    try:
        return tvm.target.Target(target)
    except Exception as err:  # TVM raises its own error types for unknown targets
        raise ConfigError(f"target {target!r} is not a TVM target: use 'llvm' or {{'kind': 'llvm', 'mcpu': 'native'}}") from err


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


def export_tvm(program: Program, path: str | os.PathLike, target: Any = "llvm", schedule: bool = True) -> dict[str, Any]:
    """Build `program` for `target` and write the artifact directory at `path` (atomically); returns statistics.

    The directory holds `model-<id>.so` (the Relax VM executable), `weights.safetensors` and `fxpress.json`.
    """
    import tvm
    from safetensors.numpy import save_file

    if not isinstance(program, Program):
        raise ConfigError(f"export_tvm needs an fxpress Program (e.g. compiled.program), got {type(program).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"TVM artifact path '{path}' is a file: the TVM artifact is a directory, give a new path")
    tgt = _target(target)
    mod, arrays, names, sig = to_relax(program)
    try:
        pipeline = _pipeline(tgt) if schedule else "default"
        executable = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except Exception as err:  # build failures come as TVM errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(f"TVM could not build the program for {tgt}: {type(err).__name__}: {first}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fxpress-tvm-", dir=path.parent))
    library = LIBRARY.format(uuid.uuid4().hex[:12])
    try:
        executable.export_library(str(tmp / library))
        unique: dict[str, np.ndarray] = {}
        for name, array in zip(names, arrays):
            unique.setdefault(name, np.ascontiguousarray(array))
        save_file(unique, str(tmp / WEIGHTS))
        files = {f: (tmp / f).stat().st_size for f in (library, WEIGHTS)}
        manifest = {
            "format": "fxpress", "version": ARTIFACT_VERSION, "target": str(tgt), "library": library,
            "weights": WEIGHTS, "params": names, "files": files, "info": program.info.to_dict(),
            "inputs": list(sig.input_names), "outputs": list(sig.output_names), "passes": list(program.history),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(path), "bytes": sum(files.values()), "weight_bytes": files[WEIGHTS],
            "library_bytes": files[library], "target": str(tgt)}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an old artifact is removed only after the new one is there."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


register_converters()
