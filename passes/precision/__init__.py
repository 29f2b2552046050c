"""`Precision`: run a program's activations in another float type (float64 for cross-runtime parity)."""

from fxpress.passes.precision.precision import Precision

__all__ = ["Precision"]
