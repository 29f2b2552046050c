"""Rotate: fold norm scales, untie embeddings, rotate the residual stream (R1) and each head's values (R2)."""

from fxpress.passes.rotate.rotate import Rotate

__all__ = ["Rotate"]
