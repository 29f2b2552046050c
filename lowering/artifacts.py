"""The metadata and digests every fxpress ONNX/TVM artifact carries; the file names and markers are in fxpress.artifact_names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxpress.artifact_names import ARTIFACT_FORMAT, METADATA_KEY

if TYPE_CHECKING:
    from fxpress.program import Program
    from fxpress.signature import Signature

ARTIFACT_VERSION = 1  # runners refuse other versions
ONNX_DIGESTS_KEY = "fxpress.sha256"  # ONNX metadata_props key holding `initializer_digests` as JSON
TVM_LIBRARY = "model-{}.so"  # unique per export: dlopen caches libraries by path, so a re-export needs a new name
TVM_WEIGHTS = "weights.safetensors"


def artifact_metadata(program: Program, sig: Signature, extra: dict[str, Any]) -> dict[str, Any]:
    """What a runner needs to drive the artifact, stored inside it."""
    return {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "info": program.info.to_dict(),
        "inputs": list(sig.input_names),
        "outputs": list(sig.output_names),
        "passes": list(program.history),
        **extra,
    }


def initializer_digests(model: Any, known: dict[str, str] | None = None) -> dict[str, str]:
    """SHA-256 of each initializer's bytes in an onnx_ir Model, to store in its metadata_props under ONNX_DIGESTS_KEY.

    An ONNX artifact is one file (plus `.data` for > 2 GB): a whole-file digest cannot live inside the file it
    covers, and a sidecar would be one more file to keep in step. Per-initializer digests ride inside the model,
    cover the weights wherever they are stored (inline or in `.data`), and name the tensor that differs.
    """
    known = known or {}  # digests taken as the bytes were written (streamed external data): not read again
    return {name: known.get(name) or _sha256(value.const_value)
            for name, value in model.graph.initializers.items() if value.const_value is not None}


def _sha256(tensor: Any) -> str:
    """One tensor's digest; an external tensor's file mapping is released after, so checking a large artifact
    maps one tensor at a time, not the whole .data file."""
    import hashlib

    import onnx_ir as ir

    digest = hashlib.sha256(tensor.tobytes()).hexdigest()
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return digest


def verify_onnx_initializers(path: Path) -> None:
    """Compare an ONNX artifact's initializers with the digests recorded at export; ArtifactError names them."""
    import onnx_ir as ir

    from fxpress.errors import ArtifactError
    from fxpress.integrity import changed_names

    try:
        model = ir.load(str(path))
        recorded = json.loads(model.metadata_props.get(ONNX_DIGESTS_KEY) or "null")
        actual = initializer_digests(model)
    except Exception as err:  # protobuf, JSON and missing-.data errors all mean an unreadable artifact
        raise ArtifactError(f"'{path}' (or its .data file) cannot be read ({type(err).__name__}: "
                            f"{str(err)[:200]}): it is truncated or foreign; export it again") from err
    if not isinstance(recorded, dict):
        if METADATA_KEY not in model.metadata_props:
            return  # not an fxpress artifact at all: the runner refuses it with its own message
        warnings.warn(f"ONNX artifact '{path}' has no recorded digests (exported by an older fxpress): its weights "
                      "cannot be verified; export it again to record them", stacklevel=3)
        return
    shown = changed_names(recorded, actual)
    if shown:
        raise ArtifactError(f"ONNX artifact '{path}': initializers changed since export ({shown}; their SHA-256 "
                            "differs from the one recorded): the file or its .data file was corrupted or edited; "
                            "export it again")
