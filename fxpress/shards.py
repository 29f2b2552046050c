"""A saved program's weights as safetensors shards, written one tensor at a time, read a shard or a tensor at a time.

A model larger than memory cannot be saved from one dict of tensors: the writer groups tensors into shards of at
most `SHARD_BYTES` (by their specs, nothing read), then reads only one shard's tensors (from the weight store or the
module) and writes them one at a time (`fxpress.tensorfile`). The reader loads shards whole (small programs) or serves
them through a `WeightStore` that reads each tensor when the program asks for it (store-backed load).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from fxpress.errors import ArtifactError
from fxpress.tensorfile import Spec, write_tensors
from fxpress.weights import WeightStore, spec_bytes

SINGLE_FILE = "weights.safetensors"
SHARD_BYTES = 2**30  # at most this many bytes of tensors per shard file (a single larger tensor gets its own)


def shard_name(index: int, count: int) -> str:
    """`weights-00001-of-00003.safetensors` (Hugging Face's naming, so tools recognise the shards), or
    `weights.safetensors` when one shard holds everything (the name unsharded artifacts always had)."""
    return SINGLE_FILE if count == 1 else f"weights-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(sizes: dict[str, int], limit: int = SHARD_BYTES) -> list[list[str]]:
    """Consecutive groups of names whose bytes add up to at most `limit` (one name alone may exceed it)."""
    groups: list[list[str]] = []
    filled = limit
    for name, size in sizes.items():
        if filled + size > limit and (not groups or groups[-1]):
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    return [g for g in groups if g]


def write_shards(directory: Path, specs: dict[str, Spec], read: Callable[[str], torch.Tensor],
                 limit: int = SHARD_BYTES) -> dict[str, str]:
    """Write the tensors named in `specs` (name -> (shape, dtype)), each read by `read` just before it is written
    (one tensor in memory at a time, fxpress.tensorfile); returns name -> shard file."""
    groups = plan_shards({name: spec_bytes(*spec) for name, spec in specs.items()}, limit)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        file = shard_name(i, len(groups))
        write_tensors(directory / file, {name: specs[name] for name in group}, read)
        weight_map.update(dict.fromkeys(group, file))
    return weight_map


def single_file_map(directory: Path, file: str) -> dict[str, str]:
    """The weight map of an artifact written before shards (one `weights.safetensors`): every key in that file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(directory / file), framework="pt") as f:
            return dict.fromkeys(f.keys(), file)
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{directory / file} is missing or corrupt: {err}; save the program again") from err


def _checked_shard(directory: Path, file: str) -> Path:
    path = directory / file
    if Path(file).name != file or not path.is_file():
        raise ArtifactError(f"weight shard '{path}' is missing: the saved program is incomplete; save it again")
    return path


def read_shards(directory: Path, weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every tensor of the weight map, each shard read whole (the in-memory load)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(weight_map.values()):
        path = _checked_shard(directory, file)
        try:
            loaded = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"weight shard '{path}' is corrupt: {err}; save the program again") from err
        tensors.update((k, v) for k, v in loaded.items() if weight_map.get(k) == file)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ArtifactError(f"the saved program's shards lack {len(missing)} tensors, e.g. {missing[0]} "
                            f"(expected in {weight_map[missing[0]]}); save the program again")
    return tensors


def store_from_shards(directory: Path, weight_map: dict[str, str], names: dict[str, str],
                      budget: int | None = None) -> WeightStore:
    """A store serving `names` (graph name -> shard tensor key) from the shards; only headers are read now."""
    from safetensors import SafetensorError

    store = WeightStore(budget)
    for name, key in names.items():
        if key not in weight_map:
            raise ArtifactError(f"the saved program has no tensor '{key}' in its weight map; save the program again")
        path = _checked_shard(directory, weight_map[key])
        try:
            store.add_file(name, os.fspath(path), key)
        except (SafetensorError, OSError, KeyError) as err:
            raise ArtifactError(f"weight shard '{path}' is corrupt or lacks '{key}': {err}; save the program "
                                "again") from err
    return store
