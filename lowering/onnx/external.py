"""Initializers of a store-backed program, streamed: read from the weight store and written to external data one
tensor at a time, so an ONNX export never holds the whole model.

torch.onnx turns the program's placeholders (FakeTensors) into initializers without data. `lazy_store_initializers`
makes each one an `onnx_ir.LazyTensor` that reads the store when asked (uncached); `ExternalData` appends each
initializer's bytes to one `.data` file as soon as it is made (the materialized MatMulNBits weights, then the
remaining store tensors) and swaps in an `onnx_ir.ExternalTensor` pointing at them, recording its SHA-256 as written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fxpress.errors import LoweringError
from fxpress.weights import WeightStore, is_placeholder

INLINE_BYTES = 1024  # initializers smaller than this stay in the model file (shapes, slice bounds, scalars)
FOLD_ELEMENTS = 8192  # a store tensor larger than this is not constant-folded (onnxscript's default input limit)
ALIGNMENT = 64  # byte alignment of each tensor in the data file (ONNX Runtime may memory-map it)


def _store_reader(store: WeightStore, name: str) -> Any:
    import onnx_ir as ir

    def read() -> Any:
        return ir.tensor(store.get(name).numpy(), name=name)

    return read


def lazy_store_initializers(model: Any, store: WeightStore | None) -> int:
    """Point every data-less initializer (a placeholder) at the store, read when its value is needed; returns how many."""
    import onnx_ir as ir

    count = 0
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if not is_placeholder(raw):
            continue
        if store is None or name not in store:
            raise LoweringError(f"initializer '{name}' is a placeholder the program's weight store does not hold: the "
                                "program was copied without its weights; clone Programs with Program.clone()")
        tensor = value.const_value
        value.const_value = ir.LazyTensor(_store_reader(store, name), tensor.dtype, tensor.shape, name=name)
        count += 1
    return count


def _no_large_store_reads(node: Any) -> bool | None:
    """Constant folding may not compute from a large store tensor: what it makes (a transposed fp32 weight) would stay
    in memory until the model is written, for every such weight at once. ONNX Runtime folds them when it loads."""
    import onnx_ir as ir

    for value in node.inputs:
        tensor = value.const_value if value is not None else None
        if isinstance(tensor, ir.LazyTensor) and tensor.size > FOLD_ELEMENTS:
            return False
    return None  # onnxscript's own rules decide


def optimize_streamed(model: Any) -> None:
    """torch.onnx's optimization (onnxscript's optimizer, then its ONNX fusions) without folding large store tensors."""
    from fxpress.lowering.onnx.translate import optimize

    optimize(model, should_fold=_no_large_store_reads)


_NUMPY_LAYOUT = frozenset({"FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT16", "UINT16", "INT32",
                           "UINT32", "INT64", "UINT64", "BOOL"})  # dtypes whose bytes are their numpy array's bytes


def _raw_bytes(tensor: Any) -> Any:
    """The bytes of an onnx_ir tensor: a view of its numpy array where that is its layout (no copy of a vocabulary
    table), else `tobytes()` (packed 4-bit types)."""
    import numpy as np

    if tensor.dtype.name in _NUMPY_LAYOUT:
        return memoryview(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
    return tensor.tobytes()


class ExternalData:
    """One external data file, filled tensor by tensor; `digests` holds the SHA-256 of each tensor written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close(), after the last tensor)
        self.digests: dict[str, str] = {}
        self.stats = {"tensors": 0, "bytes": 0, "largest": 0}

    def put(self, tensor: Any) -> Any:
        """Write `tensor` (an onnx_ir tensor) now and return its ExternalTensor; small ones are returned unchanged."""
        import onnx_ir as ir

        if tensor.nbytes < INLINE_BYTES:
            return tensor
        data = _raw_bytes(tensor)
        offset = -(-self.file.tell() // ALIGNMENT) * ALIGNMENT
        self.file.seek(offset)
        self.file.write(data)
        self.file.flush()
        self.digests[tensor.name] = hashlib.sha256(data).hexdigest()
        self.stats["tensors"] += 1
        self.stats["bytes"] += len(data)
        self.stats["largest"] = max(self.stats["largest"], len(data))
        return ir.ExternalTensor(self.path.name, offset, len(data), tensor.dtype, shape=tensor.shape,
                                 name=tensor.name, base_dir=self.path.parent)

    def put_initializers(self, graph: Any) -> None:
        """Write every initializer not yet external (the store's tensors, read one at a time)."""
        import onnx_ir as ir

        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            if tensor.name != name:  # the data file and the digests are keyed by the initializer's name
                tensor.name = name
            value.const_value = self.put(tensor)

    def close(self) -> None:
        self.file.close()
