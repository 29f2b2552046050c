"""fxpress::quantize_act in TVM: per-row dynamic fake quantization as Relax ops."""

from __future__ import annotations

from typing import Any

from fxpress.lowering.tvm.registry import tvm_lowering
from fxpress.lowering.tvm.relax_helpers import dtype_of, node_arg


@tvm_lowering("quantize_act")
def convert_quantize_act(node: Any, importer: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    x = node_arg(importer, node, 0)
    bits, clip, symmetric = int(node_arg(importer, node, 1)), float(node_arg(importer, node, 2)), bool(node_arg(importer, node, 3))
    dtype = dtype_of(x)

    def c(v: float) -> Any:
        return relax.const(v, dtype)

    op = relax.op

    import torch

    from fxpress.runtime.quant import TIE_OFFSET

    margin = TIE_OFFSET.get(getattr(torch, dtype, None), 0.0)  # float64: exact ties round up (runtime/quant.py)

    def round_even(v: Any) -> Any:  # torch.round rounds halves to even; Relax's round rounds them away from 0
        if margin:
            v = bb.emit(op.add(v, c(margin)))
        low = bb.emit(op.floor(v))
        frac = bb.emit(op.subtract(v, low))
        tie = op.add(low, op.floor_mod(low, c(2.0)))
        up = op.where(op.greater(frac, c(0.5)), op.add(low, c(1.0)), low)
        return bb.emit(op.where(op.equal(frac, c(0.5)), tie, up))

    if symmetric:
        maxq = (1 << (bits - 1)) - 1
        scale = bb.emit(op.multiply(op.max(op.abs(x), axis=-1, keepdims=True), c(clip / max(maxq, 1))))
        scale = bb.emit(op.where(op.greater(scale, c(0.0)), scale, c(1.0)))
        codes = round_even(bb.emit(op.clip(op.divide(x, scale), -maxq - 1, maxq)))
        return bb.emit(op.multiply(codes, scale))
    maxq = (1 << bits) - 1
    high = bb.emit(op.multiply(op.maximum(op.max(x, axis=-1, keepdims=True), c(0.0)), c(clip)))
    low = bb.emit(op.multiply(op.minimum(op.min(x, axis=-1, keepdims=True), c(0.0)), c(clip)))
    scale = bb.emit(op.divide(op.subtract(high, low), c(float(maxq))))
    scale = bb.emit(op.where(op.greater(scale, c(0.0)), scale, c(1.0)))
    # as the reference kernel: zero = round(clamp(-low / scale)), code = round(clamp(x / scale + zero))
    zero = round_even(bb.emit(op.clip(op.divide(op.negative(low), scale), 0, maxq)))
    codes = round_even(bb.emit(op.clip(op.add(op.divide(x, scale), zero), 0, maxq)))
    return bb.emit(op.multiply(op.subtract(codes, zero), scale))
