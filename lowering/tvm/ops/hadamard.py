"""fxpress::hadamard in TVM: a TensorIR butterfly (n log n adds) plus one K x K contraction."""

from __future__ import annotations

import math
from typing import Any

from fxpress.errors import LoweringError
from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import dtype_of, node_arg, restore, rows_view, shape_of


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


@tvm_lowering("hadamard")
def convert_hadamard(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, base = node_arg(importer, node, 0), node_arg(importer, node, 1)
    n = int(shape_of(x)[-1])
    k = int(shape_of(base)[0])
    m = n // k
    if n % k or m & (m - 1):
        raise LoweringError(f"fxpress::hadamard: last dim {n} is not {k} * 2^m")
    dtype = dtype_of(x)
    x2, rows, lead = rows_view(bb, x, n)
    gv = bb.add_func(butterfly_kernel(k, m, dtype), f"hadamard_butterfly_{k}x{m}")
    y = bb.emit(relax.call_tir(gv, [x2], out_ty=relax.TensorType([rows, n], dtype)))
    if k > 1:  # y[r, i, :] = Σ_l base[l, i] · y[r, l, :]: one K x K contraction per column
        grid = bb.emit(relax.op.reshape(y, [rows, k, m]))
        mixed = bb.emit(relax.op.matmul(relax.op.permute_dims(base, [1, 0]), grid))
        y = bb.emit(relax.op.reshape(mixed, [rows, n]))
    return restore(bb, y, lead, n)
