"""fxpress::threshold_linear in ONNX: an fxpress function, x @ conn.T - threshold (then ReLU)."""

from __future__ import annotations

from typing import Any

from fxpress.lowering.onnx.builder import Materializer, function_proto
from fxpress.lowering.onnx.registry import OnnxOp, like, onnx_lowering, placeholders


@onnx_lowering
class ThresholdLinear(OnnxOp):
    op = "threshold_linear"
    inputs = 3
    attributes = {"relu": "INT"}

    @staticmethod
    def translate(x, conn, threshold, relu=False):
        out = placeholders().ThresholdLinear(x, conn, threshold, relu=int(bool(relu)))
        return like(out, x, conn.shape[0] if conn.shape is not None else None)

    @classmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        relu = bool(node.attributes["relu"].value)
        dtype = node.inputs[0].dtype.value
        name = f"ThresholdLinear{'Relu' if relu else ''}_t{dtype}"
        b.call_function(node, name, lambda: _threshold_function(name, relu, dtype, b.opset), list(node.inputs))


def _threshold_function(name: str, relu: bool, dtype: int, opset: int) -> Any:
    """x @ conn.T - threshold (conn in {-1, 0, 1}), then max(0, .): additions and subtractions only in hardware."""
    import onnx.helper as oh

    nodes = [
        oh.make_node("Cast", ["conn"], ["connf"], to=dtype),
        oh.make_node("Transpose", ["connf"], ["conn_t"], perm=[1, 0]),
        oh.make_node("MatMul", ["x", "conn_t"], ["sums"]),
        oh.make_node("Cast", ["threshold"], ["theta"], to=dtype),
        oh.make_node("Sub", ["sums", "theta"], ["pre" if relu else "y"]),
    ]
    if relu:
        nodes.append(oh.make_node("Relu", ["pre"], ["y"]))
    return function_proto(name, ["x", "conn", "threshold"], ["y"], nodes, opset)
