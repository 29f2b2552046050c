"""The weight store: a program's tensors by attribute name, read when needed, rewritten ones in a bounded overlay.

A model larger than memory cannot sit in its GraphModule. A store-backed graph holds placeholders instead
(FakeTensors: shape and dtype, no data), and the store serves the values: from the checkpoint's safetensors
files, read one tensor at a time, or from the overlay where passes put what they rewrite. The overlay keeps
tensors in memory up to a budget and spills the oldest to safetensors files in a temporary folder beyond it.
"""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fxpress.checks import non_finite
from fxpress.errors import ArtifactError, ConfigError, FxpressError
from fxpress.heap import trim_heap_when_grown
from fxpress.spill import SpillFolder
from fxpress.tensorfile import read_tensor

# One mode for every placeholder: torch.export accepts a module whose fake parameters share one mode.
FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)
STORE_KEY = "weight_store"  # where a store-backed GraphModule keeps its store (GraphModule.meta)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | int | float | None, what: str = "max_memory") -> int | None:
    """Bytes from 4GiB, "512MB", "1.5G" or a number of bytes; None stays None (no budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{what} = {value!r}: give a size such as '4GiB', '512MB' or a number of bytes")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{what} = {value!r} is not a size: write e.g. '4GiB', '512MB', '1.5G' or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} = {value!r}: the budget must be more than 0 bytes")
    return size


def format_bytes(size: int) -> str:
    """A size as a person writes it (1.25 GiB), for messages and reports."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def placeholder(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A FakeTensor standing for a stored weight: the graph sees its shape and dtype, memory holds nothing."""
    with FAKE_MODE:
        return torch.empty(tuple(shape), dtype=dtype)


def is_placeholder(value: Any) -> bool:
    return isinstance(value, FakeTensor)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def spec_bytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype, without making one."""
    return torch.Size(shape).numel() * dtype.itemsize


@dataclass(frozen=True)
class FileEntry:
    """Where a stored tensor lies on disk, and the dtype the program reads it in."""

    path: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StackedEntry:
    """A tensor the checkpoint stores in pieces: per-expert matrices stacked along dim 0 (one stack per source
    pattern), then the stacks concatenated along `cat_dim` (gate and up into gate_up), as transformers loads it."""

    groups: tuple[tuple[FileEntry, ...], ...]
    cat_dim: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightStore:
    """Tensors by name: files read on demand (checkpoint shards, spilled tensors) and an in-memory overlay.

    `budget` bounds the bytes the overlay holds in memory (None: unbounded); beyond it the tensors set longest
    ago are written to `spill_dir` (a temporary folder by default) and read back when asked for. Tensors the
    store returns are shared with it: treat them as read-only and write changes back with `set`.
    """

    def __init__(self, budget: int | None = None, spill_dir: str | os.PathLike | None = None) -> None:
        self.budget = budget
        self.spill_dir = str(spill_dir) if spill_dir is not None else None
        self._files: dict[str, FileEntry | StackedEntry] = {}
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pinned: dict[str, torch.dtype] = {}  # the caller's own tensors (an in-memory model): never spilled or
        # counted; read in the dtype given here
        self._spill: SpillFolder | None = None
        self.stats = {"reads": 0, "bytes_read": 0, "spilled_tensors": 0, "spilled_bytes": 0,
                      "peak_memory_bytes": 0}  # the most the overlay held: just after a set, before spilling

    # -- filling -------------------------------------------------------------------------------
    def add_file(self, name: str, path: str | os.PathLike, key: str, dtype: torch.dtype | None = None) -> None:
        """Serve `name` from tensor `key` of the safetensors file at `path`, converted to `dtype` when read."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            sliced = f.get_slice(key)
            shape, stored = tuple(sliced.get_shape()), _safetensors_dtype(sliced.get_dtype())
        self._memory.pop(name, None)
        self._files[name] = FileEntry(str(path), key, dtype or stored, shape)

    def add_stacked(self, name: str, groups: list[list[tuple[str, str]]], cat_dim: int, dtype: torch.dtype) -> None:
        """Serve `name` as cat([stack(group) for group in groups], cat_dim), each group's (path, key) pieces
        read when `name` is asked for (a checkpoint that stores fused experts one expert at a time)."""
        entries = tuple(tuple(FileEntry(str(p), k, dtype, ()) for p, k in group) for group in groups)
        self._memory.pop(name, None)
        shape = self._stacked_shape(entries, cat_dim)
        self._files[name] = StackedEntry(entries, cat_dim, dtype, shape)  # type: ignore[assignment]

    @staticmethod
    def _stacked_shape(groups: tuple[tuple[FileEntry, ...], ...], cat_dim: int) -> tuple[int, ...]:
        from safetensors import safe_open

        shapes = []
        for group in groups:
            with safe_open(group[0].path, framework="pt") as f:
                shapes.append([len(group), *f.get_slice(group[0].key).get_shape()])
        shape = list(shapes[0])
        shape[cat_dim] = sum(s[cat_dim] for s in shapes)
        return tuple(shape)

    def add_tensor(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Serve the caller's tensor (an in-memory model): not copied, not counted, never spilled; read as `dtype`."""
        self._files.pop(name, None)
        self._memory[name] = tensor.detach()
        self._pinned[name] = dtype or tensor.dtype

    # -- reading and writing -------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name`, read from disk if it is not in memory."""
        if name in self._memory:
            self._memory.move_to_end(name)
            tensor = self._memory[name]
            dtype = self._pinned.get(name, tensor.dtype)
            return tensor if tensor.dtype == dtype else tensor.to(dtype)
        entry = self._files.get(name)
        if entry is None:
            raise FxpressError(f"the weight store has no tensor '{name}' (it holds {len(self)} tensors)")
        if isinstance(entry, StackedEntry):
            stacks = [torch.stack([self._read(e, name) for e in group]) for group in entry.groups]
            return stacks[0] if len(stacks) == 1 else torch.cat(stacks, dim=entry.cat_dim)
        return self._read(entry, name)

    def set(self, name: str, tensor: torch.Tensor) -> None:
        """Put a (rewritten) tensor under `name` in the overlay; spill older ones when over the budget."""
        if is_placeholder(tensor) or tensor.is_meta:
            raise FxpressError(f"'{name}': the weight store needs a tensor with data, got a placeholder")
        if tensor.is_floating_point():
            problem = non_finite(tensor)
            if problem is not None:
                raise FxpressError(f"the rewritten weight '{name}' holds {problem} (shape {tuple(tensor.shape)}): "
                                   "the pass that wrote it produced garbage; check its inputs")
        self._files.pop(name, None)
        self._pinned.pop(name, None)
        self._memory.pop(name, None)
        self._memory[name] = tensor.detach().cpu().contiguous()
        self.stats["peak_memory_bytes"] = max(self.stats["peak_memory_bytes"], self.memory_bytes())
        self._evict()
        if self.budget is not None:
            trim_heap_when_grown()  # the weight this replaced, and the pass's temporaries, are not held

    def drop(self, name: str) -> None:
        self._files.pop(name, None)
        self._memory.pop(name, None)
        self._pinned.pop(name, None)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of `name` without reading it."""
        if name in self._memory:
            t = self._memory[name]
            return tuple(t.shape), self._pinned.get(name, t.dtype)
        entry = self._files[name]
        return entry.shape, entry.dtype

    def placeholder(self, name: str) -> torch.Tensor:
        return placeholder(*self.spec(name))

    def in_memory(self, name: str) -> bool:
        """Whether `name` is held in memory (the overlay or the caller's own tensor), not read from a file."""
        return name in self._memory

    def names(self) -> list[str]:
        return list(self._files) + [n for n in self._memory if n not in self._files]

    def __contains__(self, name: object) -> bool:
        return name in self._memory or name in self._files

    def __len__(self) -> int:
        return len(self._files) + len(self._memory)

    def memory_bytes(self) -> int:
        """Bytes of overlay tensors held in memory (the caller's own tensors not counted)."""
        return sum(nbytes(t) for n, t in self._memory.items() if n not in self._pinned)

    def total_bytes(self) -> int:
        """Bytes of every stored tensor in the dtype the program reads it in."""
        return sum(spec_bytes(*self.spec(name)) for name in self.names())

    # -- copies ------------------------------------------------------------------------------------
    def clone(self) -> WeightStore:
        """A store that starts with the same tensors; files and spilled tensors are shared, not copied."""
        other = WeightStore(self.budget, self.spill_dir)
        other._files = dict(self._files)
        other._memory = OrderedDict(self._memory)
        other._pinned = dict(self._pinned)
        other._spill = self._spill  # the folder lives while either store references it
        return other

    def __deepcopy__(self, memo: dict) -> WeightStore:
        return self.clone()

    # -- internals ---------------------------------------------------------------------------------
    def _read(self, entry: FileEntry, name: str) -> torch.Tensor:
        try:
            tensor = read_tensor(entry.path, entry.key)  # 64-byte aligned, as the in-memory program's tensors are
        except (OSError, KeyError, ValueError, struct.error) as err:
            raise ArtifactError(f"could not read weight '{name}' from {entry.path}: {err!r}; the file is missing or "
                                "corrupt: restore it, or load the model again") from err
        self.stats["reads"] += 1
        self.stats["bytes_read"] += nbytes(tensor)
        return tensor.to(entry.dtype) if tensor.dtype != entry.dtype else tensor

    def _evict(self) -> None:
        """Write the overlay's oldest tensors to one spill file until what stays fits the budget."""
        if self.budget is None:
            return
        excess = self.memory_bytes() - self.budget
        if excess <= 0:
            return
        chosen: dict[str, torch.Tensor] = {}
        for name, tensor in self._memory.items():
            if excess <= 0:
                break
            if name in self._pinned:
                continue
            chosen[name] = tensor
            excess -= nbytes(tensor)
        self._write_spill(chosen)

    def _write_spill(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        if self._spill is None:
            self._spill = SpillFolder(self.spill_dir)
        try:
            path, refs = self._spill.write(tensors)
        except OSError as err:
            raise FxpressError(f"could not spill weights under {self._spill.folder}: {err}; free disk space there or "
                               "pass a larger max_memory (or spill_dir= elsewhere)") from err
        for name, tensor in tensors.items():
            self._files[name] = FileEntry(path, refs[name].key, tensor.dtype, tuple(tensor.shape))
            del self._memory[name]
            self.stats["spilled_tensors"] += 1
            self.stats["spilled_bytes"] += nbytes(tensor)


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise ArtifactError(f"safetensors dtype {name} is not one fxpress reads (use F32, F16, BF16 or an int type)")
    return table[name]


# -- the store of a GraphModule ------------------------------------------------------------------------
def weight_store(gm: torch.nn.Module) -> WeightStore | None:
    """The store behind a store-backed GraphModule, or None for a module that holds its own weights."""
    meta = getattr(gm, "meta", None)
    return meta.get(STORE_KEY) if isinstance(meta, dict) else None


def attach_store(gm: torch.fx.GraphModule, store: WeightStore) -> None:
    gm.meta[STORE_KEY] = store


def require_store(gm: torch.nn.Module, target: str) -> WeightStore:
    store = weight_store(gm)
    if store is None:
        raise FxpressError(f"'{target}' is a placeholder but the module has no weight store: the program was "
                           "copied without its weights; clone Programs with Program.clone()")
    return store
