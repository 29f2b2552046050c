"""Vectorised TensorIR kernels for y = x · Wᵀ with W stored [n, k] (torch's layout), rows symbolic.

Why: decode is a matrix-vector product per linear. Reading each output channel's weight row contiguously and
accumulating in vector lanes (one AVX-512 register of partial sums, summed once per output) lets LLVM emit
packed multiply-adds; TVM's legalized `linear` instead transposes the whole weight on every call and runs an
unscheduled scalar matmul. Two forms share the loop nest: a float weight (`dense_kernel`) and packed codes with
per-block scale and zero (`packed_kernel`: each byte is loaded once as a vector of bytes, its codes are unpacked
with shifts, and x is de-interleaved once per call so that the c-th code of every byte meets its x lane).
"""

from __future__ import annotations

import math
from typing import Any

LANES = 16  # partial sums kept per output: one 64-byte register of float32
TILE = 4  # output channels computed together: independent accumulator chains, one load of x for all


def lanes_for(width: int) -> int:
    """The vector width used along a contiguous run of `width` elements: a divisor of it, at most LANES."""
    return math.gcd(width, LANES)


def packed_fast_path(k: int, block: int, bits: int) -> bool:
    """Codes that never straddle a byte and whole blocks only: the vectorised unpack applies."""
    return 8 % bits == 0 and k % block == 0 and (block * bits) % 8 == 0


def dense_kernel(n: int, k: int, dtype: str = "float32") -> Any:
    """y[r, j] = Σ_k x[r, k] · w[j, k]: parallel over output channels, vector lanes along k."""
    from tvm.script import tirx as T

    v = lanes_for(k)
    tile = math.gcd(n, TILE)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, w: T.Buffer((n, k), dtype), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, k), dtype)
        y = T.match_buffer(var_y, (rows, n), dtype)
        for jo in T.parallel(n // tile):
            for r in range(rows):
                acc = T.alloc_buffer((tile, v), dtype)
                for t, lane in T.grid(tile, v):
                    acc[t, lane] = T.Cast(dtype, 0)
                for step in range(k // v):
                    for t in T.unroll(tile):
                        for lane in T.vectorized(v):
                            acc[t, lane] = acc[t, lane] + x[r, step * v + lane] * w[jo * tile + t, step * v + lane]
                for t in T.unroll(tile):
                    y[r, jo * tile + t] = T.Cast(dtype, 0)
                    for lane in range(v):
                        y[r, jo * tile + t] = y[r, jo * tile + t] + acc[t, lane]

    return kernel


def packed_kernel(n: int, k: int, k_blocks: int, block: int, bits: int, zero_bytes: int,
                  dtype: str = "float32") -> Any:
    """y[r, j] = Σ_b scale[j, b] · Σ_{i in b} x[r, i] · (code[j, i] − zero[j, b]) for byte-aligned codes.

    Code c of byte p in a block is element p · (8 / bits) + c (low bits first, as `pack_codes` writes them);
    x is copied once per call into xs[r, b, c, p] so that lane p of code c reads xs contiguously. The zero is
    applied once per lane as −zero · Σ_c xs[r, b, c, p] (summed once per call), not subtracted from each code:
    one vector operation fewer per block on the two AVX-512 ports that bound this loop.
    """
    from tvm.script import tirx as T

    per_byte = 8 // bits
    block_bytes = block * bits // 8
    v = lanes_for(block_bytes)
    tile = math.gcd(n, TILE)
    mask = (1 << bits) - 1

    def unpacked(qw: Any, j: Any, b: Any, byte: Any, c: Any) -> Any:
        """Code c of byte qw[j, b, byte] as a float (a TVMScript expression, built where it is called)."""
        return T.Cast(dtype, T.bitwise_and(T.shift_right(T.Cast("int32", qw[j, b, byte]), c * bits), mask))

    def zero(zp: Any, j: Any, b: Any) -> Any:
        """Block b's zero point of channel j as a float (its code in the packed zero row)."""
        return T.Cast(dtype, T.bitwise_and(T.shift_right(T.Cast("int32", zp[j, 0, (b * bits) // 8]), (b * bits) % 8), mask))

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, qw: T.Buffer((n, k_blocks, block_bytes), "uint8"),
               sc: T.Buffer((n, k_blocks), dtype), zp: T.Buffer((n, 1, zero_bytes), "uint8"), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        rows = T.int64()
        x = T.match_buffer(var_x, (rows, k), dtype)
        y = T.match_buffer(var_y, (rows, n), dtype)
        xs = T.alloc_buffer((rows, k_blocks, per_byte, block_bytes), dtype, align=64)
        xsum = T.alloc_buffer((rows, k_blocks, block_bytes), dtype, align=64)
        for r, b, c, p in T.grid(rows, k_blocks, per_byte, block_bytes):
            xs[r, b, c, p] = x[r, b * block + p * per_byte + c]
        for r, b, p in T.grid(rows, k_blocks, block_bytes):
            xsum[r, b, p] = T.Cast(dtype, 0)
            for c in range(per_byte):
                xsum[r, b, p] = xsum[r, b, p] + xs[r, b, c, p]
        for jo in T.parallel(n // tile):
            for r in range(rows):
                acc = T.alloc_buffer((tile, v), dtype)
                for t, lane in T.grid(tile, v):
                    acc[t, lane] = T.Cast(dtype, 0)
                for b in range(k_blocks):
                    for t in T.unroll(tile):
                        for step in T.unroll(block_bytes // v):
                            part = T.alloc_buffer((v,), dtype)
                            for lane in T.vectorized(v):
                                part[lane] = -zero(zp, jo * tile + t, b) * xsum[r, b, step * v + lane]
                            for c in T.unroll(per_byte):
                                for lane in T.vectorized(v):
                                    part[lane] = part[lane] + xs[r, b, c, step * v + lane] * unpacked(
                                        qw, jo * tile + t, b, step * v + lane, c)
                            for lane in T.vectorized(v):
                                acc[t, lane] = acc[t, lane] + part[lane] * sc[jo * tile + t, b]
                for t in T.unroll(tile):
                    y[r, jo * tile + t] = T.Cast(dtype, 0)
                    for lane in range(v):
                        y[r, jo * tile + t] = y[r, jo * tile + t] + acc[t, lane]

    return kernel
