"""fxpress::embedding_nbit in TVM: a TensorIR gather that unpacks only the rows it reads."""

from __future__ import annotations

from typing import Any

from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import dtype_of, node_arg, packed_code, restore, shape_of, zero_input


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
                    code = T.Cast(dtype, packed_code(T, qw, row, b, (c % block) * bits, bits))
                    zero = T.Cast(dtype, packed_code(T, zp, row, 0, b * bits, bits))
                    y[r, c] = (code - zero) * sc[row, b]

    return kernel


@tvm_lowering("embedding_nbit")
def convert_embedding_nbit(node: Any, importer: Any) -> Any:
    from tvm import relax, tirx

    bb = importer.block_builder
    ids, qw, sc, zp = (node_arg(importer, node, i) for i in range(4))
    bits, block, dim = (int(node_arg(importer, node, i)) for i in (4, 5, 6))
    vocab, k_blocks = (int(d) for d in shape_of(qw)[:2])
    dtype = dtype_of(sc)
    lead = shape_of(ids)
    rows = tirx.const(1, "int64")
    for d in lead:
        rows = rows * d
    flat = bb.emit(relax.op.reshape(ids, [rows]))
    zp3, zero_bytes = zero_input(bb, zp, vocab, k_blocks, bits)
    kernel = embedding_nbit_kernel(vocab, dim, k_blocks, block, bits, zero_bytes, dtype_of(ids), dtype)
    gv = bb.add_func(kernel, f"embedding_nbit_{bits}b")
    y = bb.emit(relax.call_tir(gv, [flat, qw, sc, zp3], out_ty=relax.TensorType([rows, dim], dtype)))
    return restore(bb, y, lead, dim)
