"""fxpress::linear_nbit in TVM: a TensorIR kernel that reads the packed bytes directly, plus the bias.

Byte-aligned codes in whole blocks (1, 2, 4, 8 bits) take the vectorised `row_dot.packed_kernel`; codes that
straddle bytes (3, 5, 6, 7 bits) or a partial last block take the scalar kernel below.
"""

from __future__ import annotations

from typing import Any

from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import (
    accumulate_row,
    dtype_of,
    node_arg,
    restore,
    rows_view,
    shape_of,
    zero_input,
)
from fxpress.lowering.tvm.row_dot import packed_fast_path, packed_kernel


def linear_nbit_kernel(n: int, k: int, k_blocks: int, block: int, bits: int, zero_bytes: int,
                       dtype: str = "float32") -> Any:
    """y[r, j] = Σ_k x[r, k] · (code[j, k] − zero[j, k / block]) · scale[j, k / block], rows symbolic.

    Parallel over output channels; each weight byte is read once per row, never expanded to float in memory.
    """
    from tvm.script import tirx as T

    bytes_per_block = block * bits // 8
    accumulate = accumulate_row(k, k_blocks, block, bits, dtype)

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


@tvm_lowering("linear_nbit")
def convert_linear_nbit(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, qw, sc, zp, bias = (node_arg(importer, node, i) for i in range(5))
    bits, block, k = (int(node_arg(importer, node, i)) for i in (5, 6, 7))
    n, k_blocks = (int(d) for d in shape_of(qw)[:2])
    dtype = dtype_of(x)
    x2, rows, lead = rows_view(bb, x, k)
    zp3, zero_bytes = zero_input(bb, zp, n, k_blocks, bits)
    make = packed_kernel if packed_fast_path(k, block, bits) else linear_nbit_kernel
    gv = bb.add_func(make(n, k, k_blocks, block, bits, zero_bytes, dtype), f"linear_nbit_{bits}b")
    y = bb.emit(relax.call_tir(gv, [x2, qw, sc, zp3], out_ty=relax.TensorType([rows, n], dtype)))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return restore(bb, y, lead, n)
