"""fxpress::embedding_nbit in ONNX: GatherBlockQuantized, Gather + DequantizeLinear, or exact float64 rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fxpress.lowering.onnx.builder import MS_DOMAIN, Materializer, node_attributes
from fxpress.lowering.onnx.packed import (
    MATMULNBITS_BITS,
    exact_gather,
    matmulnbits_block,
    nbits_initializers,
    transposed_initializers,
)
from fxpress.lowering.onnx.registry import OnnxOp, onnx_lowering, placeholders


@onnx_lowering
class EmbeddingNBits(OnnxOp):
    op = "embedding_nbit"
    inputs = 4
    attributes = {"bits": "INT", "block_size": "INT", "embedding_dim": "INT"}
    first = True  # a tied LM head then reuses the table's gather layout

    @staticmethod
    def translate(ids, qweight, scales, zero_points=None, bits=4, block_size=32, embedding_dim=0):
        import onnx_ir as ir

        out = placeholders().EmbeddingNBits(ids, qweight, scales, zero_points, bits=bits, block_size=block_size,
                                            embedding_dim=embedding_dim)
        out.dtype = scales.dtype
        if ids.shape is not None:
            out.shape = ir.Shape([*ids.shape, embedding_dim])
        return out

    @classmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        """GatherBlockQuantized over MatMulNBits' bytes (weights="matmulnbits"), else Gather + DequantizeLinear."""
        ids, qweight, scales, zeros = (list(node.inputs) + [None] * 4)[:4]
        bits, block, dim = node_attributes(node, "bits", "block_size", "embedding_dim")
        q, s, z = b.const(qweight), b.const(scales), b.const(zeros)
        sub = matmulnbits_block(math.gcd(block, dim))  # the gathered row has exactly `dim` codes: no padding
        if s.dtype == np.float64:  # Precision(float64): GatherBlockQuantized and DequantizeLinear are float-only
            out = exact_gather(b, node, ids, q, s, z, bits, block, dim, qweight.name)
        elif b.weights == "matmulnbits" and bits in MATMULNBITS_BITS and sub is not None:
            out = _gather_block_quantized(b, node, ids, q, s, z, bits, block, sub, dim, qweight.name)
        else:
            if b.weights == "matmulnbits":
                b.stats["warnings"].append(
                    f"{qweight.name}: a {bits}-bit table in blocks of {block} over {dim} columns has no "
                    "GatherBlockQuantized kernel (needs bits in (2, 4, 8) and a power-of-two block >= 16 dividing "
                    "the block and the row): used Gather + DequantizeLinear")
            out = _dequantize_gather(b, node, ids, q, s, z, bits, block, dim, qweight.name)
        b.replace(node, out)


def _gather_block_quantized(b: Materializer, node, ids, qweight, scales, zeros, bits, block, sub, dim, tag) -> Any:
    """One B for the tied LM head's MatMulNBits and this gather: the gather reads it as (V, dim*bits/8)."""
    cached = b.shared.setdefault(tag, {})
    key = ("nbits", sub)
    if key not in cached:
        cached[key] = nbits_initializers(b, qweight, scales, zeros, bits, block, sub, dim, tag)
    packed, s, z = cached[key]
    rows = b.initializer(f"{tag}.rows", np.array([qweight.shape[0], -1], dtype=np.int64))
    data = b.node(node, "", "Reshape", [packed, rows])
    b.stats["gatherblockquantized"] += 1
    attrs = {"bits": bits, "block_size": sub, "gather_axis": 0, "quantize_axis": 1}
    return b.node(node, MS_DOMAIN, "GatherBlockQuantized", [data, ids, s, *([z] if z is not None else [])], attrs)


def _dequantize_gather(b: Materializer, node, ids, qweight, scales, zeros, bits, block, dim, tag) -> Any:
    """Standard ONNX on the LM head's transposed codes (shared when tied): Gather columns of codes.T (as uint8),
    scales.T and zeros.T, blocked DequantizeLinear along K, move K last, Slice off the padding."""
    w, s, z = transposed_initializers(b, qweight, scales, zeros, bits, block, tag)
    if bits < 8:  # Gather takes no 4-/2-bit tensors: widen first (constant-folded once by the runtime)
        w, z = (b.node(node, "", "Cast", [t], {"to": b.ir.DataType.UINT8}) for t in (w, z))
    picked = [b.node(node, "", "Gather", [t, ids], {"axis": 1}) for t in (w, s, z)]
    rows = b.node(node, "", "DequantizeLinear", picked, {"axis": 0, "block_size": block})
    rank = len(ids.shape) if ids.shape is not None else 2
    out = b.node(node, "", "Transpose", [rows], {"perm": [*range(1, rank + 1), 0]})
    if qweight.shape[1] * block != dim:
        out = b.slice_to(node, out, tag, dim, axis=-1)
    b.stats["dequantizelinear"] += 1
    return out
