"""Norms: RMSNorm and LayerNorm over the last dim as ATen emits them, and the linears they feed."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from fxpress.graph.editing import get_param
from fxpress.graph.linears import LinearUse, linear_use, param_source
from fxpress.graph.nodes import ROW_OPS, calls, is_cast, is_op, last_dim, ndim, position, tensor_users, val

aten = torch.ops.aten


@dataclass
class Norm:
    """An RMSNorm or LayerNorm over the last dim.

    `normalized` is the node after normalisation and before the affine scale: folding the scale
    into the readers rewires the users of `output` to `normalized`.
    """

    kind: str  # "rms" | "layer"
    input: Node
    normalized: Node
    output: Node
    weight: Node | None = None
    bias: Node | None = None
    eps: float = 0.0
    weight_offset: float = 0.0  # Gemma-style (1 + w) scales
    dim: int | None = None

    def scale(self, gm: torch.nn.Module) -> torch.Tensor | None:
        """The effective per-channel scale in float64 (None when the norm has no weight)."""
        if self.weight is None:
            return None
        return get_param(gm, self.weight).to(torch.float64) + self.weight_offset


def _skip_casts_back(node: Any) -> Any:
    while isinstance(node, Node) and is_cast(node):
        node = node.args[0]
    return node


def _single_cast_forward(node: Node) -> Node:
    """Follow a node through casts that are its only use."""
    while True:
        users = tensor_users(node)
        if len(users) == 1 and is_cast(users[0]):
            node = users[0]
        else:
            return node


def _is_square(node: Any, x: Node) -> bool:
    if not isinstance(node, Node):
        return False
    if is_op(node, aten.pow) and node.args[1] == 2:
        return _skip_casts_back(node.args[0]) is x
    if is_op(node, aten.mul) and len(node.args) == 2:
        return _skip_casts_back(node.args[0]) is x and _skip_casts_back(node.args[1]) is x
    return False


def _affine_after(normalized: Node, dim: int | None) -> tuple[Node, Node | None, float, Node | None]:
    """The scale (and bias) applied to a normalised tensor: (output, weight, offset, bias)."""
    out, weight, offset, bias = normalized, None, 0.0, None
    users = tensor_users(normalized)
    if len(users) == 1 and is_op(users[0], aten.mul):
        mul = users[0]
        other = mul.args[1] if mul.args[0] is normalized else mul.args[0]
        src = param_source(other)
        if src is not None and val(src[0]) is not None and val(src[0]).dim() == 1:
            out, weight = mul, src[0]
        elif is_op(other, aten.add) and param_source(other.args[0]) is not None and isinstance(other.args[1], (int, float)):
            out, weight, offset = mul, param_source(other.args[0])[0], float(other.args[1])
    if weight is not None:
        users = tensor_users(out)
        if len(users) == 1 and is_op(users[0], aten.add):
            add = users[0]
            other = add.args[1] if add.args[0] is out else add.args[0]
            src = param_source(other)
            if src is not None and val(src[0]).dim() == 1:
                out, bias = add, src[0]
    return out, weight, offset, bias


def _match_rms(rsqrt: Node) -> Norm | None:
    """rsqrt(mean(x^2, -1) + eps) * x  [* w]  as ATen emits RMSNorm."""
    add = rsqrt.args[0]
    if not is_op(add, aten.add) or not isinstance(add.args[1], (int, float)):
        return None
    mean = add.args[0]
    if not is_op(mean, aten.mean) or list(mean.args[1]) not in ([-1], [ndim(mean) - 1 if ndim(mean) else -1]):
        return None
    square = mean.args[0]
    x = _skip_casts_back(square.args[0]) if isinstance(square, Node) and square.args else None
    if x is None or not _is_square(square, x):
        return None
    for user in tensor_users(rsqrt):
        if is_op(user, aten.mul) and any(_skip_casts_back(a) is x for a in user.args if isinstance(a, Node) and a is not rsqrt):
            normalized = _single_cast_forward(user)
            out, weight, offset, bias = _affine_after(normalized, last_dim(x))
            return Norm("rms", x, normalized, out, weight, bias, float(add.args[1]), offset, last_dim(x))
    return None


def _match_layer(node: Node) -> Norm | None:
    """aten.layer_norm / native_layer_norm, and the fused aten.rms_norm (scale inside the op)."""
    if is_op(node, aten.rms_norm):
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        ws = param_source(weight)
        return Norm("rms", node.args[0], node, node, ws[0] if ws else None, None,
                    float(eps) if eps is not None else 0.0, 0.0, last_dim(node.args[0]))
    if is_op(node, aten.layer_norm):
        x = node.args[0]
        weight = node.args[2] if len(node.args) > 2 else None
        bias = node.args[3] if len(node.args) > 3 else None
        eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
        ws, bs = param_source(weight), param_source(bias)
        return Norm("layer", x, node, node, ws[0] if ws else None, bs[0] if bs else None, eps, 0.0, last_dim(x))
    if is_op(node, aten.native_layer_norm):
        x = node.args[0]
        getitems = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if not getitems:
            return None
        ws, bs = param_source(node.args[2]), param_source(node.args[3])
        return Norm("layer", x, getitems[0], getitems[0], ws[0] if ws else None, bs[0] if bs else None,
                    float(node.args[4]), 0.0, last_dim(x))
    return None


def find_norms(graph: torch.fx.Graph) -> list[Norm]:
    """Every RMSNorm / LayerNorm over the last dimension, in graph order."""
    norms = []
    for node in graph.nodes:
        norm = _match_rms(node) if is_op(node, aten.rsqrt) else _match_layer(node)
        if norm is not None:
            norms.append(norm)
    return norms


def norm_consumers(norm: Norm) -> tuple[list[LinearUse], list[Node]]:
    """Norm -> linear chains: the linears a norm's output reaches through row ops and casts, and any other consumer.

    A norm whose scale is to be folded into its readers must have no other consumer.
    """
    readers: list[LinearUse] = []
    others: list[Node] = []
    stack, seen = [norm.output], set()
    while stack:
        node = stack.pop()
        for user in tensor_users(node):
            if user in seen:
                continue
            seen.add(user)
            use = linear_use(user)
            if use is not None and use.input is node:
                readers.append(use)
            elif calls(user, ROW_OPS) or is_cast(user):
                stack.append(user)
            else:
                others.append(user)
    return sorted(readers, key=lambda u: position(u.node)), others


def norm_readers(norm: Norm) -> list[LinearUse]:
    """The linears that read a norm's output (through reshapes, casts and token gathers)."""
    return norm_consumers(norm)[0]

