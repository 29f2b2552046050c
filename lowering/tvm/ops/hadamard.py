"""fxpress::hadamard in TVM: the op's generated TensorIR kernel (`fxpress.runtime.hadamard_kernel`), one call.

The same PrimFunc the PyTorch op builds for the host: a vectorised V x V pass, radix-4 butterfly passes
in cache, and the K x K base as a last pass, so TVM's lowering is as fast as the op (no separate
butterfly and broadcast matmul kernels).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fxpress.errors import LoweringError
from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import dtype_of, node_arg, restore, rows_view, shape_of
from fxpress.runtime.hadamard_kernel import kernel_name, pass_a_matrix, prim_func

KERNEL_DTYPES = ("float32", "float64")


@tvm_lowering("hadamard")
def convert_hadamard(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x, base = node_arg(importer, node, 0), node_arg(importer, node, 1)
    n = int(shape_of(x)[-1])
    k = int(shape_of(base)[0])
    m = n // k
    if n % k or m & (m - 1):
        raise LoweringError(f"fxpress::hadamard: last dim {n} is not {k} * 2^m")
    given = dtype_of(x)
    dtype = given if given in KERNEL_DTYPES else "float32"  # half precision computes in float32, as in PyTorch
    x2, rows, lead = rows_view(bb, x, n)
    if dtype != given:
        x2 = bb.emit(relax.op.astype(x2, dtype))
    gv = bb.add_func(prim_func(k, m, dtype), kernel_name(k, m, dtype))
    h = relax.const(np.ascontiguousarray(pass_a_matrix(m, dtype)), dtype)
    base_c = bb.emit(relax.op.astype(base, dtype))
    y = bb.emit(relax.call_tir(gv, [x2, h, base_c], out_ty=relax.TensorType([rows, n], dtype)))
    if dtype != given:
        y = bb.emit(relax.op.astype(y, given))
    return restore(bb, y, lead, n)
