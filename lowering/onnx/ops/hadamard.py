"""fxpress::hadamard in ONNX: an fxpress function of ±1 Sylvester MatMuls (<= 16 x 16) and one K x K base MatMul."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fxpress.errors import LoweringError
from fxpress.lowering.onnx.builder import Materializer, constant, function_proto, numpy_dtype
from fxpress.lowering.onnx.registry import OnnxOp, like, onnx_lowering, placeholders
from fxpress.runtime.hadamard_kernel import radices, sylvester


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


def _hadamard_function(k: int, m: int, dtype: int, opset: int) -> Any:
    """y = x @ (base ⊗ H_m / sqrt(m)) as one right-hand MatMul per index digit of the row, rotating digits.

    The row's index is read as digits [K, r_1, ..., r_s] (r_i <= 16, ±1 Sylvester factors). Each stage
    multiplies the trailing digit ([-1, r] @ factor, ONNX Runtime's plain GEMM) and a Transpose moves
    it to the front; after s (+1 for the K x K base) stages the order is back. This is ~15x faster in
    ONNX Runtime than a left MatMul broadcast over [-1, r, inner] views, which it runs as many tiny GEMMs.
    Each factor is normalised (H_r / sqrt(r)), so the 1/sqrt(m) scale costs no pass of its own over x (dropping the
    trailing Mul took n = 4096 from 1.73 to 1.60 ms on one thread).
    """
    import onnx.helper as oh

    np_t = numpy_dtype(dtype)
    n = k * m
    nodes = [oh.make_node("Shape", ["x"], ["shape"])]
    factors = [(f"h{i}", r) for i, r in enumerate(reversed(radices(m)))]  # trailing digit first
    nodes += [constant(name, (sylvester(r) / math.sqrt(r)).astype(np_t)) for name, r in factors]
    if k > 1:
        nodes.append(oh.make_node("Cast", ["base"], ["base_c"], to=dtype))
        factors.append(("base_c", k))
    current = "x"
    for i, (mat, r) in enumerate(factors):
        nodes += [
            constant(f"digit{i}", np.array([-1, r], dtype=np.int64)),
            constant(f"rows{i}", np.array([-1, n // r, r], dtype=np.int64)),
            oh.make_node("Reshape", [current, f"digit{i}"], [f"d{i}"]),
            oh.make_node("MatMul", [f"d{i}", mat], [f"p{i}"]),
            oh.make_node("Reshape", [f"p{i}", f"rows{i}"], [f"g{i}"]),
            oh.make_node("Transpose", [f"g{i}"], [f"t{i}"], perm=[0, 2, 1]),
        ]
        current = f"t{i}"
    nodes.append(oh.make_node("Reshape", [current, "shape"], ["y"]))
    return function_proto(f"Hadamard_{k}x{m}_t{dtype}", ["x", "base"], ["y"], nodes, opset)
