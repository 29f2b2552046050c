"""Tensors parked on disk and read back bit-identical: safetensors files (never pickle) in a temporary folder.

The execution engine (`fxpress.execute`) spills calibration activations here when they exceed its budget.
A value read back has its dtype, shape and (contiguous) strides, and on the CPU also its address modulo 64:
CPU kernels (oneDNN, MKL) take different paths on differently aligned data and round differently, so the
same alignment keeps results identical to a run that never spilled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ALIGN = 64  # bytes: PyTorch's CPU allocator aligns to it


@dataclass(frozen=True)
class Spilled:
    """A tensor on disk: the file, its key there, the device it goes back to and its address modulo 64."""

    path: str
    key: str
    device: torch.device
    align: int


def spillable(value: object) -> bool:
    """Plain contiguous non-empty tensors: read back contiguous, they keep their strides."""
    return type(value) is torch.Tensor and value.is_contiguous() and value.numel() > 0


def _realigned(tensor: torch.Tensor, align: int) -> torch.Tensor:
    """A copy of `tensor` at an address that is `align` modulo 64."""
    nbytes = tensor.numel() * tensor.element_size()
    buffer = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    start = (align - buffer.data_ptr()) % ALIGN
    return buffer[start:start + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)


class SpillFolder:
    """One temporary folder (made on the first write, under `parent`); each `write` is one file."""

    def __init__(self, parent: str | os.PathLike | None = None):
        self.parent = parent
        self.folder: str | None = None
        self.files = 0  # files written so far
        self.bytes = 0  # bytes written so far

    def write(self, values: dict[int, torch.Tensor]) -> tuple[str, dict[int, Spilled]]:
        """Write spillable tensors into one new file: its path and a reference per key."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="fxpress-spill-", dir=self.parent)
        path = os.path.join(self.folder, f"{self.files}.safetensors")
        save_file({str(i): t.detach().cpu() for i, t in values.items()}, path)
        self.files += 1
        self.bytes += sum(t.numel() * t.element_size() for t in values.values())
        return path, {i: Spilled(path, str(i), t.device, t.data_ptr() % ALIGN) for i, t in values.items()}

    @staticmethod
    def load(ref: Spilled) -> torch.Tensor:
        """The tensor behind `ref`, on its device (on the CPU at its original alignment)."""
        with safe_open(ref.path, framework="pt") as f:
            tensor = f.get_tensor(ref.key)
        return tensor.to(ref.device) if ref.device.type != "cpu" else _realigned(tensor, ref.align)

    @staticmethod
    def remove(path: str) -> None:
        os.remove(path)

    def close(self) -> None:
        """Delete the folder and every file left in it."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
