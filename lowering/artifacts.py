"""Artifact names and the metadata every fxpress artifact carries, defined once for lowerings and runners."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxpress.program import Program
    from fxpress.signature import Signature

ARTIFACT_VERSION = 1  # runners refuse other versions
METADATA_KEY = "fxpress.info"  # ONNX metadata_props key holding `artifact_metadata` as JSON
TVM_MANIFEST = "fxpress.json"  # a TVM artifact directory's manifest
TVM_LIBRARY = "model-{}.so"  # unique per export: dlopen caches libraries by path, so a re-export needs a new name
TVM_WEIGHTS = "weights.safetensors"


def artifact_metadata(program: Program, sig: Signature, extra: dict[str, Any]) -> dict[str, Any]:
    """What a runner needs to drive the artifact, stored inside it."""
    return {
        "format": "fxpress",
        "version": ARTIFACT_VERSION,
        "info": program.info.to_dict(),
        "inputs": list(sig.input_names),
        "outputs": list(sig.output_names),
        "passes": list(program.history),
        **extra,
    }
