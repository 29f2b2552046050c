"""Node queries and traversals: what a node computes, its shape, who reads it, what it depends on."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from fxpress.errors import FxpressError


class GraphPatternError(FxpressError):
    """The graph does not have the structure a query expects (says which node and why)."""


# ops that only change a tensor's dtype, storage or autograd status, never its values' meaning
CAST_OPS = ("to", "_to_copy", "alias", "clone", "contiguous", "detach", "lift_fresh_copy")

# ops that move or copy whole rows (tokens) and never mix features of the last dim
ROW_OPS = {
    "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "select", "slice", "index",
    "index_select", "gather", "flatten", "repeat", "permute", "transpose", "cat", "stack", "getitem",
    "split", "split_with_sizes", "chunk", "unbind", "narrow",
}


def val(node: Any) -> Any:
    """The example value torch.export recorded for a node (a FakeTensor), or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def shape(node: Any) -> tuple | None:
    """The node's shape (dims may be symbolic), or None when it is not a tensor."""
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def last_dim(node: Any) -> int | None:
    """The size of the last dimension when it is a concrete int (hidden sizes always are)."""
    s = shape(node)
    if not s:
        return None
    try:
        return int(s[-1])
    except (TypeError, ValueError):
        return None


def ndim(node: Any) -> int | None:
    s = shape(node)
    return None if s is None else len(s)


def _dim_arg(node: Node, default: int | None = 0) -> Any:
    """The `dim` argument of an op (positional or keyword)."""
    if len(node.args) > 1 and not isinstance(node.args[1], Node):
        return node.args[1]
    return node.kwargs.get("dim", default)


def _reduces_last(node: Node, n_in: int) -> bool:
    """Whether a sum/mean/amax reduces the last of its input's `n_in` dims (no dim: all of them)."""
    dims = _dim_arg(node, None)
    if dims is None:
        return True
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return any(int(d) % n_in == n_in - 1 for d in dims)


def touches_last_dim(node: Node, ref: Node) -> bool:
    """Whether a row op works on the last dim of its input `ref` (it must not, to stay on the stream)."""
    n_in = ndim(ref)
    if n_in is None:
        return True
    name = op_name(node)
    last = n_in - 1
    if name == "permute":
        return int(node.args[1][-1]) % n_in != last
    if name == "transpose":
        return last in {int(d) % n_in for d in node.args[1:3]}
    if name in ("unsqueeze", "stack"):
        return int(_dim_arg(node)) % (n_in + 1) == n_in
    if name in ("sum", "mean", "amax"):
        return _reduces_last(node, n_in)
    if name in ("split", "split_with_sizes", "chunk"):
        d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return int(d) % n_in == last
    if name in ("select", "slice", "index_select", "gather", "narrow", "squeeze", "cat"):
        d = _dim_arg(node, 0)
        return isinstance(d, int) and d % n_in == last
    if name == "index":
        return len(node.args[1]) >= n_in and node.args[1][last] is not None
    return False


def is_per_row(node: Any) -> bool:
    """A multiplier that scales whole rows alike: python scalar, one element, or last dim 1."""
    if isinstance(node, (int, float)):
        return True
    s = shape(node)
    if s is None:
        return False
    if len(s) == 0:
        return True
    try:
        return int(s[-1]) == 1
    except (TypeError, ValueError):
        return False


def is_op(node: Any, *targets: Any) -> bool:
    """True if `node` calls one of `targets` (OpOverloads or OpOverloadPackets)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is t:
            return True
    return False


def op_name(node: Node) -> str:
    """A short name for the node's target ('linear', 'grouped_mm_fallback', 'getitem', ...)."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(getattr(packet, "__name__", packet)).split(".")[-1]
    return getattr(target, "__name__", str(target))


def calls(node: Any, names: Collection[str]) -> bool:
    """True if `node` is a call_function whose op name is in `names`."""
    return isinstance(node, Node) and node.op == "call_function" and op_name(node) in names


def is_cast(node: Any) -> bool:
    """A dtype cast, alias or copy: the same values, so queries look through it."""
    return calls(node, CAST_OPS)


def tensor_users(node: Node) -> list[Node]:
    """Users that consume the value (skips export's metadata assertions)."""
    return [u for u in node.users if not (u.op == "call_function" and op_name(u).startswith("_assert"))]


def flat_nodes(args: Any) -> list[Node]:
    """Every Node inside nested args/kwargs, in order."""
    out: list[Node] = []
    torch.fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out


def ancestors(node: Node, stop: Collection[Node] = (), within: Collection[Node] | None = None) -> set[Node]:
    """`node` and every node it reads from, transitively.

    Nodes in `stop` are included but not looked past; with `within`, only those nodes are visited.
    """
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        stack.extend(a for a in flat_nodes((n.args, n.kwargs)) if within is None or a in within)
    return seen


def descendants(node: Node, depth: int | None = None) -> set[Node]:
    """Every node that reads `node`, transitively (up to `depth` users away when given)."""
    seen: set[Node] = set()
    frontier = {node}
    level = 0
    while frontier and (depth is None or level < depth):
        frontier = {u for n in frontier for u in n.users} - seen
        seen |= frontier
        level += 1
    return seen


def position(node: Node) -> int:
    """Position of a node in its graph (cached on the graph; `reset_order_cache` after edits)."""
    graph = node.graph
    cache = getattr(graph, "_fxpress_order", None)
    if cache is None or node not in cache:
        cache = {n: i for i, n in enumerate(graph.nodes)}
        graph._fxpress_order = cache
    return cache[node]


def reset_order_cache(graph: torch.fx.Graph) -> None:
    if hasattr(graph, "_fxpress_order"):
        del graph._fxpress_order
