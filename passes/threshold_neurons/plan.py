"""What `threshold_neurons` decides per layer before the graph changes: the candidates, their {-1,0,1}
connections, thresholds and the integer formats of their inputs and outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxpress.errors import FxpressError
from fxpress.graph import get_param, is_op
from fxpress.runtime.threshold import FLOAT32_EXACT, output_bounds

aten = torch.ops.aten


@dataclass
class Candidate:
    """One linear layer of the graph, its optional ReLU, and its name (the weight's owner)."""

    name: str
    linear: Node
    relu: Node | None

    @property
    def out(self) -> Node:
        return self.relu if self.relu is not None else self.linear


def find_linears(gm: GraphModule) -> list[Candidate]:
    """Every `aten.linear` with a 2-D get_attr weight, in graph order, with its sole-user ReLU."""
    found = []
    for node in gm.graph.nodes:
        if not is_op(node, aten.linear.default) or node.args[1].op != "get_attr":
            continue
        weight = node.args[1]
        if get_param(gm, weight).dim() != 2:
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None and (not isinstance(bias, Node) or bias.op != "get_attr"):
            continue
        users = list(node.users)
        relu = users[0] if len(users) == 1 and is_op(users[0], aten.relu.default) else None
        found.append(Candidate(str(weight.target).rsplit(".", 1)[0], node, relu))
    return found


def ternarize(w: torch.Tensor, density: float) -> torch.Tensor:
    """{-1,0,1} per row: the sign of the `density` fraction of largest-magnitude entries."""
    k = max(1, int(round(density * w.shape[1])))
    keep = torch.zeros_like(w).scatter_(1, w.abs().topk(k, dim=1).indices, 1.0)  # exactly k, ties broken by topk
    return torch.sign(w) * keep


@dataclass
class Plan:
    """Everything decided for one replaced layer before the graph changes."""

    cand: Candidate
    conn: torch.Tensor
    threshold: torch.Tensor
    input_scale: float
    output_scale: float
    in_lo: int
    in_hi: int
    out_lo: int
    out_hi: int
    head: bool  # first of a chain: quantizes its float input
    latent: torch.Tensor
    theta_unit: float = 1.0
    node: Node | None = None


def _weight_and_bias(gm: GraphModule, linear: Node) -> tuple[torch.Tensor, torch.Tensor]:
    w = get_param(gm, linear.args[1]).detach().double()
    has_bias = len(linear.args) > 2 and linear.args[2] is not None
    b = get_param(gm, linear.args[2]).detach().double() if has_bias else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def plan_layer(gm: GraphModule, cand: Candidate, input_format: tuple[float, int, int], head: bool,
               density: float, input_bits: int) -> Plan:
    """Connections from the strongest weights on input codes, `alpha = mean |Ws|` over them and
    `threshold = round(-b / alpha)`; fails when the layer's sums could leave float32's exact integers."""
    scale, lo, hi = input_format
    w, b = _weight_and_bias(gm, cand.linear)
    ws = w * scale
    conn = ternarize(ws, density)
    kept = conn != 0
    alpha = float(ws.abs()[kept].mean()) if kept.any() else 1.0
    threshold = torch.round(-b / alpha)
    out_lo, out_hi = output_bounds(conn, threshold, lo, hi, cand.relu is not None)
    widest = max(int(out_hi.abs().max()), int(out_lo.abs().max()), int(((conn == 1).sum(1) * max(abs(lo), abs(hi))).max()) * 2)
    if widest >= FLOAT32_EXACT:
        raise FxpressError(
            f"threshold layer '{cand.name}' can reach {widest}, beyond float32's exact integers (2^24): "
            f"lower input_bits ({input_bits}) or density ({density})"
        )
    return Plan(cand, conn.to(torch.int8), threshold.float(), float(scale), alpha, int(lo), int(hi),
                int(out_lo.min()), int(out_hi.max()), head, (ws / alpha).float())


def input_format(x: torch.Tensor, bits: int, name: str) -> tuple[float, int, int]:
    """(input_scale, qmin, qmax): scale 1 and the narrowest width when the data are already small
    integers (digits' 0..16 -> 5-bit codes), else max-abs scaling to `bits` bits."""
    lo, hi = float(x.min()), float(x.max())
    unsigned = lo >= 0
    qmin, qmax = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if bool(torch.all(x == torch.round(x))) and qmin <= lo and hi <= qmax:
        width = bit_width(int(lo), int(hi))
        return 1.0, (0 if unsigned else -(2 ** (width - 1))), (2**width - 1 if unsigned else 2 ** (width - 1) - 1)
    peak = max(abs(lo), abs(hi))
    if peak == 0:
        raise FxpressError(f"the input of layer '{name}' is all zeros on the data: nothing to quantize")
    return peak / qmax, qmin, qmax


def bit_width(lo: int, hi: int) -> int:
    """Two's-complement (or unsigned when lo >= 0) width that holds [lo, hi]."""
    if lo >= 0:
        return max(1, math.ceil(math.log2(hi + 1)))
    return max(math.ceil(math.log2(hi + 1)) + 1, math.ceil(math.log2(-lo)) + 1)


def report_row(p: Plan) -> dict[str, Any]:
    """One replaced layer in the pass report: its connections, additions and integer ranges."""
    conn = p.conn
    exc, inh = int((conn == 1).sum()), int((conn == -1).sum())
    out_f, in_f = conn.shape
    return {
        "layer": p.cand.name,
        "in_features": in_f,
        "out_features": out_f,
        "relu": p.cand.relu is not None,
        "excitatory": exc,
        "inhibitory": inh,
        "multiplications_removed": in_f * out_f,
        "additions": max(exc + inh - out_f, 0) + out_f,
        "input_scale": p.input_scale,
        "output_scale": p.output_scale,
        "input_range": [p.in_lo, p.in_hi],
        "output_range": [p.out_lo, p.out_hi],
        "output_bits": bit_width(p.out_lo, p.out_hi),
        "threshold_range": [int(p.threshold.min()), int(p.threshold.max())],
    }
