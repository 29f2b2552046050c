"""Save and load a Program without pickle: the graph as torch.export's JSON, weights as safetensors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from fxpress.artifact_names import PROGRAM_FORMAT, PROGRAM_MANIFEST
from fxpress.atomic import check_target, staged_dir
from fxpress.errors import ArtifactError, FxpressError
from fxpress.integrity import record_digests, verify_digests
from fxpress.program import ModelInfo, Program
from fxpress.safe_load import safe_program_json
from fxpress.signature import signature

FORMAT = PROGRAM_FORMAT
FORMAT_VERSION = 1
GRAPH_FILE, WEIGHTS_FILE, MANIFEST_FILE = "program.json", "weights.safetensors", PROGRAM_MANIFEST


def reexport(program: Program) -> tuple[torch.export.ExportedProgram, tuple[torch.Tensor, ...]]:
    """torch.export the rewritten GraphModule again (fxpress ops through their fake kernels), dynamic dims kept."""
    sig = signature(program)
    try:
        ep = torch.export.export(program.module, sig.example_args, dynamic_shapes=sig.dynamic_shapes, strict=False)
    except Exception as err:
        raise FxpressError(f"the rewritten program could not be exported again: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return ep, sig.example_args


def _unique_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one copy and record aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in by_storage:
            aliases[name] = by_storage[key]
        else:
            by_storage[key] = name
            unique[name] = t.detach().contiguous().clone()
    return unique, aliases


def save_program(program: Program, directory: str | os.PathLike, extra: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write program.json + weights.safetensors + manifest.json into `directory`, atomically (fxpress.atomic).

    An existing directory fxpress did not write is refused unless `overwrite`; checked before any work.
    """
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    directory = check_target(directory, directory=True, overwrite=overwrite)
    ep, examples = reexport(program)
    artifact = serialize(ep)
    tensors = {f"state.{k}": v for k, v in ep.state_dict.items()}
    for k, v in ep.constants.items():
        if not isinstance(v, torch.Tensor):
            raise FxpressError(f"constant '{k}' is a {type(v).__name__}, which cannot be saved as a tensor")
        tensors[f"const.{k}"] = v
    tensors.update({f"example.{i}": t for i, t in enumerate(examples)})
    unique, aliases = _unique_tensors(tensors)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "torch": torch.__version__,
        "info": program.info.to_dict(), "history": program.history, "aliases": aliases,
        "facts": sorted(program.facts) if program.facts is not None else None,
        "parameters": [k for k, v in ep.state_dict.items() if isinstance(v, torch.nn.Parameter)],
        "num_examples": len(examples),
        "example_shapes": [list(t.shape) for t in program.example_inputs],
        "example_dtypes": [str(t.dtype) for t in program.example_inputs],
        **(extra or {}),
    }
    with staged_dir(directory, overwrite=overwrite) as tmp:
        (tmp / GRAPH_FILE).write_bytes(artifact.exported_program)
        save_file(unique, str(tmp / WEIGHTS_FILE))
        manifest["integrity"] = record_digests(tmp, (GRAPH_FILE, WEIGHTS_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return directory


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # in memory only: torch.export's deserializer takes this form
    return buffer.getvalue()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved program, checked for format and version (files are verified by load_program)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a saved fxpress program: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is corrupt (not JSON): {err}") from err
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory} holds '{manifest.get('format')}', not an fxpress program")
    if manifest.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory} is format version {manifest.get('version')}; this fxpress reads {FORMAT_VERSION}")
    return manifest


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path} is missing or unreadable ({err}): save the program again") from err


def _dtype(name: Any, directory: Path) -> torch.dtype:
    """A manifest's dtype string as a torch.dtype, and nothing else torch has under that name."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if str(name).isascii() else None
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{directory / MANIFEST_FILE}: example_dtypes holds {str(name)[:100]!r}, not a torch dtype; "
                            "save the program again")
    return dtype


def load_program(directory: str | os.PathLike) -> tuple[Program, dict[str, Any]]:
    """Read a directory written by save_program back into a Program (and its manifest)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_digests(directory, manifest.get("integrity"), "saved program")
    graph_json = safe_program_json(_read(directory / GRAPH_FILE), directory / GRAPH_FILE)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ArtifactError(f"{directory / WEIGHTS_FILE} is missing or corrupt: {err}") from err
    parameters = {f"state.{k}" for k in manifest.get("parameters", [])}
    for name in list(tensors):
        if name in parameters or any(a in parameters for a, t in manifest["aliases"].items() if t == name):
            tensors[name] = torch.nn.Parameter(tensors[name], requires_grad=False)
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    constants = {k[len("const."):]: v for k, v in tensors.items() if k.startswith("const.")}
    examples = tuple(tensors[f"example.{i}"] for i in range(manifest["num_examples"]))
    try:
        ep = deserialize(SerializedArtifact(graph_json, _to_bytes(state), _to_bytes(constants), _to_bytes((examples, {}))))
    except Exception as err:
        raise ArtifactError(f"{directory / GRAPH_FILE} could not be read as an exported program: {type(err).__name__}: {err}") from err
    info = ModelInfo.from_dict(manifest["info"])
    example = tuple(
        torch.zeros(shape, dtype=_dtype(dtype, directory))
        for shape, dtype in zip(manifest["example_shapes"], manifest["example_dtypes"])
    )
    facts = manifest.get("facts")  # absent in artifacts saved before facts were recorded: derived from history
    program = Program(
        module=ep.module(), example_inputs=example, info=info, history=list(manifest["history"]),
        facts=set(facts) if facts is not None else None,
    )
    return program, manifest
