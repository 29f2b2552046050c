"""`Precision`: run a program's activations in another float type (float64 for cross-runtime parity).

Why: at 4-bit activations, any last-bit difference upstream of a quantizer (a matmul's summation order,
a norm's reduction, exp/cos/silu) flips a code, a full quantization step, and the flips cascade through
the layers and the KV cache. Runtimes sum in different orders, so float32 W4A4 programs disagree on
about half their argmaxes. In float64 those differences are ~1e-16 relative: a code flips with
probability ~1e-9 per element, and PyTorch, ONNX Runtime and TVM compute the same codes.

What the pass changes (run it last, after quantize):
- every floating tensor the graph reads (parameters, buffers, constants) becomes `dtype`, tied tensors
  stay tied; the packed codes stay as they are, their float scales hold the same values in `dtype`, so
  the dequantized weight (code - zero) * scale is exact in float64;
- every float dtype argument in the graph (Hugging Face casts to float32 inside RMSNorm, rotary
  embeddings and softmax) becomes `dtype`;
- floating graph inputs (the KV cache) are cast to `dtype` on entry, so callers may still pass float32;
- `program.info.activation_dtype` records the activation dtype, which lowerings and runners read.

The weights' values are unchanged (float32 -> float64 is exact), so an unquantized program computes the
same function to float32 rounding; a quantized one differs where float32 flipped codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.passes.base import Pass, register_pass
from fxpress.program import ACTIVATION_DTYPES as DTYPES
from fxpress.weights import placeholder

if TYPE_CHECKING:
    from fxpress.program import Program

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@register_pass
@dataclass
class Precision(Pass):
    """Compute every activation in `dtype`; packed low-bit weights keep their codes (see the module doc)."""

    name: ClassVar[str] = "precision"
    preserves_function: ClassVar[bool] = False  # exact for float programs, but a W4A4 program's codes change
    dtype: str = "float64"

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"Precision(dtype={self.dtype!r}) is not supported: choose one of {', '.join(DTYPES)} "
                "(float64 makes ONNX Runtime and TVM compute the same activation codes as PyTorch)"
            )

    def run(self, program: Program) -> dict[str, Any]:
        dtype = DTYPES[self.dtype]
        gm = program.module
        tensors = _convert_tensors(gm, dtype)
        args = _rewrite_dtype_args(gm.graph, dtype)
        inputs = _cast_inputs(gm, dtype)
        program.example_inputs = tuple(
            t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _FLOATS else t for t in program.example_inputs
        )
        program.info.activation_dtype = self.dtype
        stats: dict[str, Any] = {"dtype": self.dtype, "tensors_converted": tensors, "dtype_args_rewritten": args,
                                 "inputs_cast": inputs}
        if not (tensors or args or inputs):
            stats.update(modified=False, warnings=[f"the program already computes in {self.dtype}"])
        return stats


def _convert_tensors(gm: torch.fx.GraphModule, dtype: torch.dtype) -> int:
    """Every floating get_attr tensor -> dtype (same kind: parameter, buffer or plain attribute), one at a time.

    In memory, tensors shared by several attributes stay shared (found by storage). Stored weights are read,
    cast and written back one by one, and nothing keeps them: their graph values become placeholders.
    """
    converted: dict[tuple[int, int, tuple], torch.Tensor] = {}  # in-memory ties only: a read's address is reused
    count = 0
    for target in dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "get_attr"):
        old = G.get_param(gm, target)
        if not isinstance(old, torch.Tensor) or old.dtype not in _FLOATS or old.dtype == dtype:
            continue
        if G.is_stored(gm, target):
            new, count = old.detach().to(dtype), count + 1
        else:
            key = (old.untyped_storage().data_ptr(), old.storage_offset(), tuple(old.shape))
            if key not in converted:
                converted[key], count = old.detach().to(dtype), count + 1
            new = converted[key]
        del old
        G.store_tensor(gm, target, new)
        value = placeholder(new.shape, new.dtype) if G.is_stored(gm, target) else new
        for user in gm.graph.nodes:
            if user.op == "get_attr" and user.target == target and "val" in user.meta:
                user.meta["val"] = value
    return count


def _rewrite_dtype_args(graph: torch.fx.Graph, dtype: torch.dtype) -> int:
    """Float dtype arguments (positional or keyword, at any nesting) -> dtype."""
    count = 0

    def swap(value: Any) -> Any:
        nonlocal count
        if isinstance(value, torch.dtype) and value in _FLOATS and value != dtype:
            count += 1
            return dtype
        return value

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, swap)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    return count


def _cast_inputs(gm: torch.fx.GraphModule, dtype: torch.dtype) -> int:
    """A cast after every floating placeholder (the KV cache), read by all its users: float32 callers still work."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "placeholder":
            continue
        value = G.val(node)
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOATS:
            continue
        G.insert_after(gm, node, torch.ops.aten.to.dtype, (node, dtype))
        count += 1
    return count
