"""Quantize: packed low-bit linear weights (RTN or GPTQ), dynamic per-token activations, and the KV cache."""

from fxpress.passes.quantize.config import ActQuant, KVQuant, TableQuant, WeightQuant
from fxpress.passes.quantize.quantize import Quantize

__all__ = ["ActQuant", "KVQuant", "Quantize", "TableQuant", "WeightQuant"]
