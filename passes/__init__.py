"""fxpress passes: one folder per pass, the Pass contract, the registry and the manager.

Importing this package registers every built-in pass by name (rotate, fold_hadamard, quantize,
quantize_experts, prune_tokens, threshold_neurons), so recipes and the CLI can find them.
"""

from fxpress.passes.base import PASS_REGISTRY, Pass, PassResult, get_pass_class, pass_from_dict, register_pass
from fxpress.passes.fold_hadamard import FoldHadamard
from fxpress.passes.manager import run_passes, validate_pipeline
from fxpress.passes.precision import Precision
from fxpress.passes.prune_tokens import PruneTokens
from fxpress.passes.quantize import Quantize
from fxpress.passes.quantize_experts import QuantizeExperts
from fxpress.passes.rotate import Rotate
from fxpress.passes.threshold_neurons import ThresholdNeurons

__all__ = [
    "PASS_REGISTRY", "FoldHadamard", "Pass", "PassResult", "Precision", "PruneTokens", "Quantize", "QuantizeExperts",
    "Rotate", "ThresholdNeurons", "get_pass_class", "pass_from_dict", "register_pass", "run_passes", "validate_pipeline",
]
