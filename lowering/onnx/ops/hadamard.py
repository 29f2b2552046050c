"""fxpress::hadamard in ONNX: an fxpress function of small ±1 Sylvester MatMuls and one K x K base MatMul."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fxpress.errors import LoweringError
from fxpress.lowering.onnx.builder import Materializer, constant, function_proto, numpy_dtype
from fxpress.lowering.onnx.registry import OnnxOp, like, onnx_lowering, placeholders


@onnx_lowering
class Hadamard(OnnxOp):
    op = "hadamard"
    inputs = 2

    @staticmethod
    def translate(x, base):
        return like(placeholders().Hadamard(x, base), x)

    @classmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        x, base = node.inputs
        n = x.shape[-1] if x.shape is not None else None
        k = base.shape[0] if base.shape is not None else None
        if not isinstance(n, int) or not isinstance(k, int):
            raise LoweringError(f"fxpress::hadamard on '{x.name}': the transformed (last) dim and the base size must be static")
        m = n // k
        if n % k or m & (m - 1):
            raise LoweringError(f"fxpress::hadamard on '{x.name}': last dim {n} is not {k} * 2^m")
        dtype = x.dtype.value
        b.call_function(node, f"Hadamard_{k}x{m}_t{dtype}", lambda: _hadamard_function(k, m, dtype, b.opset), [x, base])


def _sylvester(r: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < r:
        h = np.block([[h, h], [h, -h]])
    return h


def _hadamard_function(k: int, m: int, dtype: int, opset: int) -> Any:
    """y = x @ (base ⊗ H_m / sqrt(m)): ±1 Sylvester factors of order <= 16 on the 2^m part, then the K x K base.

    Each factor is one small ±1 MatMul on its axis of the row viewed as [K, r_1, ..., r_s]; cost n·(Σ r_i + K)
    per row instead of the n² of a dense rotation.
    """
    import onnx.helper as oh

    np_t = numpy_dtype(dtype)
    nodes = [oh.make_node("Shape", ["x"], ["shape"])]
    factors, rest = [], m
    while rest > 1:
        factors.append(min(16, rest))
        rest //= factors[-1]
    current, inner = "x", m
    for i, r in enumerate(factors):
        inner //= r
        nodes += [
            constant(f"view{i}", np.array([-1, r, inner], dtype=np.int64)),
            constant(f"h{i}", _sylvester(r).astype(np_t)),
            oh.make_node("Reshape", [current, f"view{i}"], [f"v{i}"]),
            oh.make_node("MatMul", [f"h{i}", f"v{i}"], [f"y{i}"]),
        ]
        current = f"y{i}"
    nodes += [
        constant("scale", np.array(1.0 / math.sqrt(m), dtype=np_t)),
        constant("rows", np.array([-1, k, m], dtype=np.int64)),
        oh.make_node("Reshape", [current, "rows"], ["grid"]),
        oh.make_node("Mul", ["grid", "scale"], ["scaled"]),
    ]
    if k > 1:
        nodes += [
            oh.make_node("Cast", ["base"], ["base_c"], to=dtype),
            oh.make_node("Transpose", ["base_c"], ["base_t"], perm=[1, 0]),
            oh.make_node("MatMul", ["base_t", "scaled"], ["mixed"]),
        ]
    else:
        nodes.append(oh.make_node("Identity", ["scaled"], ["mixed"]))
    nodes.append(oh.make_node("Reshape", ["mixed", "shape"], ["y"]))
    return function_proto(f"Hadamard_{k}x{m}_t{dtype}", ["x", "base"], ["y"], nodes, opset)
