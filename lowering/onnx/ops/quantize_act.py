"""fxpress::quantize_act in ONNX: an fxpress function doing per-row dynamic fake quantization."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from fxpress.lowering.onnx.builder import Materializer, constant, function_proto, node_attributes, numpy_dtype
from fxpress.lowering.onnx.registry import OnnxOp, like, onnx_lowering, placeholders

QUANTIZER_META = "fxpress.quantize_act"  # in-memory node metadata: what the int8 fusions (fusion.py) read


@onnx_lowering
class QuantizeAct(OnnxOp):
    op = "quantize_act"
    inputs = 1
    attributes = {"bits": "INT", "clip_ratio": "FLOAT", "symmetric": "INT"}

    @staticmethod
    def translate(x, bits=8, clip_ratio=1.0, symmetric=True):
        out = placeholders().QuantizeAct(x, bits=bits, clip_ratio=float(clip_ratio), symmetric=int(bool(symmetric)))
        return like(out, x)

    @classmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        bits, clip, sym = node_attributes(node, "bits", "clip_ratio", "symmetric")
        clip, sym = float(clip), bool(sym)
        dtype = node.inputs[0].dtype.value
        name = f"QuantizeAct_{'s' if sym else 'a'}{bits}_c{_float_tag(clip)}_t{dtype}"
        call = b.call_function(node, name, lambda: _quantize_act_function(name, bits, clip, sym, dtype, b.opset),
                               [node.inputs[0]])
        call.meta[QUANTIZER_META] = {"bits": int(bits), "clip_ratio": clip, "symmetric": sym, "dtype": dtype}


def _float_tag(value: float) -> str:
    return re.sub(r"[^0-9a-zA-Z]", "p", f"{value:g}")


def _quantize_act_function(name: str, bits: int, clip: float, symmetric: bool, dtype: int, opset: int) -> Any:
    """Per-row dynamic fake quantization with the reference kernel's formulas (fxpress.runtime.quant):
    symmetric code = round(clamp(x / scale)); asymmetric zero = round(clamp(-low / scale)) and
    code = round(clamp(x / scale + zero)), rounding halves to even as torch.round and ONNX Round do."""
    from fxpress.runtime.quant import TIE_OFFSET

    t = numpy_dtype(dtype)
    tie = TIE_OFFSET.get(torch.from_numpy(np.zeros(0, dtype=t)).dtype, 0.0)  # float64: exact ties round up (quant.py)
    nodes = [constant("axes", np.array([-1], dtype=np.int64)), constant("one", np.array(1, dtype=t)),
             constant("zero", np.array(0, dtype=t))] + ([constant("tie", np.array(tie, dtype=t))] if tie else [])
    body = _symmetric_nodes if symmetric else _asymmetric_nodes
    return function_proto(name, ["x"], ["y"], nodes + body(bits, clip, t, bool(tie)), opset)


def _rounded(clipped: str, out: str, tie: bool) -> list:
    """Round half to even, after adding the tie offset where the dtype needs one."""
    import onnx.helper as oh

    if not tie:
        return [oh.make_node("Round", [clipped], [out])]
    return [oh.make_node("Add", [clipped, "tie"], [f"{clipped}_tie"]), oh.make_node("Round", [f"{clipped}_tie"], [out])]


def _symmetric_nodes(bits: int, clip: float, t: Any, tie: bool) -> list:
    import onnx.helper as oh

    maxq = (1 << (bits - 1)) - 1
    return [
        constant("factor", np.array(clip / max(maxq, 1), dtype=t)),
        constant("lo", np.array(-maxq - 1, dtype=t)),
        constant("hi", np.array(maxq, dtype=t)),
        oh.make_node("Abs", ["x"], ["absx"]),
        oh.make_node("ReduceMax", ["absx", "axes"], ["amax"], keepdims=1),
        oh.make_node("Mul", ["amax", "factor"], ["scale0"]),
        oh.make_node("Greater", ["scale0", "zero"], ["positive"]),
        oh.make_node("Where", ["positive", "scale0", "one"], ["scale"]),
        oh.make_node("Div", ["x", "scale"], ["ratio"]),
        oh.make_node("Clip", ["ratio", "lo", "hi"], ["clipped"]),
        *_rounded("clipped", "codes", tie),
        oh.make_node("Mul", ["codes", "scale"], ["y"]),
    ]


def _asymmetric_nodes(bits: int, clip: float, t: Any, tie: bool) -> list:
    import onnx.helper as oh

    maxq = (1 << bits) - 1
    return [
        constant("clip", np.array(clip, dtype=t)),
        constant("maxq", np.array(maxq, dtype=t)),
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
        *_rounded("zclipped", "zp", tie),
        oh.make_node("Div", ["x", "scale"], ["ratio"]),
        oh.make_node("Add", ["ratio", "zp"], ["shifted"]),
        oh.make_node("Clip", ["shifted", "zero", "maxq"], ["clipped"]),
        *_rounded("clipped", "codes", tie),
        oh.make_node("Sub", ["codes", "zp"], ["centered"]),
        oh.make_node("Mul", ["centered", "scale"], ["y"]),
    ]
