"""fxpress: a compiler for model compression on FX graphs.

capture -> passes -> lowering: `fxpress.compile(model, passes=[...])` captures the model with
torch.export, rewrites the graph with composable passes, and exports ONNX, TVM or FPGA artifacts.
"""

import os

# TVM's thread pool pins the calling thread to one core unless told not to; torch's OpenMP threads then share
# that core and every parallel op crawls (a 1536 x 576 matmul took seconds). fxpress runs TVM kernels beside
# torch in one process, so TVM must leave affinity alone. Set before TVM's pool starts (a user's value wins).
os.environ.setdefault("TVM_BIND_THREADS", "0")

from fxpress import runtime as _runtime  # noqa: E402, F401  (registers the fxpress::* ops)
from fxpress.capture import capture  # noqa: E402
from fxpress.compiled import CompiledModel, compile, load  # noqa: E402
from fxpress.errors import FxpressError  # noqa: E402
from fxpress.program import Program  # noqa: E402

__all__ = ["CompiledModel", "FxpressError", "Program", "capture", "compile", "load"]
__version__ = "0.1.0"
