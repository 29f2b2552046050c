"""ONNX lowering: torch.onnx (dynamo) with one `OnnxOp` per `fxpress` op, then real low-bit kernels.

export → translate → materialize → save:
- the program is re-exported (dynamic batch / seq / past) and translated by `torch.onnx.export(dynamo=True)`;
  each `fxpress::*` op becomes a placeholder node in the `fxpress` ONNX domain (its op's `translate`);
- `materialize` turns placeholders into what runtimes execute, now that weight values are known:
  packed linears become `com.microsoft::MatMulNBits` (ONNX Runtime's int2/4/8 kernels) or standard blocked
  `DequantizeLinear` + `MatMul` (opset 21+); the Hadamard, activation quantization and threshold
  neurons become ONNX functions in the `fxpress` domain built from standard ops, so any runtime runs them;
- the model is checked (`onnx.checker`), written to a temporary file (weights > 2 GB to external data)
  and renamed into place.

Adding an op: one module in `ops/` with an `@onnx_lowering` class (see `registry.OnnxOp`).
"""

from fxpress.lowering.onnx import ops  # noqa: F401  (registers every op's lowering)
from fxpress.lowering.onnx.export import WEIGHT_FORMATS, export_onnx, to_onnx_model
from fxpress.lowering.onnx.registry import register_translations, translation_table

__all__ = ["WEIGHT_FORMATS", "export_onnx", "register_translations", "to_onnx_model", "translation_table"]
