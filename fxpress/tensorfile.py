"""Safetensors files read and written without a second copy of any tensor.

safetensors' own `save_file` turns every tensor into a bytes object before writing, and `get_tensor` hands back a
buffer at an arbitrary address (which then needs an aligned copy: CPU kernels round differently on differently
aligned data). For a vocabulary table either doubles the peak memory of a budgeted compile. Here a file is
written tensor by tensor from each tensor's own memory, each tensor read by a callback just before it is written
(so a shard never sits in memory whole), and a tensor is read straight into a new buffer at a chosen address
modulo 64. The files are ordinary safetensors files (header, then the tensors back to back).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch

ALIGN = 64  # bytes: PyTorch's CPU allocator aligns to it
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
           torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


Spec = tuple[Sequence[int], torch.dtype]


def write_tensors(path: str | os.PathLike, specs: dict[str, Spec], read: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file of the tensors in `specs` (key -> (shape, dtype)), each got from `read(key)` just before
    it is written and written from its own memory: one tensor in memory at a time, never a bytes copy of it."""
    header: dict[str, Any] = {}
    offset = 0
    for key, (shape, dtype) in specs.items():
        if dtype not in _DTYPES:
            raise TypeError(f"tensor '{key}' has dtype {dtype}, which safetensors files cannot hold")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # the data section starts aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (shape, dtype) in specs.items():
            tensor = read(key).detach()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"tensor '{key}' is {tuple(tensor.shape)} {tensor.dtype}, not the {tuple(shape)} "
                                 f"{dtype} its header says")
            if tensor.numel():
                f.write(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor


def read_header(f: Any) -> tuple[int, dict[str, Any]]:
    """(where the data section starts, the header's entries) of an open safetensors file."""
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def read_tensor(path: str | os.PathLike, key: str, align: int = 0) -> torch.Tensor:
    """Tensor `key` of a safetensors file, read into a new buffer whose address is `align` modulo 64."""
    with open(path, "rb") as f:
        start, header = read_header(f)
        entry = header[key]
        dtype = _BY_NAME.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor '{key}' has safetensors dtype {entry['dtype']}, which fxpress does not read")
        first, last = entry["data_offsets"]
        buffer = torch.empty(last - first + ALIGN, dtype=torch.uint8)
        skip = (align - buffer.data_ptr()) % ALIGN
        data = buffer[skip:skip + last - first]
        f.seek(start + first)
        if f.readinto(memoryview(data.numpy())) != last - first:
            raise ValueError(f"tensor '{key}' ends past the end of the file: the file is truncated")
    return data.view(dtype).view(entry["shape"])
