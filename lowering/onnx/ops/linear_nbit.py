"""fxpress::linear_nbit in ONNX: MatMulNBits or DequantizeLinear + MatMul, plus the bias."""

from __future__ import annotations

from typing import Any

from fxpress.lowering.onnx.builder import Materializer, node_attributes
from fxpress.lowering.onnx.packed import packed_matmul
from fxpress.lowering.onnx.registry import OnnxOp, like, onnx_lowering, placeholders


@onnx_lowering
class LinearNBits(OnnxOp):
    op = "linear_nbit"
    inputs = 5
    attributes = {"bits": "INT", "block_size": "INT", "in_features": "INT"}

    @staticmethod
    def translate(x, qweight, scales, zero_points=None, bias=None, bits=4, block_size=32, in_features=0):
        out = placeholders().LinearNBits(x, qweight, scales, zero_points, bias, bits=bits, block_size=block_size,
                                         in_features=in_features)
        return like(out, x, qweight.shape[0] if qweight.shape is not None else None)

    @classmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        x, qweight, scales, zeros, bias = (list(node.inputs) + [None] * 5)[:5]
        bits, block, k = node_attributes(node, "bits", "block_size", "in_features")
        out = packed_matmul(b, node, x, b.const(qweight), b.const(scales), b.const(zeros), bits, block, k,
                            qweight.name)
        if bias is not None:
            out = b.node(node, "", "Add", [out, bias])
        b.replace(node, out)
