"""fxpress: a compiler for model compression on FX graphs.

capture -> passes -> lowering: `fxpress.compile(model, passes=[...])` captures the model with
torch.export, rewrites the graph with composable passes, and exports ONNX, TVM or FPGA artifacts.
"""

from fxpress import runtime as _runtime  # noqa: F401  (registers the fxpress::* ops)
from fxpress.capture import capture
from fxpress.compiled import CompiledModel, compile, load
from fxpress.errors import FxpressError
from fxpress.program import Program

__all__ = ["CompiledModel", "FxpressError", "Program", "capture", "compile", "load"]
__version__ = "0.1.0"
