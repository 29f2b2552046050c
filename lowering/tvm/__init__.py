"""TVM lowering: Relax from the re-exported program, one converter per `fxpress` op, built for llvm.

re-export → import (from_exported_program + fxpress converters) → build → save:
- `fxpress::linear_nbit` (and the grouped MoE variant) become TensorIR kernels that read the packed
  MatMulNBits bytes directly (unpack, subtract the zero point, scale, accumulate), so the weights stay
  low-bit in memory and on disk; `fxpress::hadamard` is a TensorIR butterfly (n log n adds) plus one
  K x K contraction; activation quantization and threshold neurons are Relax ops;
- weights stay function parameters (`keep_params_as_input`) and are saved beside the library in a
  safetensors file, packed bytes as uint8;
- the artifact is a directory (library, weights, `fxpress.json` manifest), built in a temporary
  directory and renamed into place.

Adding an op: one module in `ops/` with a `@tvm_lowering(op)` converter (see `registry`).
"""

from fxpress.lowering.tvm import ops  # noqa: F401  (registers every op's converter)
from fxpress.lowering.tvm.build import export_tvm, to_relax
from fxpress.lowering.tvm.registry import convert_map, register_converters

__all__ = ["convert_map", "export_tvm", "register_converters", "to_relax"]
