"""The FPGA netlist: a threshold-neuron network as integer connectivity, in a documented JSON format.

Format (`format: "fxpress-fpga-netlist"`, `version: 1`), all numbers plain JSON integers except scales:

    {
      "format": "fxpress-fpga-netlist", "version": 1,
      "input":  {"features": 64, "scale": 1.0, "min": 0, "max": 31, "bits": 5, "signed": false},
      "layers": [
        {"kind": "threshold", "name": "0", "in_features": 64, "out_features": 32, "relu": true,
         "input":  {"min": 0, "max": 31, "bits": 5, "signed": false},
         "output": {"min": 0, "max": 5858, "bits": 13, "signed": false},
         "acc":    {"min": -3000, "max": 5858, "bits": 14, "signed": true},
         "scale": 0.188,
         "neurons": [{"excitatory": [3, 10, ...], "inhibitory": [5, ...], "threshold": -4}, ...]},
        {"kind": "mac", "name": "2", "in_features": 32, "out_features": 10, "relu": false,
         "input": {...}, "output": {...}, "acc": {...}, "scale": 0.0021, "weight_bits": 8,
         "weights": [[w_00, w_01, ...], ...], "bias": [b_0, ...]}
      ],
      "output": {"features": 10, "scale": 0.0021}
    }

Semantics (what the HLS C++, the Verilog and `reference` compute, in integers):

- input codes: `q = clamp(round(x / input.scale), input.min, input.max)` (done by the host).
- threshold layer: `s_j = sum_{i in excitatory_j} h_i - sum_{i in inhibitory_j} h_i - threshold_j`,
  `out_j = max(0, s_j)` if relu else `s_j` (exactly `fxpress::threshold_linear`).
- mac layer (a conventional layer kept by multiplication injection, quantized to int8 per tensor):
  `s_j = bias_j + sum_i weights[j][i] * h_i`, `out_j = max(0, s_j)` if relu else `s_j`.
- `scale` is the real value of one output unit (`real = scale * out`); the last layer's scale maps
  the integer outputs back to the model's output, and argmax is the same on both.
- `acc` is the range of `s_j` before rectification; `bits` widths are two's complement when
  `signed`, else unsigned. Two's-complement sums wrap, so only the final range needs to fit.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from fxpress.artifact_names import NETLIST_FORMAT
from fxpress.atomic import write_atomic
from fxpress.errors import ArtifactError, LoweringError
from fxpress.graph import get_param, is_op

aten = torch.ops.aten
FORMAT = NETLIST_FORMAT
VERSION = 1


def bits_for(lo: int, hi: int) -> tuple[int, bool]:
    """(width, signed) that holds every integer in [lo, hi]."""
    if lo >= 0:
        return max(1, math.ceil(math.log2(hi + 1))), False
    width = max(math.ceil(math.log2(hi + 1)) + 1 if hi > 0 else 1, math.ceil(math.log2(-lo)) + 1)
    return width, True


def fmt(lo: int, hi: int) -> dict[str, Any]:
    width, signed = bits_for(int(lo), int(hi))
    return {"min": int(lo), "max": int(hi), "bits": width, "signed": signed}


@dataclass
class Layer:
    """One layer of the netlist; `neurons` for threshold layers, `weights`/`bias` for mac layers."""

    kind: str
    name: str
    in_features: int
    out_features: int
    relu: bool
    input: dict[str, Any]
    output: dict[str, Any]
    acc: dict[str, Any]
    scale: float
    neurons: list[dict[str, Any]] = field(default_factory=list)
    weights: list[list[int]] = field(default_factory=list)
    bias: list[int] = field(default_factory=list)
    weight_bits: int = 8

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        if self.kind == "threshold":
            d.pop("weights"), d.pop("bias"), d.pop("weight_bits")
        else:
            d.pop("neurons")
        return d

    def matrix(self) -> torch.Tensor:
        """The layer as an int64 matrix (out, in): {-1,0,1} for threshold layers, int8 weights for mac."""
        if self.kind == "mac":
            return torch.tensor(self.weights, dtype=torch.int64)
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.int64)
        for j, n in enumerate(self.neurons):
            m[j, n["excitatory"]] = 1
            m[j, n["inhibitory"]] = -1
        return m

    def offsets(self) -> torch.Tensor:
        """What is added to the sum: -threshold, or the bias."""
        if self.kind == "mac":
            return torch.tensor(self.bias, dtype=torch.int64)
        return -torch.tensor([n["threshold"] for n in self.neurons], dtype=torch.int64)


@dataclass
class Netlist:
    """A feed-forward integer network: input format, layers, output scale."""

    input: dict[str, Any]
    layers: list[Layer]

    @property
    def output(self) -> dict[str, Any]:
        return {"features": self.layers[-1].out_features, "scale": self.layers[-1].scale}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "input": self.input,
                "layers": [layer.to_dict() for layer in self.layers], "output": self.output}

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Netlist:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactError(f"cannot read netlist {path}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ArtifactError(f"{path} is not an {FORMAT} v{VERSION} file")
        layers = [Layer(**{k: v for k, v in layer.items()}) for layer in data["layers"]]
        return cls(data["input"], layers)

    # -- integer reference (PyTorch) ----------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Host-side input codes, as the graph's quantize nodes compute them."""
        q = torch.clamp(torch.round(x.float() / self.input["scale"]), self.input["min"], self.input["max"])
        return q.to(torch.int64)

    def reference(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's integer output (int64) for input codes (N, features): the bit-exact reference.

        Threshold layers run the same `fxpress::threshold_linear` op as the graph (on float32, exact),
        mac layers an int64 matmul.
        """
        h = codes.to(torch.int64)
        outs = []
        for layer in self.layers:
            if layer.kind == "threshold":
                conn = layer.matrix().to(torch.int8)
                th = -layer.offsets().float()
                h = torch.ops.fxpress.threshold_linear(h.float(), conn, th, layer.relu).to(torch.int64)
            else:
                h = h @ layer.matrix().t() + layer.offsets()
                h = h.clamp_min(0) if layer.relu else h
            outs.append(h)
        return outs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Real-valued outputs for real inputs: quantize, run the integers, scale."""
        return self.reference(self.quantize(x))[-1].double() * self.layers[-1].scale

    def summary(self) -> dict[str, Any]:
        rows = []
        for layer in self.layers:
            m = layer.matrix()
            rows.append({"name": layer.name, "kind": layer.kind, "shape": [layer.in_features, layer.out_features],
                         "connections": int((m != 0).sum()), "output_bits": layer.output["bits"],
                         "multipliers": int((m != 0).sum()) if layer.kind == "mac" else 0})
        return {"input_bits": self.input["bits"], "layers": rows}


# ---- building layers -------------------------------------------------------------------------------
def threshold_layer(name: str, conn: torch.Tensor, threshold: torch.Tensor, relu: bool, inp: dict, scale: float) -> Layer:
    """A threshold layer from the op's tensors; ranges by interval arithmetic over the input range."""
    c = conn.to(torch.int64)
    th = threshold.round().to(torch.int64)
    neurons = [{"excitatory": torch.nonzero(c[j] == 1).flatten().tolist(),
                "inhibitory": torch.nonzero(c[j] == -1).flatten().tolist(),
                "threshold": int(th[j])} for j in range(c.shape[0])]
    acc_lo, acc_hi = _ranges(c, -th, inp["min"], inp["max"])
    out_lo, out_hi = (max(acc_lo, 0), max(acc_hi, 0)) if relu else (acc_lo, acc_hi)
    return Layer("threshold", name, c.shape[1], c.shape[0], relu, dict(inp), fmt(out_lo, out_hi),
                 fmt(acc_lo, acc_hi), float(scale), neurons=neurons)


def mac_layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool, inp: dict,
              in_scale: float, weight_bits: int = 8) -> Layer:
    """A conventional layer as an int8 (per-tensor symmetric) multiply-accumulate on integer inputs.

    Real weights on input codes are `W * in_scale`; `scale = max|W * in_scale| / 127`, weights
    `round(W * in_scale / scale)`, bias `round(b / scale)`; so `real out = scale * s`.
    """
    w = weight.detach().double() * in_scale
    qmax = 2 ** (weight_bits - 1) - 1
    scale = float(w.abs().max()) / qmax if float(w.abs().max()) > 0 else 1.0
    wq = torch.round(w / scale).clamp(-qmax, qmax).to(torch.int64)
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    bq = torch.round(b / scale).to(torch.int64)
    acc_lo, acc_hi = _ranges(wq, bq, inp["min"], inp["max"])
    out_lo, out_hi = (max(acc_lo, 0), max(acc_hi, 0)) if relu else (acc_lo, acc_hi)
    if max(abs(acc_lo), abs(acc_hi)) >= 2**31:
        raise LoweringError(f"mac layer '{name}' needs more than 32-bit accumulators; lower the input bits")
    return Layer("mac", name, w.shape[1], w.shape[0], relu, dict(inp), fmt(out_lo, out_hi), fmt(acc_lo, acc_hi),
                 scale, weights=wq.tolist(), bias=bq.tolist(), weight_bits=weight_bits)


def _ranges(m: torch.Tensor, offset: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """[min, max] over neurons of m @ h + offset for h in [lo, hi]^n."""
    pos, neg = m.clamp_min(0), m.clamp_max(0)
    low = pos.sum(1) * lo + neg.sum(1) * hi + offset
    high = pos.sum(1) * hi + neg.sum(1) * lo + offset
    return int(low.min()), int(high.max())


# ---- from the graph --------------------------------------------------------------------------------
def _users(node: Node) -> list[Node]:
    return [u for u in node.users if u.op != "call_module"]


def _next(node: Node) -> Node:
    users = _users(node)
    if len(users) != 1:
        raise LoweringError(
            f"the FPGA lowering needs a chain of layers; node '{node.name}' feeds {len(users)} nodes "
            "(residual or branching networks are not supported)"
        )
    return users[0]


def netlist_from_program(program, weight_bits: int = 8) -> Netlist:
    """Walk the graph input -> quantize -> threshold layers (-> conventional linears) -> output."""
    gm = program.module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise LoweringError(f"the FPGA lowering takes one input tensor; the graph has {len(placeholders)}")
    node = _next(placeholders[0])
    if not is_op(node, aten.div.Tensor):
        raise LoweringError(
            "the FPGA lowering needs a threshold layer first (its input quantization defines the fixed-point "
            "input): run ThresholdNeurons so that the first linear layer is replaced"
        )
    in_scale = float(node.args[1])
    node = _next(node)
    clamp = _next(node)
    if not (is_op(node, aten.round.default) and is_op(clamp, aten.clamp.default)):
        raise LoweringError(f"unexpected input quantization near node '{node.name}'")
    lo, hi = int(clamp.args[1]), int(clamp.args[2])
    inp = {"features": _features(placeholders[0]), "scale": in_scale, **fmt(lo, hi)}
    current = {k: inp[k] for k in ("min", "max", "bits", "signed")}
    scale, layers, node = in_scale, [], _next(clamp)
    while node.op != "output":
        if is_op(node, torch.ops.fxpress.threshold_linear.default):
            _, conn, thr, relu = node.args
            # real value of one output unit: set by the `* output_scale` node that follows, if any
            layer = threshold_layer(f"layer{len(layers)}", get_param(gm, conn), get_param(gm, thr), bool(relu), current, 1.0)
        elif is_op(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)) and layers:
            scale = layers[-1].scale = float(node.args[1])
            node = _next(node)
            continue
        elif is_op(node, aten.linear.default):
            relu_node = _users(node)[0] if len(_users(node)) == 1 and is_op(_users(node)[0], aten.relu.default) else None
            bias = get_param(gm, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
            layer = mac_layer(f"layer{len(layers)}", get_param(gm, node.args[1]), bias, relu_node is not None, current,
                              scale, weight_bits)
            node = relu_node if relu_node is not None else node
        else:
            raise LoweringError(
                f"the FPGA lowering cannot translate node '{node.name}' ({node.target}): it supports threshold "
                "layers and linear(+relu) layers after them"
            )
        if layer.kind == "threshold" and layers and layers[-1].kind == "mac":
            raise LoweringError("a threshold layer after a conventional layer needs requantization, which is not supported")
        layers.append(layer)
        scale = layer.scale
        current = dict(layer.output)
        node = _next(node)
    if not layers:
        raise LoweringError("the graph holds no threshold layer: run ThresholdNeurons before the FPGA lowering")
    return Netlist(inp, layers)


def _features(node: Node) -> int:
    v = node.meta.get("val")
    if v is None or v.dim() != 2:
        raise LoweringError("the FPGA lowering takes a 2-D input (batch, features)")
    return int(v.shape[1])


# ---- slices and baselines (kernel-level comparisons) ------------------------------------------------
def first_neurons(netlist: Netlist, count: int) -> Netlist:
    """The first layer alone, cut to its first `count` neurons: a small kernel to place and time quickly."""
    layer = netlist.layers[0]
    if not 1 <= count <= layer.out_features:
        raise LoweringError(f"count={count}: layer '{layer.name}' has {layer.out_features} neurons")
    d = layer.to_dict()
    d["out_features"] = count
    if layer.kind == "threshold":
        d["neurons"] = layer.neurons[:count]
        m, off = Layer(**d).matrix(), Layer(**d).offsets()
    else:
        d["weights"], d["bias"] = layer.weights[:count], layer.bias[:count]
        m, off = torch.tensor(d["weights"]), torch.tensor(d["bias"])
    lo, hi = _ranges(m, off, layer.input["min"], layer.input["max"])
    d["acc"] = fmt(lo, hi)
    d["output"] = fmt(max(lo, 0), max(hi, 0)) if layer.relu else fmt(lo, hi)
    return Netlist(dict(netlist.input), [Layer(**d)])


def mac_netlist(weight: torch.Tensor, bias: torch.Tensor | None, relu: bool, inp: dict[str, Any],
                in_scale: float = 1.0, weight_bits: int = 8, name: str = "mac", mask: torch.Tensor | None = None) -> Netlist:
    """The conventional int8 multiply-accumulate layer on the same input codes: the area baseline.

    `mask` (out, in) keeps only those weights (e.g. a threshold layer's connections), so a comparison
    can separate the cost of multipliers from the cost of sparsity.
    """
    fields = {k: inp[k] for k in ("min", "max", "bits", "signed")}
    if mask is not None:
        weight = weight * (mask != 0).to(weight.dtype)
    layer = mac_layer(name, weight, bias, relu, fields, in_scale, weight_bits)
    return Netlist(dict(inp), [layer])
