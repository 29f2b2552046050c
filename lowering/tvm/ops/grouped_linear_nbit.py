"""fxpress::grouped_linear_nbit (MoE experts) in TVM: one packed TensorIR kernel per expert's rows, summed."""

from __future__ import annotations

from typing import Any

from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import accumulate_row, dtype_of, node_arg, shape_of, zero_input


def grouped_linear_nbit_kernel(n: int, k: int, k_blocks: int, block: int, bits: int, zero_bytes: int,
                               experts: int, expert: int, offset_dtype: str, dtype: str = "float32") -> Any:
    """One expert's rows [offsets[e-1], offsets[e]) of the grouped matmul (linear_nbit's loop body); other rows are 0."""
    from tvm.script import tirx as T

    bytes_per_block = block * bits // 8
    accumulate = accumulate_row(k, k_blocks, block, bits, dtype)

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


@tvm_lowering("grouped_linear_nbit")
def convert_grouped_linear_nbit(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, offsets = node_arg(importer, node, 0), node_arg(importer, node, 1)
    qweights = [importer.env[a] for a in node.args[2]]
    scales = node_arg(importer, node, 3)
    zeros = [importer.env[a] for a in node.args[4]]
    bits = [int(b) for b in node.args[5]]
    block, k = int(node.args[6]), int(node.args[7])
    experts = len(qweights)
    n, k_blocks = (int(d) for d in shape_of(scales)[1:3])
    dtype = dtype_of(x)
    rows = shape_of(x)[0]
    total = None
    for e in range(experts):
        sc = bb.emit(relax.op.take(scales, relax.const(e, "int64"), axis=0))
        zp3, width = zero_input(bb, zeros[e], n, k_blocks, bits[e])
        kernel = grouped_linear_nbit_kernel(n, k, k_blocks, block, bits[e], width, experts, e,
                                            dtype_of(offsets), dtype)
        gv = bb.add_func(kernel, f"grouped_linear_nbit_e{e}")
        y = bb.emit(relax.call_tir(gv, [x, offsets, qweights[e], sc, zp3], out_ty=relax.TensorType([rows, n], dtype)))
        total = y if total is None else bb.emit(relax.op.add(total, y))
    return total
