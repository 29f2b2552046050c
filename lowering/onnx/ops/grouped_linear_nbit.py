"""fxpress::grouped_linear_nbit (MoE experts) in ONNX: one packed matmul per expert's slice of rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from fxpress.lowering.onnx.builder import Materializer, node_attributes
from fxpress.lowering.onnx.packed import packed_matmul
from fxpress.lowering.onnx.registry import OnnxOp, like, onnx_lowering, placeholders


@onnx_lowering
class GroupedLinearNBits(OnnxOp):
    op = "grouped_linear_nbit"
    inputs = -1
    attributes = {"bits": "INTS", "block_size": "INT", "in_features": "INT", "num_experts": "INT"}

    @staticmethod
    def translate(x, offsets, qweights, scales, zero_points, bits, block_size, in_features):
        qweights, zero_points = list(qweights), list(zero_points)
        out = placeholders().GroupedLinearNBits(x, offsets, scales, *qweights, *zero_points, bits=list(bits),
                                                block_size=block_size, in_features=in_features,
                                                num_experts=len(qweights))
        return like(out, x, scales.shape[1] if scales.shape is not None else None)

    @classmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        """Rows are sorted by expert: Slice each expert's rows, one packed matmul each, Concat, zero-pad the rest."""
        bits, block, k, experts = node_attributes(node, "bits", "block_size", "in_features", "num_experts")
        bits = list(bits)
        x, offsets, scales = node.inputs[0], node.inputs[1], node.inputs[2]
        qweights = node.inputs[3:3 + experts]
        zeros = node.inputs[3 + experts:3 + 2 * experts]
        scale_values = b.const(scales)
        zero_ix = b.initializer("grouped.zero", np.array([0], dtype=np.int64))
        rows = b.node(node, "", "Shape", [x], {"start": 0, "end": 1})
        ends = b.node(node, "", "Cast", [offsets], {"to": b.ir.DataType.INT64})
        ends = b.node(node, "", "Min", [ends, rows])
        ends = b.node(node, "", "Max", [ends, zero_ix])
        parts, start = [], zero_ix
        for e in range(experts):
            ix = b.initializer(f"grouped.expert{e}", np.array([e], dtype=np.int64))
            end = b.node(node, "", "Gather", [ends, ix], {"axis": 0})
            end = b.node(node, "", "Max", [end, start])
            rows_e = b.node(node, "", "Slice", [x, start, end, zero_ix])
            zero_e = b.const(zeros[e]) if e < len(zeros) and zeros[e] is not None else None
            parts.append(packed_matmul(b, node, rows_e, b.const(qweights[e]), scale_values[e], zero_e, bits[e], block,
                                       k, f"{qweights[e].name}"))
            start = end
        out = b.node(node, "", "Concat", parts, {"axis": 0})
        pad_rows = b.node(node, "", "Sub", [rows, start])
        pads = b.node(node, "", "Concat", [zero_ix, zero_ix, pad_rows, zero_ix], {"axis": 0})
        b.replace(node, b.node(node, "", "Pad", [out, pads]))
