"""One module per fxpress op: its TVM converter (and TensorIR kernel), registered on import."""

from fxpress.lowering.tvm.ops.embedding_nbit import convert_embedding_nbit
from fxpress.lowering.tvm.ops.grouped_linear_nbit import convert_grouped_linear_nbit
from fxpress.lowering.tvm.ops.hadamard import convert_hadamard
from fxpress.lowering.tvm.ops.linear_nbit import convert_linear_nbit
from fxpress.lowering.tvm.ops.quantize_act import convert_quantize_act
from fxpress.lowering.tvm.ops.threshold_linear import convert_threshold_linear

__all__ = ["convert_embedding_nbit", "convert_grouped_linear_nbit", "convert_hadamard", "convert_linear_nbit",
           "convert_quantize_act", "convert_threshold_linear"]
