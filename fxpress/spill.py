"""Tensors parked on disk and read back bit-identical: safetensors files (never pickle) in a temporary folder.

The weight store spills rewritten weights here beyond its budget, and the execution engine (`fxpress.execute`)
calibration activations beyond its own (both through `fxpress.tensorfile`, which makes no second copy). A value
read back has its dtype, shape and (contiguous) strides, and on the CPU also its address modulo 64: CPU kernels
(oneDNN, MKL) take different paths on differently aligned data and round differently, so the same alignment
keeps results identical to a run that never spilled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from fxpress.tensorfile import ALIGN, read_tensor, write_tensors


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


class SpillFolder:
    """One temporary folder (made on the first write, under `parent`; removed by `close` or when the folder
    object is gone, whichever comes first); each `write` is one file."""

    def __init__(self, parent: str | os.PathLike | None = None):
        self.parent = parent
        self.folder: str | None = None
        self.files = 0  # files written so far
        self.bytes = 0  # bytes written so far
        self._finalizer: weakref.finalize | None = None

    def write(self, values: dict[Any, torch.Tensor]) -> tuple[str, dict[Any, Spilled]]:
        """Write spillable tensors into one new file: its path and a reference per key."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="fxpress-spill-", dir=self.parent)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        path = os.path.join(self.folder, f"{self.files}.safetensors")
        named = {str(k): t for k, t in values.items()}
        write_tensors(path, {k: (t.shape, t.dtype) for k, t in named.items()}, named.__getitem__)
        self.files += 1
        self.bytes += sum(t.numel() * t.element_size() for t in values.values())
        return path, {k: Spilled(path, str(k), t.device, t.data_ptr() % ALIGN) for k, t in values.items()}

    @staticmethod
    def load(ref: Spilled) -> torch.Tensor:
        """The tensor behind `ref`, on its device (on the CPU at its original alignment)."""
        tensor = read_tensor(ref.path, ref.key, ref.align if ref.device.type == "cpu" else 0)
        return tensor.to(ref.device) if ref.device.type != "cpu" else tensor

    @staticmethod
    def remove(path: str) -> None:
        os.remove(path)

    def close(self) -> None:
        """Delete the folder and every file left in it."""
        if self._finalizer is not None:
            self._finalizer()
        self.folder, self._finalizer = None, None
