"""Packed low-bit weights in ONNX: the matmul and gather building blocks the n-bit op lowerings share.

A packed weight (codes, scales, zero points) becomes `com.microsoft::MatMulNBits` / `GatherBlockQuantized`
(ONNX Runtime's int2/4/8 kernels), standard blocked `DequantizeLinear` (opset 21+), or, for float64
programs (Precision pass), an exact float64 dequantization. Initializers are made once per packed
tensor (`Materializer.shared`), so a tied embedding table and LM head share them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fxpress.lowering.onnx.builder import MS_DOMAIN, Materializer

MATMULNBITS_BITS = (2, 4, 8)  # bit widths ONNX Runtime's MatMulNBits runs on CPU


def matmulnbits_block(block: int) -> int | None:
    """The largest power of two >= 16 that divides `block` (MatMulNBits' block sizes), capped at 256."""
    sub = 256
    while sub >= 16:
        if block % sub == 0:
            return sub
        sub //= 2
    return None


def _unpack(qweight: np.ndarray, bits: int, block: int) -> np.ndarray:
    from fxpress.runtime.quant import unpack_codes

    return unpack_codes(torch.from_numpy(np.ascontiguousarray(qweight)), bits, block).numpy()


def _zero_codes(zeros: np.ndarray | None, bits: int, n: int, k_blocks: int) -> np.ndarray:
    """Zero-point codes (N, k_blocks); a symmetric weight's implicit zero is 2^(bits-1)."""
    from fxpress.runtime.quant import unpack_codes

    if zeros is None:
        return np.full((n, k_blocks), 1 << (bits - 1), dtype=np.int64)
    return unpack_codes(torch.from_numpy(zeros), bits, k_blocks).numpy()


def packed_matmul(b: Materializer, node, x, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                  bits: int, block: int, in_features: int, tag: str) -> Any:
    """x @ dequant(W).T in the chosen format; returns the output value (no bias)."""
    if scales.dtype == np.float64:  # Precision(float64): no int kernel or DequantizeLinear takes double
        return _exact_matmul(b, node, x, qweight, scales, zeros, bits, block, in_features, tag)
    sub = matmulnbits_block(block)
    if b.weights == "matmulnbits" and bits in MATMULNBITS_BITS and sub is not None:
        return _matmulnbits(b, node, x, qweight, scales, zeros, bits, block, sub, in_features, tag)
    if b.weights == "matmulnbits":
        b.stats["warnings"].append(
            f"{tag}: {bits}-bit weights in blocks of {block} have no MatMulNBits kernel (needs bits in "
            f"{MATMULNBITS_BITS} and a power-of-two block >= 16 dividing the block): used DequantizeLinear"
        )
    return _dequantize_matmul(b, node, x, qweight, scales, zeros, bits, block, in_features, tag)


def _matmulnbits(b: Materializer, node, x, qweight, scales, zeros, bits, block, sub, in_features, tag) -> Any:
    cached = b.shared.get(tag, {})
    key = next((k for k in cached if k[0] == "nbits"), ("nbits", sub))  # a tied table's layout, if made
    if key not in cached:
        cached[key] = nbits_initializers(b, qweight, scales, zeros, bits, block, key[1], in_features, tag)
        b.shared[tag] = cached
    inputs = [x, *(v for v in cached[key] if v is not None)]
    b.stats["matmulnbits"] += 1
    attrs = {"K": in_features, "N": qweight.shape[0], "bits": bits, "block_size": key[1],
             "accuracy_level": b.accuracy_level}
    return b.node(node, MS_DOMAIN, "MatMulNBits", inputs, attrs)


def nbits_initializers(b: Materializer, qweight, scales, zeros, bits, block, sub, in_features, tag) -> tuple:
    """MatMulNBits' B (N, k_blocks, blob), scales and packed zero points (or None), re-blocked to `sub`."""
    from fxpress.runtime.quant import pack_codes, unpack_codes

    n, k_blocks, _ = qweight.shape
    codes = _unpack(qweight, bits, block)  # (N, k_blocks, block)
    zero_codes = None if zeros is None else unpack_codes(torch.from_numpy(zeros), bits, k_blocks).numpy()
    if sub != block:  # re-block: each block splits into block/sub sub-blocks with the same scale and zero
        rep = block // sub
        codes = codes.reshape(n, k_blocks * rep, sub)
        scales = np.repeat(scales, rep, axis=1)
        zero_codes = None if zero_codes is None else np.repeat(zero_codes, rep, axis=1)
        k_blocks *= rep
    used = -(-in_features // sub)  # drop sub-blocks that hold only padding
    codes, scales = codes[:, :used], scales[:, :used]
    zero_codes = None if zero_codes is None else zero_codes[:, :used]
    packed = pack_codes(torch.from_numpy(codes), bits).numpy()
    zero_value = None
    if zero_codes is not None:
        zero_value = b.initializer(f"{tag}.zero_points", pack_codes(torch.from_numpy(zero_codes), bits).numpy())
    return b.initializer(f"{tag}.qweight", packed), b.initializer(f"{tag}.scales", scales), zero_value


def _dequantize_matmul(b: Materializer, node, x, qweight, scales, zeros, bits, block, in_features, tag) -> Any:
    """Standard ONNX: blocked DequantizeLinear of W.T (codes as UINT4/UINT2/UINT8), Slice to K rows, MatMul."""
    w, s, z = transposed_initializers(b, qweight, scales, zeros, bits, block, tag)
    weight = b.node(node, "", "DequantizeLinear", [w, s, z], {"axis": 0, "block_size": block})
    if qweight.shape[1] * block != in_features:
        weight = b.slice_to(node, weight, tag, in_features)
    b.stats["dequantizelinear"] += 1
    return b.node(node, "", "MatMul", [x, weight])


def transposed_initializers(b: Materializer, qweight, scales, zeros, bits, block, tag) -> tuple:
    """Codes.T (K_padded, N) as UINT2/UINT4/UINT8, scales.T and zero codes.T (k_blocks, N); made once per
    packed tensor, so a tied embedding (a Gather on axis 1) and LM head share them."""
    import ml_dtypes

    cached = b.shared.setdefault(tag, {})
    if "transposed" in cached:
        return cached["transposed"]
    ir = b.ir
    n, k_blocks, _ = qweight.shape
    codes = _unpack(qweight, bits, block).reshape(n, k_blocks * block)
    zero_codes = _zero_codes(zeros, bits, n, k_blocks)
    if bits <= 2 and b.opset >= 25:
        np_type, ir_type = ml_dtypes.uint2, ir.DataType.UINT2
    elif bits <= 4:
        np_type, ir_type = ml_dtypes.uint4, ir.DataType.UINT4
    else:
        np_type, ir_type = np.uint8, ir.DataType.UINT8
    w = b.initializer(f"{tag}.qweight_t", np.ascontiguousarray(codes.T).astype(np_type), ir_type)
    z = b.initializer(f"{tag}.zero_points_t", np.ascontiguousarray(zero_codes.T).astype(np_type), ir_type)
    s = b.initializer(f"{tag}.scales_t", np.ascontiguousarray(scales.T))
    cached["transposed"] = (w, s, z)
    return w, s, z


# -- float64 (Precision pass): exact dequantization ------------------------------------------------------
def _exact_rows(b: Materializer, node, qweight, scales, zeros, bits, block, tag) -> Any:
    """(code - zero) * scale as float64 rows (N, k_blocks, block), exact: made once per packed tensor (a tied
    table's gather and LM head share it); ONNX Runtime folds it into a dense float64 weight at load."""
    cached = b.shared.setdefault(tag, {})
    if "exact" in cached:
        return cached["exact"]
    import ml_dtypes

    ir = b.ir
    n, k_blocks, _ = qweight.shape
    codes = _unpack(qweight, bits, block)  # (N, k_blocks, block)
    zero_codes = _zero_codes(zeros, bits, n, k_blocks)
    np_type, ir_type = (ml_dtypes.uint4, ir.DataType.UINT4) if bits <= 4 else (np.uint8, ir.DataType.UINT8)
    double = ir.DataType.DOUBLE
    w = b.initializer(f"{tag}.codes", np.ascontiguousarray(codes).astype(np_type), ir_type)
    z = b.initializer(f"{tag}.zero_codes", zero_codes.reshape(n, k_blocks, 1).astype(np_type), ir_type)
    w, z = (b.node(node, "", "Cast", [t], {"to": double}) for t in (w, z))
    narrow = scales.astype(np.float32)
    if np.array_equal(narrow.astype(np.float64), scales):  # float32 values (as Quantize makes them): half the bytes
        s = b.node(node, "", "Cast", [b.initializer(f"{tag}.scales", narrow.reshape(n, k_blocks, 1))],
                   {"to": double})
    else:
        s = b.initializer(f"{tag}.scales", scales.reshape(n, k_blocks, 1))
    rows = b.node(node, "", "Mul", [b.node(node, "", "Sub", [w, z]), s])
    cached["exact"] = rows
    return rows


def _exact_dense(b: Materializer, node, qweight, scales, zeros, bits, block, columns, tag) -> Any:
    """The exact float64 [N, columns] matrix: dequantized rows, reshaped, the last block's padding sliced off."""
    rows = _exact_rows(b, node, qweight, scales, zeros, bits, block, tag)
    n, k_blocks, _ = qweight.shape
    shape = b.initializer(f"{tag}.dense_shape", np.array([n, k_blocks * block], dtype=np.int64))
    dense = b.node(node, "", "Reshape", [rows, shape])
    if k_blocks * block != columns:
        dense = b.slice_to(node, dense, tag, columns, axis=1)
    b.stats["exact_float64"] += 1
    return dense


def _exact_matmul(b: Materializer, node, x, qweight, scales, zeros, bits, block, in_features, tag) -> Any:
    """float64 x @ W.T with W = (code - zero) * scale computed exactly in float64, then sliced to K columns."""
    weight = _exact_dense(b, node, qweight, scales, zeros, bits, block, in_features, tag)
    return b.node(node, "", "MatMul", [x, b.node(node, "", "Transpose", [weight], {"perm": [1, 0]})])


def exact_gather(b: Materializer, node, ids, qweight, scales, zeros, bits, block, dim, tag) -> Any:
    """float64 embedding rows: Gather the exact dequantized rows, then drop the last block's padding."""
    table = _exact_dense(b, node, qweight, scales, zeros, bits, block, dim, tag)
    return b.node(node, "", "Gather", [table, ids], {"axis": 0})
