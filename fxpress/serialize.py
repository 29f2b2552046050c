"""Save and load a Program without pickle: the graph as torch.export's JSON, weights as safetensors shards.

Saving streams the weights shard by shard from wherever they live (the weight store of a store-backed program, or
the module); loading reads the shards whole, or serves them through a weight store (a store-backed Program).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fxpress.artifact_names import PROGRAM_FORMAT, PROGRAM_MANIFEST
from fxpress.atomic import check_target, staged_dir
from fxpress.errors import ArtifactError, ConfigError, FxpressError
from fxpress.integrity import record_digests, verify_digests
from fxpress.program import ModelInfo, Program
from fxpress.safe_load import safe_program_json
from fxpress.shards import (
    SHARD_BYTES,
    SINGLE_FILE,
    read_shards,
    single_file_map,
    store_from_shards,
    write_shards,
)
from fxpress.signature import signature
from fxpress.weights import WeightStore, attach_store, is_placeholder, placeholder

FORMAT = PROGRAM_FORMAT
FORMAT_VERSION = 2  # 2: weights in shards listed by the manifest's weight_map; 1: one weights.safetensors
READ_VERSIONS = (1, 2)
LAZY_ABOVE = 2**30  # load_program(lazy=None) serves the weights from their shards when they exceed this many bytes
GRAPH_FILE, WEIGHTS_FILE, MANIFEST_FILE = "program.json", SINGLE_FILE, PROGRAM_MANIFEST


def reexport(program: Program) -> tuple[torch.export.ExportedProgram, tuple[torch.Tensor, ...]]:
    """torch.export the rewritten GraphModule again (fxpress ops through their fake kernels), dynamic dims kept."""
    sig = signature(program)
    try:
        ep = torch.export.export(program.module, sig.example_args, dynamic_shapes=sig.dynamic_shapes, strict=False)
    except Exception as err:
        raise FxpressError(f"the rewritten program could not be exported again: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return ep, sig.example_args


def _unique_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one name per tensor and record aliases.

    Nothing is copied (a shard's tensors are made contiguous only when it is written); placeholders are
    told apart by identity, real tensors by their storage and view."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for name, t in tensors.items():
        if is_placeholder(t):
            key: tuple = ("placeholder", id(t))
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in by_storage:
            aliases[name] = by_storage[key]
        else:
            by_storage[key] = name
            unique[name] = t
    return unique, aliases


def _reader(program: Program, tensors: dict[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Reads a saved tensor by its artifact name: placeholders from the program's weight store, the rest as they are."""
    store = program.weights

    def read(name: str) -> torch.Tensor:
        value = tensors[name]
        if not is_placeholder(value):
            return value
        target = name.split(".", 1)[1]
        if store is None or target not in store:
            raise FxpressError(f"'{target}' is a placeholder the program's weight store does not hold: the program "
                               "was copied without its weights; clone Programs with Program.clone()")
        return store.get(target)

    return read


def _collect(ep: torch.export.ExportedProgram, examples: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    tensors = {f"state.{k}": v for k, v in ep.state_dict.items()}
    for k, v in ep.constants.items():
        if not isinstance(v, torch.Tensor):
            raise FxpressError(f"constant '{k}' is a {type(v).__name__}, which cannot be saved as a tensor")
        tensors[f"const.{k}"] = v
    tensors.update({f"example.{i}": t for i, t in enumerate(examples)})
    return tensors


def save_program(program: Program, directory: str | os.PathLike, extra: dict[str, Any] | None = None,
                 overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write program.json + weight shards + manifest.json into `directory`, atomically (fxpress.atomic).

    Weights go shard by shard (at most `shard_bytes` each), read from the weight store for a store-backed
    program, so saving never holds the whole model. An existing directory fxpress did not write is refused
    unless `overwrite`; checked before any work.
    """
    from torch._export.serde.serialize import serialize

    directory = check_target(directory, directory=True, overwrite=overwrite)
    if not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ConfigError(f"shard_bytes = {shard_bytes!r}: give the most bytes per weight shard, e.g. 2**30")
    ep, examples = reexport(program)
    graph_json = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                           serialize_example_inputs=False).exported_program
    tensors = _collect(ep, examples)
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
    specs = {name: (tuple(t.shape), t.dtype) for name, t in unique.items()}
    with staged_dir(directory, overwrite=overwrite) as tmp:
        (tmp / GRAPH_FILE).write_bytes(graph_json)
        manifest["weight_map"] = write_shards(tmp, specs, _reader(program, unique), shard_bytes)
        shards = list(dict.fromkeys(manifest["weight_map"].values()))
        manifest["integrity"] = record_digests(tmp, (GRAPH_FILE, *shards))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return directory


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
    if manifest.get("version") not in READ_VERSIONS:
        raise ArtifactError(f"{directory} is format version {manifest.get('version')}; this fxpress reads "
                            f"{', '.join(map(str, READ_VERSIONS))}: save it again with this fxpress")
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


def _weight_map(directory: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Tensor name -> shard file; an artifact from before shards (format 1) has one weights.safetensors."""
    weight_map = manifest.get("weight_map")
    if weight_map is None:
        return single_file_map(directory, WEIGHTS_FILE)
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(f"{directory / MANIFEST_FILE}: weight_map is malformed; save the program again")
    return weight_map


def _lazy_tensors(directory: Path, manifest: dict[str, Any], weight_map: dict[str, str],
                  budget: int | None) -> tuple[dict[str, torch.Tensor], WeightStore]:
    """Meta tensors for the deserializer (shapes only) and a store serving each graph name from the shards.

    Artifact names are `state.<graph name>`, `const.<graph name>` and `example.<i>`; an alias shares its target's data.
    """
    aliases = manifest["aliases"]
    names = {n: aliases.get(n, n) for n in [*weight_map, *aliases] if not n.startswith("example.")}
    store = store_from_shards(directory, weight_map, {_graph_name(n): k for n, k in names.items()}, budget)
    metas = {k: torch.empty(store.spec(_graph_name(k))[0], dtype=store.spec(_graph_name(k))[1], device="meta")
             for k in set(names.values())}
    tensors = {n: metas[k] for n, k in names.items()}
    inputs = store_from_shards(directory, weight_map, {n: n for n in weight_map if n.startswith("example.")})
    return {**tensors, **{n: inputs.get(n) for n in inputs.names()}}, store


def _graph_name(name: str) -> str:
    """The graph attribute of an artifact tensor name (`state.` / `const.` dropped)."""
    return name.split(".", 1)[1]


def _as_placeholders(module: torch.nn.Module) -> None:
    """Every meta tensor on the loaded module becomes a placeholder of the store's fake mode (ties kept)."""
    made: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers, sub.__dict__):
            for name, value in list(table.items()):
                if isinstance(value, torch.Tensor) and value.is_meta:
                    if id(value) not in made:
                        fresh = placeholder(value.shape, value.dtype)
                        made[id(value)] = (torch.nn.Parameter(fresh, requires_grad=False)
                                           if isinstance(value, torch.nn.Parameter) else fresh)
                    table[name] = made[id(value)]


def _wants_lazy(directory: Path, weight_map: dict[str, str], lazy: bool | None) -> bool:
    if lazy is not None:
        return bool(lazy)
    files = {directory / f for f in weight_map.values()}
    return sum(p.stat().st_size for p in files if p.is_file()) > LAZY_ABOVE


def _exported(directory: Path, graph_json: bytes, tensors: dict[str, torch.Tensor],
              manifest: dict[str, Any]) -> torch.export.ExportedProgram:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    parameters = {f"state.{k}" for k in manifest.get("parameters", [])}
    made: dict[int, torch.nn.Parameter] = {}
    for name in [*tensors]:  # a tied tensor is one Parameter under both names
        if name in parameters:
            value = tensors[name]
            made.setdefault(id(value), torch.nn.Parameter(value, requires_grad=False))
            tensors[name] = made[id(value)]
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    constants = {k[len("const."):]: v for k, v in tensors.items() if k.startswith("const.")}
    examples = tuple(tensors[f"example.{i}"] for i in range(manifest["num_examples"]))
    try:
        return deserialize(SerializedArtifact(graph_json, state, constants, (examples, {})))
    except Exception as err:
        raise ArtifactError(f"{directory / GRAPH_FILE} could not be read as an exported program: {type(err).__name__}: {err}") from err


def load_program(directory: str | os.PathLike, lazy: bool | None = None,
                 budget: int | None = None) -> tuple[Program, dict[str, Any]]:
    """Read a directory written by save_program back into a Program (and its manifest).

    lazy: True gives a store-backed Program whose weight store serves the artifact's shards (each tensor read when
    the program needs it; `budget` bounds the store's in-memory overlay); False reads every shard now; None (the
    default) is lazy when the shards exceed LAZY_ABOVE bytes. Digests are checked first, streaming each file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_digests(directory, manifest.get("integrity"), "saved program")
    graph_json = safe_program_json(_read(directory / GRAPH_FILE), directory / GRAPH_FILE)
    weight_map = _weight_map(directory, manifest)
    store = None
    if _wants_lazy(directory, weight_map, lazy):
        tensors, store = _lazy_tensors(directory, manifest, weight_map, budget)
    else:
        tensors = read_shards(directory, weight_map)
        for alias, target in manifest["aliases"].items():
            tensors[alias] = tensors[target]
    module = _exported(directory, graph_json, tensors, manifest).module()
    if store is not None:
        _as_placeholders(module)
        attach_store(module, store)
    info = ModelInfo.from_dict(manifest["info"])
    example = tuple(
        torch.zeros(shape, dtype=_dtype(dtype, directory))
        for shape, dtype in zip(manifest["example_shapes"], manifest["example_dtypes"])
    )
    facts = manifest.get("facts")  # absent in artifacts saved before facts were recorded: derived from history
    program = Program(
        module=module, example_inputs=example, info=info, history=list(manifest["history"]),
        facts=set(facts) if facts is not None else None,
    )
    return program, manifest
