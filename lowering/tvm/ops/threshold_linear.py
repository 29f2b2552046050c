"""fxpress::threshold_linear in TVM: x @ conn.T - threshold (then ReLU) as Relax ops."""

from __future__ import annotations

from typing import Any

from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import dtype_of, node_arg


@tvm_lowering("threshold_linear")
def convert_threshold_linear(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, conn, threshold, relu = (node_arg(importer, node, i) for i in range(4))
    dtype = dtype_of(x)
    weight = bb.emit(relax.op.permute_dims(relax.op.astype(conn, dtype), [1, 0]))
    out = bb.emit(relax.op.subtract(relax.op.matmul(x, weight), relax.op.astype(threshold, dtype)))
    return bb.emit(relax.op.nn.relu(out)) if relu else out
