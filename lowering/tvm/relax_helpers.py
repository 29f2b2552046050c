"""Relax and TensorIR helpers the TVM op converters share (shapes, row views, packed codes)."""

from __future__ import annotations

from typing import Any


def shape_of(value: Any) -> list:
    """The (possibly symbolic) dims of a Relax tensor value."""
    return list(value.ty.shape.values)


def dtype_of(value: Any) -> str:
    return str(value.ty.dtype)


def rows_view(bb: Any, x: Any, last: int) -> tuple[Any, Any, list]:
    """x [..., last] as [rows, last] (rows symbolic), plus the leading shape to restore."""
    from tvm import relax, tirx

    lead = shape_of(x)[:-1]
    rows = tirx.const(1, "int64")
    for d in lead:
        rows = rows * d
    return bb.emit(relax.op.reshape(x, [rows, last])), rows, lead


def restore(bb: Any, y: Any, lead: list, last: int) -> Any:
    from tvm import relax

    return bb.emit(relax.op.reshape(y, [*lead, last] if lead else [last]))


def node_arg(importer: Any, node: Any, i: int) -> Any:
    """Positional argument i of an fx node: its Relax value for tensors, the constant otherwise."""
    value = node.args[i] if i < len(node.args) else None
    return importer.env[value] if hasattr(value, "op") else value


def zero_input(bb: Any, zp: Any, n: int, k_blocks: int, bits: int) -> tuple[Any, int]:
    """Zero points as (n, 1, bytes); a symmetric weight gets its implicit 2^(bits-1) packed as a constant."""
    from tvm import relax

    if zp is None:
        import torch

        from fxpress.runtime.quant import pack_codes

        codes = torch.full((n, k_blocks), 1 << (bits - 1), dtype=torch.int64)
        packed = pack_codes(codes, bits).numpy().reshape(n, 1, -1)
        return relax.const(packed), packed.shape[-1]
    width = int(shape_of(zp)[1])
    return bb.emit(relax.op.reshape(zp, [n, 1, width])), width


def packed_code(T: Any, buf: Any, row: Any, block_ix: Any, pos: Any, bits: int) -> Any:
    """The `bits`-bit code at bit offset `pos` of buf[row, block_ix, :] (low bits first, may straddle bytes)."""
    mask = (1 << bits) - 1
    byte = pos // 8
    shift = pos % 8
    low = T.Cast("int32", buf[row, block_ix, byte])
    if 8 % bits == 0:  # 1, 2, 4, 8 bits never straddle a byte
        return T.bitwise_and(T.shift_right(low, shift), mask)
    high = T.if_then_else(shift + bits > 8, T.Cast("int32", buf[row, block_ix, byte + 1]), 0)
    return T.bitwise_and(T.shift_right(T.bitwise_or(low, T.shift_left(high, 8)), shift), mask)


def accumulate_row(k: int, k_blocks: int, block: int, bits: int, dtype: str) -> Any:
    """TVMScript macro shared by the packed kernels: y[r, j] += Σ_k x[r, k] · (code[j, k] − zero) · scale, block by
    block (y[r, j] must be zeroed first); inlined where it is called, so each kernel stays one loop nest."""
    from tvm.script import tirx as T

    @T.macro
    def accumulate(x: Any, qw: Any, sc: Any, zp: Any, y: Any, r: Any, j: Any) -> None:
        for b in range(k_blocks):
            zero = T.Cast(dtype, packed_code(T, zp, j, 0, b * bits, bits))
            partial = T.Cast(dtype, 0)
            for i in range(T.min(block, k - b * block)):
                partial = partial + x[r, b * block + i] * (T.Cast(dtype, packed_code(T, qw, j, b, i * bits, bits)) - zero)
            y[r, j] = y[r, j] + partial * sc[j, b]

    return accumulate
