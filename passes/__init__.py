"""fxpress passes: one module per pass, the Pass contract, the registry and the manager."""

from fxpress.passes.base import PASS_REGISTRY, Pass, PassResult, get_pass_class, pass_from_dict, register_pass
from fxpress.passes.manager import run_passes, validate_pipeline

__all__ = ["PASS_REGISTRY", "Pass", "PassResult", "get_pass_class", "pass_from_dict", "register_pass", "run_passes", "validate_pipeline"]
from fxpress.passes.quantize import Quantize  # noqa: E402

__all__ += ["Quantize"]
