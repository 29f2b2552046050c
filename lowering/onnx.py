"""ONNX lowering: torch.onnx (dynamo) with a translation per `fxpress` op, then real low-bit kernels.

export → translate → materialize → save:
- the program is re-exported (dynamic batch / seq / past) and translated by `torch.onnx.export(dynamo=True)`;
  each `fxpress::*` op becomes a placeholder node in the `fxpress` ONNX domain (translations below);
- `materialize` turns placeholders into what runtimes execute, now that weight values are known:
  packed linears become `com.microsoft::MatMulNBits` (ONNX Runtime's int2/4/8 kernels) or standard blocked
  `DequantizeLinear` + `MatMul` (opset 21+); the Hadamard, activation quantization and threshold
  neurons become ONNX functions in the `fxpress` domain built from standard ops, so any runtime runs them;
- the model is checked (`onnx.checker`), written to a temporary file (weights > 2 GB to external data)
  and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxpress.errors import ConfigError, LoweringError
from fxpress.lowering.export import reexport
from fxpress.program import Program
from fxpress.runtime.ops import OPS, register_lowering
from fxpress.signature import Signature

DOMAIN = "fxpress"
MS_DOMAIN = "com.microsoft"
WEIGHT_FORMATS = ("matmulnbits", "dequantizelinear")
METADATA_KEY = "fxpress.info"
ARTIFACT_VERSION = 1
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with margin for the graph itself
MATMULNBITS_BITS = (2, 4, 8)  # bit widths ONNX Runtime's MatMulNBits runs on CPU

# placeholder ops: name -> (number of inputs, attributes); inputs may be optional or variadic
_PLACEHOLDERS: dict[str, tuple[int, dict[str, str]]] = {
    "LinearNBits": (5, {"bits": "INT", "block_size": "INT", "in_features": "INT"}),
    "EmbeddingNBits": (4, {"bits": "INT", "block_size": "INT", "embedding_dim": "INT"}),
    "GroupedLinearNBits": (-1, {"bits": "INTS", "block_size": "INT", "in_features": "INT", "num_experts": "INT"}),
    "Hadamard": (2, {}),
    "QuantizeAct": (1, {"bits": "INT", "clip_ratio": "FLOAT", "symmetric": "INT"}),
    "ThresholdLinear": (3, {"relu": "INT"}),
}


def _register_placeholder_schemas() -> None:
    """Let onnxscript build `fxpress::*` placeholder nodes (it looks ops up by schema)."""
    import onnx
    from onnx.defs import OpSchema

    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(uint8)",
             "tensor(int8)", "tensor(int32)", "tensor(int64)"]
    for name, (n_in, attrs) in _PLACEHOLDERS.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        if n_in < 0:
            inputs = [OpSchema.FormalParameter("inputs", "T", param_option=OpSchema.FormalParameterOption.Variadic,
                                               is_homogeneous=False)]
        else:
            inputs = [OpSchema.FormalParameter(f"input_{i}", "T", param_option=OpSchema.FormalParameterOption.Optional)
                      for i in range(n_in)]
        schema = OpSchema(
            name, DOMAIN, 1,
            inputs=inputs,
            outputs=[OpSchema.FormalParameter("output", "T")],
            type_constraints=[("T", types, "any tensor")],
            attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, t), "", required=False) for a, t in attrs.items()],
        )
        onnx.defs.register_schema(schema)


def _fx_opset():
    import onnxscript

    _register_placeholder_schemas()
    return onnxscript.values.Opset(DOMAIN, 1)


def _like(out: Any, x: Any, last: int | None = None) -> Any:
    """Give a placeholder's output the dtype and shape of `x` (optionally a new last dim)."""
    import onnx_ir as ir

    out.dtype = x.dtype
    if x.shape is not None:
        dims = list(x.shape)
        if last is not None:
            dims[-1] = last
        out.shape = ir.Shape(dims)
    return out


# --------------------------------------------------------------------------------------------------
# translations: one per fxpress op (registered in the op table)
# --------------------------------------------------------------------------------------------------
def _translate_linear_nbit(x, qweight, scales, zero_points=None, bias=None, bits=4, block_size=32, in_features=0):
    out = _fx_opset().LinearNBits(x, qweight, scales, zero_points, bias, bits=bits, block_size=block_size,
                                  in_features=in_features)
    return _like(out, x, qweight.shape[0] if qweight.shape is not None else None)


def _translate_embedding_nbit(ids, qweight, scales, zero_points=None, bits=4, block_size=32, embedding_dim=0):
    import onnx_ir as ir

    out = _fx_opset().EmbeddingNBits(ids, qweight, scales, zero_points, bits=bits, block_size=block_size,
                                     embedding_dim=embedding_dim)
    out.dtype = scales.dtype
    if ids.shape is not None:
        out.shape = ir.Shape([*ids.shape, embedding_dim])
    return out


def _translate_grouped_linear_nbit(x, offsets, qweights, scales, zero_points, bits, block_size, in_features):
    qweights, zero_points = list(qweights), list(zero_points)
    out = _fx_opset().GroupedLinearNBits(x, offsets, scales, *qweights, *zero_points, bits=list(bits),
                                         block_size=block_size, in_features=in_features, num_experts=len(qweights))
    return _like(out, x, scales.shape[1] if scales.shape is not None else None)


def _translate_hadamard(x, base):
    return _like(_fx_opset().Hadamard(x, base), x)


def _translate_quantize_act(x, bits=8, clip_ratio=1.0, symmetric=True):
    return _like(_fx_opset().QuantizeAct(x, bits=bits, clip_ratio=float(clip_ratio), symmetric=int(bool(symmetric))), x)


def _translate_threshold_linear(x, conn, threshold, relu=False):
    out = _fx_opset().ThresholdLinear(x, conn, threshold, relu=int(bool(relu)))
    return _like(out, x, conn.shape[0] if conn.shape is not None else None)


_TRANSLATIONS: dict[str, Callable] = {
    "linear_nbit": _translate_linear_nbit,
    "embedding_nbit": _translate_embedding_nbit,
    "grouped_linear_nbit": _translate_grouped_linear_nbit,
    "hadamard": _translate_hadamard,
    "quantize_act": _translate_quantize_act,
    "threshold_linear": _translate_threshold_linear,
}


def register_translations() -> None:
    """Register this module's translation for every fxpress op that exists now (idempotent)."""
    import fxpress.runtime  # noqa: F401  (defines the ops)

    for name, fn in _TRANSLATIONS.items():
        if name in OPS and "onnx" not in OPS[name].lowerings:
            register_lowering(name, "onnx")(fn)


def translation_table() -> dict[Any, Callable]:
    register_translations()
    missing = [spec.qualname for spec in OPS.values() if "onnx" not in spec.lowerings]
    if missing:
        raise LoweringError(f"no ONNX translation for {', '.join(missing)}: add one with register_lowering(op, 'onnx')")
    return {spec.overload: spec.lowerings["onnx"] for spec in OPS.values()}


# --------------------------------------------------------------------------------------------------
# materialize: placeholders -> MatMulNBits / DequantizeLinear / fxpress functions
# --------------------------------------------------------------------------------------------------
class _Materializer:
    """Rewrites one ir.Model's fxpress placeholder nodes; needs initializer values (known after export)."""

    def __init__(self, model: Any, weights: str, opset: int, accuracy_level: int = 0):
        import onnx_ir as ir

        self.ir = ir
        self.model = model
        self.graph = model.graph
        self.weights = weights
        self.opset = opset
        self.accuracy_level = accuracy_level
        self.counter = 0
        self.functions: dict[str, Any] = {}
        self.shared: dict[str, dict[Any, tuple]] = {}  # packed tensor name -> layout -> initializers (tied tables)
        self.stats = {"matmulnbits": 0, "dequantizelinear": 0, "gatherblockquantized": 0, "exact_float64": 0, "functions": 0,
                      "warnings": []}

    # -- helpers ---------------------------------------------------------------------------------
    def const(self, value: Any) -> np.ndarray:
        if value is None:
            return None
        if value.const_value is None:
            raise LoweringError(f"'{value.name}' must be a constant weight for the ONNX lowering, but it is computed")
        return value.const_value.numpy()

    def initializer(self, name: str, array: np.ndarray, dtype: Any = None) -> Any:
        ir = self.ir
        self.counter += 1
        name = f"{name}__{self.counter}"
        tensor = ir.tensor(array, dtype=dtype, name=name)
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        self.graph.register_initializer(value)
        return value

    def node(self, before: Any, domain: str, op_type: str, inputs: list, attrs: dict | None = None) -> Any:
        ir = self.ir
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in (attrs or {}).items()]
        self.counter += 1
        new = ir.Node(domain, op_type, inputs, attributes, num_outputs=1, name=f"{op_type}_{self.counter}")
        self.graph.insert_before(before, new)
        return new.outputs[0]

    def replace(self, node: Any, out: Any) -> None:
        old = node.outputs[0]
        name = old.name
        old.name = f"{name}__placeholder"
        out.name = name
        out.shape = old.shape
        out.dtype = old.dtype if old.dtype is not None else node.inputs[0].dtype
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)

    # -- packed linears ----------------------------------------------------------------------------
    def packed_matmul(self, node: Any, x: Any, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                      bits: int, block: int, in_features: int, tag: str) -> Any:
        """x @ dequant(W).T in the chosen format; returns the output value (no bias)."""
        if scales.dtype == np.float64:  # Precision(float64): no int kernel or DequantizeLinear takes double
            return self.exact_matmul(node, x, qweight, scales, zeros, bits, block, in_features, tag)
        sub = _matmulnbits_block(block)
        if self.weights == "matmulnbits" and bits in MATMULNBITS_BITS and sub is not None:
            return self.matmulnbits(node, x, qweight, scales, zeros, bits, block, sub, in_features, tag)
        if self.weights == "matmulnbits":
            self.stats["warnings"].append(
                f"{tag}: {bits}-bit weights in blocks of {block} have no MatMulNBits kernel (needs bits in "
                f"{MATMULNBITS_BITS} and a power-of-two block >= 16 dividing the block): used DequantizeLinear"
            )
        return self.dequantize_matmul(node, x, qweight, scales, zeros, bits, block, in_features, tag)

    def matmulnbits(self, node, x, qweight, scales, zeros, bits, block, sub, in_features, tag) -> Any:
        cached = self.shared.get(tag, {})
        key = next((k for k in cached if k[0] == "nbits"), ("nbits", sub))  # a tied table's layout, if made
        if key not in cached:
            cached[key] = self.nbits_initializers(qweight, scales, zeros, bits, block, key[1], in_features, tag)
            self.shared[tag] = cached
        inputs = [x, *(v for v in cached[key] if v is not None)]
        self.stats["matmulnbits"] += 1
        attrs = {"K": in_features, "N": qweight.shape[0], "bits": bits, "block_size": key[1],
                 "accuracy_level": self.accuracy_level}
        return self.node(node, MS_DOMAIN, "MatMulNBits", inputs, attrs)

    def nbits_initializers(self, qweight, scales, zeros, bits, block, sub, in_features, tag) -> tuple:
        """MatMulNBits' B (N, k_blocks, blob), scales and packed zero points (or None), re-blocked to `sub`."""
        from fxpress.runtime.quant import pack_codes, unpack_codes

        n, k_blocks, _ = qweight.shape
        codes = _unpack(qweight, bits, block)  # (N, k_blocks, block)
        zero_codes = None if zeros is None else unpack_codes(torch.from_numpy(zeros), bits, k_blocks).numpy()
        if sub != block:  # re-block: each block splits into block/sub sub-blocks with the same scale and zero
            rep = block // sub
            codes = codes.reshape(n, k_blocks * rep, sub)
            scales = np.repeat(scales, rep, axis=1)
            zero_codes = None if zero_codes is None else np.repeat(zero_codes, rep, axis=1)
            k_blocks *= rep
        used = -(-in_features // sub)  # drop sub-blocks that hold only padding
        codes, scales = codes[:, :used], scales[:, :used]
        zero_codes = None if zero_codes is None else zero_codes[:, :used]
        packed = pack_codes(torch.from_numpy(codes), bits).numpy()
        zero_value = None
        if zero_codes is not None:
            zero_value = self.initializer(f"{tag}.zero_points", pack_codes(torch.from_numpy(zero_codes), bits).numpy())
        return self.initializer(f"{tag}.qweight", packed), self.initializer(f"{tag}.scales", scales), zero_value

    def dequantize_matmul(self, node, x, qweight, scales, zeros, bits, block, in_features, tag) -> Any:
        """Standard ONNX: blocked DequantizeLinear of W.T (codes as UINT4/UINT2/UINT8), Slice to K rows, MatMul."""
        w, s, z = self.transposed_initializers(qweight, scales, zeros, bits, block, tag)
        weight = self.node(node, "", "DequantizeLinear", [w, s, z], {"axis": 0, "block_size": block})
        if qweight.shape[1] * block != in_features:
            starts = self.initializer(f"{tag}.starts", np.array([0], dtype=np.int64))
            ends = self.initializer(f"{tag}.ends", np.array([in_features], dtype=np.int64))
            weight = self.node(node, "", "Slice", [weight, starts, ends])
        self.stats["dequantizelinear"] += 1
        return self.node(node, "", "MatMul", [x, weight])

    def transposed_initializers(self, qweight, scales, zeros, bits, block, tag) -> tuple:
        """Codes.T (K_padded, N) as UINT2/UINT4/UINT8, scales.T and zero codes.T (k_blocks, N); made once per
        packed tensor, so a tied embedding (a Gather on axis 1) and LM head share them."""
        import ml_dtypes

        from fxpress.runtime.quant import unpack_codes

        cached = self.shared.setdefault(tag, {})
        if "transposed" in cached:
            return cached["transposed"]
        ir = self.ir
        n, k_blocks, _ = qweight.shape
        codes = _unpack(qweight, bits, block).reshape(n, k_blocks * block)
        if zeros is None:
            zero_codes = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.int64)
        else:
            zero_codes = unpack_codes(torch.from_numpy(zeros), bits, k_blocks).numpy()
        if bits <= 2 and self.opset >= 25:
            np_type, ir_type = ml_dtypes.uint2, ir.DataType.UINT2
        elif bits <= 4:
            np_type, ir_type = ml_dtypes.uint4, ir.DataType.UINT4
        else:
            np_type, ir_type = np.uint8, ir.DataType.UINT8
        w = self.initializer(f"{tag}.qweight_t", np.ascontiguousarray(codes.T).astype(np_type), ir_type)
        z = self.initializer(f"{tag}.zero_points_t", np.ascontiguousarray(zero_codes.T).astype(np_type), ir_type)
        s = self.initializer(f"{tag}.scales_t", np.ascontiguousarray(scales.T))
        cached["transposed"] = (w, s, z)
        return w, s, z

    # -- float64 (Precision pass): exact dequantization ------------------------------------------------
    def exact_rows(self, node, qweight, scales, zeros, bits, block, tag) -> Any:
        """(code - zero) * scale as float64 rows (N, k_blocks, block), exact: made once per packed tensor (a tied
        table's gather and LM head share it); ONNX Runtime folds it into a dense float64 weight at load."""
        cached = self.shared.setdefault(tag, {})
        if "exact" in cached:
            return cached["exact"]
        import ml_dtypes

        from fxpress.runtime.quant import unpack_codes

        ir = self.ir
        n, k_blocks, _ = qweight.shape
        codes = _unpack(qweight, bits, block)  # (N, k_blocks, block)
        if zeros is None:
            zero_codes = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.int64)
        else:
            zero_codes = unpack_codes(torch.from_numpy(zeros), bits, k_blocks).numpy()
        np_type, ir_type = (ml_dtypes.uint4, ir.DataType.UINT4) if bits <= 4 else (np.uint8, ir.DataType.UINT8)
        double = ir.DataType.DOUBLE
        w = self.initializer(f"{tag}.codes", np.ascontiguousarray(codes).astype(np_type), ir_type)
        z = self.initializer(f"{tag}.zero_codes", zero_codes.reshape(n, k_blocks, 1).astype(np_type), ir_type)
        w, z = (self.node(node, "", "Cast", [t], {"to": double}) for t in (w, z))
        narrow = scales.astype(np.float32)
        if np.array_equal(narrow.astype(np.float64), scales):  # float32 values (as Quantize makes them): half the bytes
            s = self.node(node, "", "Cast", [self.initializer(f"{tag}.scales", narrow.reshape(n, k_blocks, 1))],
                          {"to": double})
        else:
            s = self.initializer(f"{tag}.scales", scales.reshape(n, k_blocks, 1))
        rows = self.node(node, "", "Mul", [self.node(node, "", "Sub", [w, z]), s])
        cached["exact"] = rows
        return rows

    def exact_dense(self, node, qweight, scales, zeros, bits, block, columns, tag) -> Any:
        """The exact float64 [N, columns] matrix: dequantized rows, reshaped, the last block's padding sliced off."""
        rows = self.exact_rows(node, qweight, scales, zeros, bits, block, tag)
        n, k_blocks, _ = qweight.shape
        shape = self.initializer(f"{tag}.dense_shape", np.array([n, k_blocks * block], dtype=np.int64))
        dense = self.node(node, "", "Reshape", [rows, shape])
        if k_blocks * block != columns:
            starts = self.initializer(f"{tag}.starts", np.array([0], dtype=np.int64))
            ends = self.initializer(f"{tag}.ends", np.array([columns], dtype=np.int64))
            axes = self.initializer(f"{tag}.axes", np.array([1], dtype=np.int64))
            dense = self.node(node, "", "Slice", [dense, starts, ends, axes])
        self.stats["exact_float64"] += 1
        return dense

    def exact_matmul(self, node, x, qweight, scales, zeros, bits, block, in_features, tag) -> Any:
        """float64 x @ W.T with W = (code - zero) * scale computed exactly in float64, then sliced to K columns."""
        weight = self.exact_dense(node, qweight, scales, zeros, bits, block, in_features, tag)
        return self.node(node, "", "MatMul", [x, self.node(node, "", "Transpose", [weight], {"perm": [1, 0]})])

    def exact_gather(self, node, ids, qweight, scales, zeros, bits, block, dim, tag) -> Any:
        """float64 embedding rows: Gather the exact dequantized rows, then drop the last block's padding."""
        table = self.exact_dense(node, qweight, scales, zeros, bits, block, dim, tag)
        return self.node(node, "", "Gather", [table, ids], {"axis": 0})

    # -- packed embeddings ---------------------------------------------------------------------------
    def embedding_nbits(self, node: Any) -> None:
        """GatherBlockQuantized over MatMulNBits' bytes (weights="matmulnbits"), else Gather + DequantizeLinear."""
        ins = list(node.inputs) + [None] * (4 - len(node.inputs))
        ids, qweight, scales, zeros = ins[:4]
        a = node.attributes
        bits, block, dim = a["bits"].value, a["block_size"].value, a["embedding_dim"].value
        q, s, z = self.const(qweight), self.const(scales), self.const(zeros)
        sub = _matmulnbits_block(math.gcd(block, dim))  # the gathered row has exactly `dim` codes: no padding
        if s.dtype == np.float64:  # Precision(float64): GatherBlockQuantized and DequantizeLinear are float-only
            out = self.exact_gather(node, ids, q, s, z, bits, block, dim, qweight.name)
        elif self.weights == "matmulnbits" and bits in MATMULNBITS_BITS and sub is not None:
            out = self.gather_block_quantized(node, ids, q, s, z, bits, block, sub, dim, qweight.name)
        else:
            if self.weights == "matmulnbits":
                self.stats["warnings"].append(
                    f"{qweight.name}: a {bits}-bit table in blocks of {block} over {dim} columns has no "
                    "GatherBlockQuantized kernel (needs bits in (2, 4, 8) and a power-of-two block >= 16 dividing "
                    "the block and the row): used Gather + DequantizeLinear")
            out = self.dequantize_gather(node, ids, q, s, z, bits, block, dim, qweight.name)
        self.replace(node, out)

    def gather_block_quantized(self, node, ids, qweight, scales, zeros, bits, block, sub, dim, tag) -> Any:
        """One B for the tied LM head's MatMulNBits and this gather: the gather reads it as (V, dim*bits/8)."""
        cached = self.shared.setdefault(tag, {})
        key = ("nbits", sub)
        if key not in cached:
            cached[key] = self.nbits_initializers(qweight, scales, zeros, bits, block, sub, dim, tag)
        packed, s, z = cached[key]
        rows = self.initializer(f"{tag}.rows", np.array([qweight.shape[0], -1], dtype=np.int64))
        data = self.node(node, "", "Reshape", [packed, rows])
        self.stats["gatherblockquantized"] += 1
        attrs = {"bits": bits, "block_size": sub, "gather_axis": 0, "quantize_axis": 1}
        return self.node(node, MS_DOMAIN, "GatherBlockQuantized", [data, ids, s, *([z] if z is not None else [])],
                         attrs)

    def dequantize_gather(self, node, ids, qweight, scales, zeros, bits, block, dim, tag) -> Any:
        """Standard ONNX on the LM head's transposed codes (shared when tied): Gather columns of codes.T (as uint8),
        scales.T and zeros.T, blocked DequantizeLinear along K, move K last, Slice off the padding."""
        w, s, z = self.transposed_initializers(qweight, scales, zeros, bits, block, tag)
        if bits < 8:  # Gather takes no 4-/2-bit tensors: widen first (constant-folded once by the runtime)
            w, z = (self.node(node, "", "Cast", [t], {"to": self.ir.DataType.UINT8}) for t in (w, z))
        picked = [self.node(node, "", "Gather", [t, ids], {"axis": 1}) for t in (w, s, z)]
        rows = self.node(node, "", "DequantizeLinear", picked, {"axis": 0, "block_size": block})
        rank = len(ids.shape) if ids.shape is not None else 2
        out = self.node(node, "", "Transpose", [rows], {"perm": [*range(1, rank + 1), 0]})
        if qweight.shape[1] * block != dim:
            starts = self.initializer(f"{tag}.starts", np.array([0], dtype=np.int64))
            ends = self.initializer(f"{tag}.ends", np.array([dim], dtype=np.int64))
            axes = self.initializer(f"{tag}.axes", np.array([-1], dtype=np.int64))
            out = self.node(node, "", "Slice", [out, starts, ends, axes])
        self.stats["dequantizelinear"] += 1
        return out

    def linear_nbits(self, node: Any) -> None:
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        x, qweight, scales, zeros, bias = ins[:5]
        a = node.attributes
        bits, block, k = a["bits"].value, a["block_size"].value, a["in_features"].value
        out = self.packed_matmul(node, x, self.const(qweight), self.const(scales), self.const(zeros), bits, block, k,
                                 qweight.name)
        if bias is not None:
            out = self.node(node, "", "Add", [out, bias])
        self.replace(node, out)

    def grouped_linear_nbits(self, node: Any) -> None:
        """Rows are sorted by expert: Slice each expert's rows, one packed matmul each, Concat, zero-pad the rest."""
        a = node.attributes
        bits, block, k, experts = list(a["bits"].value), a["block_size"].value, a["in_features"].value, a["num_experts"].value
        x, offsets, scales = node.inputs[0], node.inputs[1], node.inputs[2]
        qweights = node.inputs[3:3 + experts]
        zeros = node.inputs[3 + experts:3 + 2 * experts]
        scale_values = self.const(scales)
        zero_ix = self.initializer("grouped.zero", np.array([0], dtype=np.int64))
        rows = self.node(node, "", "Shape", [x], {"start": 0, "end": 1})
        ends = self.node(node, "", "Cast", [offsets], {"to": self.ir.DataType.INT64})
        ends = self.node(node, "", "Min", [ends, rows])
        ends = self.node(node, "", "Max", [ends, zero_ix])
        parts, start = [], zero_ix
        for e in range(experts):
            ix = self.initializer(f"grouped.expert{e}", np.array([e], dtype=np.int64))
            end = self.node(node, "", "Gather", [ends, ix], {"axis": 0})
            end = self.node(node, "", "Max", [end, start])
            rows_e = self.node(node, "", "Slice", [x, start, end, zero_ix])
            zero_e = self.const(zeros[e]) if e < len(zeros) and zeros[e] is not None else None
            parts.append(self.packed_matmul(node, rows_e, self.const(qweights[e]), scale_values[e], zero_e, bits[e], block,
                                            k, f"{qweights[e].name}"))
            start = end
        out = self.node(node, "", "Concat", parts, {"axis": 0})
        pad_rows = self.node(node, "", "Sub", [rows, start])
        pads = self.node(node, "", "Concat", [zero_ix, zero_ix, pad_rows, zero_ix], {"axis": 0})
        self.replace(node, self.node(node, "", "Pad", [out, pads]))

    # -- functions ---------------------------------------------------------------------------------
    def call_function(self, node: Any, name: str, build: Callable[[], Any], inputs: list) -> None:
        if name not in self.functions:
            function = self.ir.serde.deserialize_function(build())
            self.model.functions[function.identifier()] = function
            self.functions[name] = function
            self.stats["functions"] += 1
        self.replace(node, self.node(node, DOMAIN, name, inputs))

    def hadamard(self, node: Any) -> None:
        x, base = node.inputs
        n = x.shape[-1] if x.shape is not None else None
        k = base.shape[0] if base.shape is not None else None
        if not isinstance(n, int) or not isinstance(k, int):
            raise LoweringError(f"fxpress::hadamard on '{x.name}': the transformed (last) dim and the base size must be static")
        m = n // k
        if n % k or m & (m - 1):
            raise LoweringError(f"fxpress::hadamard on '{x.name}': last dim {n} is not {k} * 2^m")
        dtype = x.dtype.value
        self.call_function(node, f"Hadamard_{k}x{m}_t{dtype}", lambda: _hadamard_function(k, m, dtype, self.opset),
                           [x, base])

    def quantize_act(self, node: Any) -> None:
        a = node.attributes
        bits, clip, sym = a["bits"].value, float(a["clip_ratio"].value), bool(a["symmetric"].value)
        dtype = node.inputs[0].dtype.value
        name = f"QuantizeAct_{'s' if sym else 'a'}{bits}_c{_float_tag(clip)}_t{dtype}"
        self.call_function(node, name, lambda: _quantize_act_function(name, bits, clip, sym, dtype, self.opset),
                           [node.inputs[0]])

    def threshold_linear(self, node: Any) -> None:
        relu = bool(node.attributes["relu"].value)
        dtype = node.inputs[0].dtype.value
        name = f"ThresholdLinear{'Relu' if relu else ''}_t{dtype}"
        self.call_function(node, name, lambda: _threshold_function(name, relu, dtype, self.opset), list(node.inputs))

    def run(self) -> dict:
        handlers = {"LinearNBits": self.linear_nbits, "GroupedLinearNBits": self.grouped_linear_nbits,
                    "Hadamard": self.hadamard, "QuantizeAct": self.quantize_act, "ThresholdLinear": self.threshold_linear}
        for node in list(self.graph):  # embeddings first: a tied LM head then reuses the table's gather layout
            if node.domain == DOMAIN and node.op_type == "EmbeddingNBits":
                self.embedding_nbits(node)
        for node in list(self.graph):
            if node.domain == DOMAIN and node.op_type in handlers:
                handlers[node.op_type](node)
        self.model.opset_imports[DOMAIN] = 1
        if self.stats["matmulnbits"] or self.stats["gatherblockquantized"]:
            self.model.opset_imports[MS_DOMAIN] = 1
        _drop_unused_initializers(self.graph)
        return self.stats


def _matmulnbits_block(block: int) -> int | None:
    """The largest power of two >= 16 that divides `block` (MatMulNBits' block sizes), capped at 256."""
    sub = 256
    while sub >= 16:
        if block % sub == 0:
            return sub
        sub //= 2
    return None


def _unpack(qweight: np.ndarray, bits: int, block: int) -> np.ndarray:
    from fxpress.runtime.quant import unpack_codes

    return unpack_codes(torch.from_numpy(np.ascontiguousarray(qweight)), bits, block).numpy()


def _float_tag(value: float) -> str:
    return re.sub(r"[^0-9a-zA-Z]", "p", f"{value:g}")


def _drop_unused_initializers(graph: Any) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


# --------------------------------------------------------------------------------------------------
# fxpress function bodies (standard ONNX ops only)
# --------------------------------------------------------------------------------------------------
def _function(name: str, inputs: list[str], outputs: list[str], nodes: list, opset: int):
    import onnx.helper as oh

    return oh.make_function(DOMAIN, name, inputs, outputs, nodes, [oh.make_opsetid("", opset)])


def _const(name: str, array: np.ndarray):
    import onnx.helper as oh
    from onnx import numpy_helper

    return oh.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _np_dtype(dtype: int) -> Any:
    import onnx.helper as oh

    return oh.tensor_dtype_to_np_dtype(dtype)


def _sylvester(r: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < r:
        h = np.block([[h, h], [h, -h]])
    return h


def _hadamard_function(k: int, m: int, dtype: int, opset: int):
    """y = x @ (base ⊗ H_m / sqrt(m)): ±1 Sylvester factors of order <= 16 on the 2^m part, then the K x K base.

    Each factor is one small ±1 MatMul on its axis of the row viewed as [K, r_1, ..., r_s]; cost n·(Σ r_i + K)
    per row instead of the n² of a dense rotation.
    """
    import onnx.helper as oh

    np_t = _np_dtype(dtype)
    nodes = [oh.make_node("Shape", ["x"], ["shape"])]
    factors, rest = [], m
    while rest > 1:
        factors.append(min(16, rest))
        rest //= factors[-1]
    current, inner = "x", m
    for i, r in enumerate(factors):
        inner //= r
        nodes += [
            _const(f"view{i}", np.array([-1, r, inner], dtype=np.int64)),
            _const(f"h{i}", _sylvester(r).astype(np_t)),
            oh.make_node("Reshape", [current, f"view{i}"], [f"v{i}"]),
            oh.make_node("MatMul", [f"h{i}", f"v{i}"], [f"y{i}"]),
        ]
        current = f"y{i}"
    nodes += [
        _const("scale", np.array(1.0 / math.sqrt(m), dtype=np_t)),
        _const("rows", np.array([-1, k, m], dtype=np.int64)),
        oh.make_node("Reshape", [current, "rows"], ["grid"]),
        oh.make_node("Mul", ["grid", "scale"], ["scaled"]),
    ]
    if k > 1:
        nodes += [
            oh.make_node("Cast", ["base"], ["base_c"], to=dtype),
            oh.make_node("Transpose", ["base_c"], ["base_t"], perm=[1, 0]),
            oh.make_node("MatMul", ["base_t", "scaled"], ["mixed"]),
        ]
    else:
        nodes.append(oh.make_node("Identity", ["scaled"], ["mixed"]))
    nodes.append(oh.make_node("Reshape", ["mixed", "shape"], ["y"]))
    return _function(f"Hadamard_{k}x{m}_t{dtype}", ["x", "base"], ["y"], nodes, opset)


def _quantize_act_function(name: str, bits: int, clip: float, symmetric: bool, dtype: int, opset: int):
    """Per-row dynamic fake quantization with the reference kernel's formulas (fxpress.runtime.quant):
    symmetric code = round(clamp(x / scale)); asymmetric zero = round(clamp(-low / scale)) and
    code = round(clamp(x / scale + zero)), rounding halves to even as torch.round and ONNX Round do."""
    import onnx.helper as oh

    from fxpress.runtime.quant import TIE_OFFSET

    t = _np_dtype(dtype)
    tie = TIE_OFFSET.get(torch.from_numpy(np.zeros(0, dtype=t)).dtype, 0.0)  # float64: exact ties round up (quant.py)

    def rounded(clipped: str, out: str) -> list:
        if not tie:
            return [oh.make_node("Round", [clipped], [out])]
        return [oh.make_node("Add", [clipped, "tie"], [f"{clipped}_tie"]), oh.make_node("Round", [f"{clipped}_tie"], [out])]

    nodes = [_const("axes", np.array([-1], dtype=np.int64)), _const("one", np.array(1, dtype=t)),
             _const("zero", np.array(0, dtype=t))] + ([_const("tie", np.array(tie, dtype=t))] if tie else [])
    if symmetric:
        maxq = (1 << (bits - 1)) - 1
        nodes += [
            _const("factor", np.array(clip / max(maxq, 1), dtype=t)),
            _const("lo", np.array(-maxq - 1, dtype=t)),
            _const("hi", np.array(maxq, dtype=t)),
            oh.make_node("Abs", ["x"], ["absx"]),
            oh.make_node("ReduceMax", ["absx", "axes"], ["amax"], keepdims=1),
            oh.make_node("Mul", ["amax", "factor"], ["scale0"]),
            oh.make_node("Greater", ["scale0", "zero"], ["positive"]),
            oh.make_node("Where", ["positive", "scale0", "one"], ["scale"]),
            oh.make_node("Div", ["x", "scale"], ["ratio"]),
            oh.make_node("Clip", ["ratio", "lo", "hi"], ["clipped"]),
            *rounded("clipped", "codes"),
            oh.make_node("Mul", ["codes", "scale"], ["y"]),
        ]
    else:
        maxq = (1 << bits) - 1
        nodes += [
            _const("clip", np.array(clip, dtype=t)),
            _const("maxq", np.array(maxq, dtype=t)),
            oh.make_node("ReduceMax", ["x", "axes"], ["xmax"], keepdims=1),
            oh.make_node("Max", ["xmax", "zero"], ["high0"]),
            oh.make_node("Mul", ["high0", "clip"], ["high"]),
            oh.make_node("ReduceMin", ["x", "axes"], ["xmin"], keepdims=1),
            oh.make_node("Min", ["xmin", "zero"], ["low0"]),
            oh.make_node("Mul", ["low0", "clip"], ["low"]),
            oh.make_node("Sub", ["high", "low"], ["range"]),
            oh.make_node("Div", ["range", "maxq"], ["scale0"]),
            oh.make_node("Greater", ["scale0", "zero"], ["positive"]),
            oh.make_node("Where", ["positive", "scale0", "one"], ["scale"]),
            oh.make_node("Neg", ["low"], ["nlow"]),
            oh.make_node("Div", ["nlow", "scale"], ["zratio"]),
            oh.make_node("Clip", ["zratio", "zero", "maxq"], ["zclipped"]),
            *rounded("zclipped", "zp"),
            oh.make_node("Div", ["x", "scale"], ["ratio"]),
            oh.make_node("Add", ["ratio", "zp"], ["shifted"]),
            oh.make_node("Clip", ["shifted", "zero", "maxq"], ["clipped"]),
            *rounded("clipped", "codes"),
            oh.make_node("Sub", ["codes", "zp"], ["centered"]),
            oh.make_node("Mul", ["centered", "scale"], ["y"]),
        ]
    return _function(name, ["x"], ["y"], nodes, opset)


def _threshold_function(name: str, relu: bool, dtype: int, opset: int):
    """x @ conn.T - threshold (conn in {-1, 0, 1}), then max(0, .): additions and subtractions only in hardware."""
    import onnx.helper as oh

    nodes = [
        oh.make_node("Cast", ["conn"], ["connf"], to=dtype),
        oh.make_node("Transpose", ["connf"], ["conn_t"], perm=[1, 0]),
        oh.make_node("MatMul", ["x", "conn_t"], ["sums"]),
        oh.make_node("Cast", ["threshold"], ["theta"], to=dtype),
        oh.make_node("Sub", ["sums", "theta"], ["pre" if relu else "y"]),
    ]
    if relu:
        nodes.append(oh.make_node("Relu", ["pre"], ["y"]))
    return _function(name, ["x", "conn", "threshold"], ["y"], nodes, opset)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _rename_dims(model: Any, names: dict[str, str]) -> None:
    """Give dynamic dims readable names (batch, seq, past) on the graph's inputs and outputs."""
    import onnx_ir as ir

    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        dims = []
        for d in value.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                text = str(d.value) if hasattr(d, "value") else str(d)
                dims.append(pattern.sub(lambda m: names[m.group(1)], text) if text != "None" else None)
        value.shape = ir.Shape(dims)


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


def _validate(program: Program, path: Any, weights: str, opset: int) -> Path:
    if not isinstance(program, Program):
        raise ConfigError(f"export_onnx needs an fxpress Program (e.g. compiled.program), got {type(program).__name__}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights = {weights!r} is not a weight format: choose one of {', '.join(WEIGHT_FORMATS)}")
    if not isinstance(opset, int) or opset < 21:
        raise ConfigError(f"opset = {opset!r}: the ONNX lowering needs opset >= 21 (blocked DequantizeLinear, INT4)")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ConfigError(f"ONNX artifact path '{path}' should end in .onnx")
    if path.exists() and path.is_dir():
        raise ConfigError(f"ONNX artifact path '{path}' is a directory: give a file name ending in .onnx")
    return path


def to_onnx_model(program: Program, weights: str = "matmulnbits", opset: int = 21, accuracy_level: int = 0,
                  optimize: bool = True, additive_masks: bool = True) -> tuple[Any, dict[str, Any]]:
    """The materialized onnx_ir Model (nothing written) and export statistics."""
    ep, sig = reexport(program, additive_masks=additive_masks)
    table = translation_table()
    try:
        onnx_program = torch.onnx.export(
            ep, sig.example_args, dynamo=True, opset_version=opset, input_names=list(sig.input_names),
            output_names=list(sig.output_names), custom_translation_table=table, optimize=optimize, verbose=False,
        )
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(f"torch.onnx.export failed on the compiled program: {type(err).__name__}: {first}") from err
    model = onnx_program.model
    for node in model.graph.all_nodes():  # the exporter's per-node stack traces: megabytes on a real model
        node.metadata_props.clear()
    stats = _Materializer(model, weights, opset, accuracy_level).run()
    _rename_dims(model, sig.dim_names)
    meta = artifact_metadata(program, sig, {"weights": weights, "opset": opset, "accuracy_level": accuracy_level})
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    model.producer_name = "fxpress"
    return model, stats


def _initializer_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def export_onnx(program: Program, path: str | os.PathLike, weights: str = "matmulnbits", opset: int = 21,
                accuracy_level: int = 0, external_data: bool | None = None, optimize: bool = True,
                check: bool = True, additive_masks: bool = True) -> dict[str, Any]:
    """Write `program` as an ONNX model at `path` (atomically); returns statistics (sizes, kernels used).

    weights: "matmulnbits" (ONNX Runtime's int kernels) or "dequantizelinear" (standard ONNX, opset >= 21).
    accuracy_level: MatMulNBits compute type; 0 = the activations' float type (matches PyTorch), 4 = int8
    activations (faster, ~1e-2 relative error); runners apply the same level to fused DequantizeLinear.
    external_data: None = only when the weights exceed 2 GB (then `<path>.data` is written beside the model).
    optimize: run onnxscript's graph optimizer (constant folding, fusions) on the exported graph.
    additive_masks: a causal LM's boolean attention mask becomes additive (no all-masked-row guard; see
    lowering/export.py); False keeps the exporter's guarded form.
    """
    import onnx_ir as ir

    path = _validate(program, path, weights, opset)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level = {accuracy_level!r}: MatMulNBits takes 0 (float), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
    model, stats = to_onnx_model(program, weights, opset, accuracy_level, optimize, additive_masks)
    if external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".fxpress-onnx-", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        data_name = path.name + ".data"
        ir.save(model, tmp, external_data=data_name if external_data else None)
        if check:
            _check(tmp)
        if external_data:
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    files = [path] + ([path.parent / (path.name + ".data")] if external_data else [])
    stats.update({"path": str(path), "bytes": sum(f.stat().st_size for f in files), "external_data": external_data,
                  "weights": weights, "opset": opset})
    return stats


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise LoweringError(f"the exported ONNX model does not pass onnx.checker: {str(err).splitlines()[0]}") from err


register_translations()
