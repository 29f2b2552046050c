"""One module per fxpress op: its ONNX lowering (`OnnxOp`), registered on import."""

from fxpress.lowering.onnx.ops import (  # noqa: F401  (each module registers its op's lowering)
    embedding_nbit,
    grouped_linear_nbit,
    hadamard,
    linear_nbit,
    quantize_act,
    threshold_linear,
)
