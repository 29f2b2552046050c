"""QuantizeExperts: MoQa-style mixed precision for mixture-of-experts layers under an average-bit budget."""

from fxpress.passes.quantize_experts.config import ExpertAnalysis, ExpertBudget, ExpertWeights
from fxpress.passes.quantize_experts.quantize_experts import QuantizeExperts

__all__ = ["ExpertAnalysis", "ExpertBudget", "ExpertWeights", "QuantizeExperts"]
