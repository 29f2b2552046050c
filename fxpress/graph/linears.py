"""Linears: every matrix product of an activation with a parameter (aten.linear, mm/addmm/matmul, grouped MoE matmuls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from fxpress.graph.nodes import CAST_OPS, flat_nodes, op_name, position, val


@dataclass
class LinearUse:
    """One matrix product of an activation with a parameter: `node` computes input @ W^T (per expert).

    `in_axis`/`out_axis` are the parameter's axes (negative) holding input and output features, so
    rotating inputs is `W.index/matmul` along `in_axis` whatever the storage layout. `expert` is set
    when the node uses one slice of a 3-D parameter (`select(W, 0, e)`).
    """

    node: Node
    weight: Node  # the get_attr node
    input: Node
    bias: Node | None = None
    in_axis: int = -1
    out_axis: int = -2
    kind: str = "linear"  # "linear" | "mm" | "grouped_mm"
    expert: int | None = None

    @property
    def fused_experts(self) -> bool:
        v = val(self.weight)
        return isinstance(v, torch.Tensor) and v.dim() == 3 and self.expert is None

    def in_features(self) -> int:
        return int(val(self.weight).shape[self.in_axis])

    def out_features(self) -> int:
        return int(val(self.weight).shape[self.out_axis])

    @property
    def name(self) -> str:
        return str(self.weight.target)


def param_source(node: Any) -> tuple[Node, list[Node]] | None:
    """Follow casts/transposes/selects back to a get_attr: (get_attr node, chain of ops) or None."""
    chain: list[Node] = []
    cur = node
    while isinstance(cur, Node):
        if cur.op == "get_attr":
            return cur, chain[::-1]
        if cur.op != "call_function":
            return None
        name = op_name(cur)
        if name in CAST_OPS or name in ("t", "transpose", "permute", "select", "numpy_T"):
            chain.append(cur)
            cur = cur.args[0]
            continue
        return None
    return None


def _axes_after_chain(param_ndim: int, chain: list[Node]) -> tuple[list[int], int | None]:
    """Map the axes of the value a chain produces back to the parameter's axes (and a selected expert)."""
    axes = list(range(param_ndim))
    expert = None
    for op in chain:
        name = op_name(op)
        if name == "t":
            axes = axes[::-1] if len(axes) == 2 else axes
        elif name == "transpose":
            a, b = (int(x) % len(axes) for x in op.args[1:3])
            axes[a], axes[b] = axes[b], axes[a]
        elif name == "permute":
            axes = [axes[int(i) % len(axes)] for i in op.args[1]]
        elif name == "select":
            dim = int(op.args[1]) % len(axes)
            if axes[dim] == 0 and param_ndim == 3:
                expert = int(op.args[2])
            del axes[dim]
    return axes, expert


def _neg(axis: int, n: int) -> int:
    return axis - n if axis >= 0 else axis



def _param_axes(arg: Any) -> tuple[Node, int, list[int], int | None] | None:
    """The parameter behind `arg`, its rank, the parameter axes `arg`'s value has, and a selected expert."""
    src = param_source(arg)
    if src is None:
        return None
    attr, chain = src
    pnd = val(attr).dim()
    return (attr, pnd, *_axes_after_chain(pnd, chain))


def _linear(node: Node) -> LinearUse | None:
    """aten.linear(x, W[out, in], bias)."""
    found = _param_axes(node.args[1])
    if found is None or len(found[2]) != 2:  # value is [out, in] as linear reads it
        return None
    attr, pnd, axes, expert = found
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias_src = param_source(bias) if bias is not None else None
    return LinearUse(node, attr, node.args[0], bias_src[0] if bias_src else None,
                     in_axis=_neg(axes[1], pnd), out_axis=_neg(axes[0], pnd), kind="linear", expert=expert)


def _matmul(node: Node) -> LinearUse | None:
    """mm/matmul/bmm(x, W[in, out]) and addmm(bias, x, W[in, out]) where only W is a parameter."""
    addmm = op_name(node) == "addmm"
    a_idx, b_idx = (1, 2) if addmm else (0, 1)
    found = _param_axes(node.args[b_idx])
    if found is None or len(found[2]) < 2 or param_source(node.args[a_idx]) is not None:  # value is [in, out]
        return None
    attr, pnd, axes, expert = found
    bias_src = param_source(node.args[0]) if addmm else None
    return LinearUse(node, attr, node.args[a_idx], bias_src[0] if bias_src else None, in_axis=_neg(axes[-2], pnd),
                     out_axis=_neg(axes[-1], pnd), kind="mm", expert=expert)


def _grouped_mm(node: Node) -> LinearUse | None:
    """grouped_mm(x, W[E, in, out], offsets): fused experts."""
    found = _param_axes(node.args[1])
    if found is None or len(found[2]) != 3:  # value is [E, in, out]
        return None
    attr, pnd, axes, expert = found
    return LinearUse(node, attr, node.args[0], None, in_axis=_neg(axes[1], pnd),
                     out_axis=_neg(axes[2], pnd), kind="grouped_mm", expert=expert)


def linear_use(node: Node) -> LinearUse | None:
    """Describe `node` as a LinearUse if it multiplies an activation by a parameter."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    name = op_name(node)
    if name == "linear":
        return _linear(node)
    if name in ("mm", "matmul", "addmm", "bmm"):
        return _matmul(node)
    if "grouped_mm" in name:
        return _grouped_mm(node)
    return None


def linear_uses(graph: torch.fx.Graph) -> list[LinearUse]:
    """Every LinearUse in graph order."""
    return [use for use in map(linear_use, graph.nodes) if use is not None]


def linears_behind(node: Node) -> list[LinearUse]:
    """The nearest linears upstream of `node` (stopping at each one found), in graph order."""
    found, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        use = linear_use(n)
        if use is not None:
            found.append(use)
            continue
        if n.op == "call_function":
            stack.extend(flat_nodes((n.args, n.kwargs)))
    return sorted(found, key=lambda u: position(u.node))
