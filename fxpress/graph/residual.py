"""The residual stream: traced forward from the token embedding by a table of per-op rules.

Each rule is `(matches, handler)`: the first rule whose `matches(walk, node)` holds handles a node that
reads the stream (tinygrad's PatternMatcher, minus the rewriting). Branches added into the stream are
walked back to their writers by a second table of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from fxpress.graph.linears import LinearUse, linear_use, param_source
from fxpress.graph.nodes import (
    CAST_OPS,
    ROW_OPS,
    GraphPatternError,
    flat_nodes,
    is_op,
    is_per_row,
    last_dim,
    op_name,
    position,
    shape,
    touches_last_dim,
)
from fxpress.graph.norms import Norm, find_norms

aten = torch.ops.aten

_ZERO_OPS = {"zeros", "zeros_like", "new_zeros", "empty_like", "new_empty", "full", "full_like", "scalar_tensor"}
_SCATTER_OPS = {"index_add", "index_put", "scatter_add", "index_copy", "scatter"}


@dataclass
class ResidualStream:
    """The residual stream (hidden size `hidden`) from the embedding to the last readers.

    `nodes`: every node whose last dim is in the stream's basis (rotating the stream rotates them).
    `segment[node]`: how many residual adds precede the node on the stream (0 = after the embedding).
    `readers`/`writers`: LinearUses reading the stream / adding into it; `embeddings`: (embedding node,
    its weight get_attr); `adds`: the residual adds in order; `norms`: norms over the stream;
    `scales`: mul nodes by a [hidden] parameter that still sit on the stream (unfolded norm scales);
    `biases`: [hidden] parameters added into the stream outside linears; `outputs`: stream nodes
    that leave the graph (a rotation would change those outputs).
    """

    hidden: int
    nodes: set[Node] = field(default_factory=set)
    segment: dict[Node, int] = field(default_factory=dict)
    embeddings: list[tuple[Node, Node]] = field(default_factory=list)
    readers: list[LinearUse] = field(default_factory=list)
    writers: list[LinearUse] = field(default_factory=list)
    adds: list[Node] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    scales: list[Node] = field(default_factory=list)
    biases: list[Node] = field(default_factory=list)
    outputs: list[Node] = field(default_factory=list)
    writer_segment: dict[Node, int] = field(default_factory=dict)  # writer node -> index of its add


def find_embeddings(graph: torch.fx.Graph) -> list[tuple[Node, Node]]:
    """(aten.embedding node, its table's get_attr) for every lookup in a parameter table."""
    out = []
    for node in graph.nodes:
        if is_op(node, aten.embedding):
            src = param_source(node.args[0])
            if src is not None:
                out.append((node, src[0]))
    return out


# --- one walk: the stream being built and what the rules share ---------------------------------------

@dataclass
class _Walk:
    """One walk of `residual_stream`: the stream being built, the options, and what the rules share."""

    stream: ResidualStream
    strict: bool
    allow_scales: bool
    norms_by_input: dict[Node, list[Norm]]
    invariant: set[Node] = field(default_factory=set)  # per-row statistics of stream tensors (norms' rsqrt etc.)
    squares: set[Node] = field(default_factory=set)  # x*x of a stream tensor, allowed only into a last-dim mean

    def fail(self, node: Node, why: str) -> None:
        if self.strict:
            raise GraphPatternError(f"residual stream: node '{node.name}' ({op_name(node)}) {why}")

    def on_stream(self, node: Node) -> list[Node]:
        return [a for a in flat_nodes((node.args, node.kwargs)) if a in self.stream.nodes]

    def extend(self, node: Node, segment: int | None = None) -> None:
        """Put `node` on the stream, in its inputs' segment unless given."""
        stream = self.stream
        stream.nodes.add(node)
        stream.segment[node] = segment if segment is not None else max(stream.segment[a] for a in self.on_stream(node))
        for norm in self.norms_by_input.get(node, []):
            if norm not in stream.norms and norm.dim == stream.hidden:
                stream.norms.append(norm)


Matcher = Callable[[_Walk, Node], bool]
Rule = tuple[Matcher, Callable[[_Walk, Node], None]]


def _ops(*groups: Collection[str]) -> Matcher:
    """Match nodes whose op name is in any of `groups`."""
    names = set().union(*groups)
    return lambda walk, node: op_name(node) in names


def _any_node(walk: _Walk, node: Node) -> bool:
    """Matches every node: the last rule of a table, its default."""
    return True


# --- rules for a node that reads the stream ----------------------------------------------------------

def _keep(walk: _Walk, node: Node) -> None:
    """The op keeps the features of the last dim: its output is on the stream too."""
    walk.extend(node)


def _is_linear(walk: _Walk, node: Node) -> bool:
    return linear_use(node) is not None


def _read_by_linear(walk: _Walk, node: Node) -> None:
    use = linear_use(node)
    if use.input in walk.stream.nodes and all(a is use.input for a in walk.on_stream(node)):
        walk.stream.readers.append(use)
    else:
        walk.fail(node, "uses a stream tensor as a weight")


def _move_rows(walk: _Walk, node: Node) -> None:
    source = walk.on_stream(node)[0]
    keeps_features = last_dim(node) == walk.stream.hidden
    if keeps_features and (op_name(node) == "getitem" or not touches_last_dim(node, source)):
        walk.extend(node)
    else:
        walk.fail(node, f"changes the last (hidden) dim: {shape(source)} -> {shape(node)}")


def _add(walk: _Walk, node: Node) -> None:
    """Two stream tensors sum on the stream; a [.., hidden] branch added to it is a residual add."""
    stream = walk.stream
    tensors = [a for a in node.args[:2] if isinstance(a, Node)]
    others = [a for a in tensors if a not in stream.nodes]
    if not others and len(tensors) == 2:
        walk.extend(node)
    elif len(others) == 1 and last_dim(others[0]) == stream.hidden:
        segment = max(stream.segment[a] for a in walk.on_stream(node))
        stream.adds.append(node)
        for writer in _writers(walk, others[0]):
            stream.writer_segment[writer.node] = len(stream.adds) - 1
        walk.extend(node, segment + 1)
    else:
        walk.fail(node, "adds something that is not a [.., hidden] tensor to the stream")


def _scale(walk: _Walk, node: Node) -> None:
    """Per-row scales keep the stream; a [hidden] parameter is an unfolded norm scale."""
    a, b = node.args[0], node.args[1]
    other = b if a in walk.stream.nodes else a
    if other in walk.stream.nodes:
        if op_name(node) == "mul" and a is b:
            walk.squares.add(node)
        else:
            walk.fail(node, "multiplies two stream tensors")
    elif is_per_row(other) or other in walk.invariant:
        walk.extend(node)
    elif param_source(other) is not None and shape(other) and len(shape(other)) == 1:
        walk.stream.scales.append(node)
        walk.extend(node)
        if not walk.allow_scales:
            walk.fail(node, "scales the stream by a per-channel parameter (fold the norm scales first)")
    else:
        walk.fail(node, "multiplies the stream elementwise by a non-scalar tensor")


def _is_square(walk: _Walk, node: Node) -> bool:
    return op_name(node) == "pow" and node.args[1] == 2


def _square(walk: _Walk, node: Node) -> None:
    walk.squares.add(node)


def _is_row_reduction(walk: _Walk, node: Node) -> bool:
    return op_name(node) in ("sum", "mean") and not touches_last_dim(node, walk.on_stream(node)[0])


def _is_stream_rms_norm(walk: _Walk, node: Node) -> bool:
    return (op_name(node) == "rms_norm" and list(node.args[1]) == [walk.stream.hidden]
            and node.args[0] in walk.stream.nodes)


def _fused_rms_norm(walk: _Walk, node: Node) -> None:
    walk.extend(node)
    if (node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")) is not None:
        walk.stream.scales.append(node)
        if not walk.allow_scales:
            walk.fail(node, "is an RMSNorm with its scale inside (fold the norm scales first)")


def _fails(why: str) -> Callable[[_Walk, Node], None]:
    """A handler that rejects the node (under `strict`) for the reason `why`."""
    return lambda walk, node: walk.fail(node, why)


STREAM_RULES: list[Rule] = [
    (_is_linear, _read_by_linear),
    (_ops(CAST_OPS, {"dropout"}), _keep),
    (_ops(ROW_OPS), _move_rows),
    (_ops({"add", "sub"}), _add),
    (_ops({"mul", "div"}), _scale),
    (_is_square, _square),
    (_is_row_reduction, _keep),
    (_ops(_SCATTER_OPS), _keep),
    (_is_stream_rms_norm, _fused_rms_norm),
    (_ops({"layer_norm", "native_layer_norm"}),
     _fails("is a LayerNorm: its mean subtraction does not commute with a rotation")),
    (_any_node, _fails("mixes the hidden features in a way a rotation does not commute with")),
]


def _off_stream(walk: _Walk, node: Node) -> None:
    """Track per-row statistics of the stream (a norm's mean of squares, its rsqrt) that may scale it."""
    inputs = flat_nodes((node.args, node.kwargs))
    if any(a in walk.squares for a in inputs):
        if op_name(node) == "mean" and not touches_last_dim(node, node.args[0]):
            walk.fail(node, "reduces a squared stream tensor over other dims than the last")
        walk.invariant.add(node)
    elif any(a in walk.invariant for a in inputs):
        walk.invariant.add(node)


# --- rules for a node on a branch added into the stream (walked back to the linears that write it) ---

def _zeros(walk: _Walk, node: Node) -> list[Any]:
    """A fresh zero buffer (MoE combine) contributes nothing to follow."""
    return []


def _first_arg(walk: _Walk, node: Node) -> list[Any]:
    src = node.args[0]
    return list(src) if isinstance(src, (list, tuple)) else [src]


def _summands(walk: _Walk, node: Node) -> list[Any]:
    return [a for a in node.args[:2] if isinstance(a, Node) and last_dim(a) == walk.stream.hidden]


def _scaled(walk: _Walk, node: Node) -> list[Any]:
    wide = [a for a in node.args[:2] if isinstance(a, Node) and not is_per_row(a)]
    if len(wide) != 1:
        walk.fail(node, "multiplies a stream branch elementwise by a non-scalar")
    return wide


def _scattered(walk: _Walk, node: Node) -> list[Any]:
    """The destination and the rows scattered into it."""
    if op_name(node) == "index_put":
        return [node.args[0], node.args[2]]
    if op_name(node) == "copy":
        return [node.args[0], node.args[1]]
    return [node.args[0], node.args[3] if len(node.args) > 3 else node.kwargs.get("source")]


def _unexpected(walk: _Walk, node: Node) -> list[Any]:
    walk.fail(node, "is on a branch added to the stream and is not a linear, a row op or a sum")
    return []


BRANCH_RULES: list[tuple[Matcher, Callable[[_Walk, Node], list[Any]]]] = [
    (_ops(_ZERO_OPS), _zeros),
    (_ops(CAST_OPS, ROW_OPS, {"sum", "mean"}), _first_arg),
    (_ops({"add", "sub"}), _summands),
    (_ops({"mul", "div"}), _scaled),
    (_ops({"index_add", "scatter_add", "index_copy", "index_put", "copy"}), _scattered),
    (_any_node, _unexpected),
]


def _writer(walk: _Walk, node: Node) -> LinearUse | None:
    """The linear `node` is when it writes into the stream (checked against the stream's width)."""
    use = linear_use(node)
    if use is not None and use.out_features() != walk.stream.hidden:
        walk.fail(node, f"writes {use.out_features()} features into a stream of {walk.stream.hidden}")
    return use


def _writers(walk: _Walk, start: Node) -> list[LinearUse]:
    """Walk back from a branch added into the stream to the linears whose outputs it sums."""
    stream, found = walk.stream, []
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        if node in stream.nodes:
            walk.fail(node, "feeds the stream back into a branch added to it")
        elif node.op == "get_attr":
            stream.biases.append(node)
        elif node.op != "call_function":
            walk.fail(node, "adds a graph input to the stream")
        elif (use := _writer(walk, node)) is not None:
            if use not in found:
                found.append(use)
                stream.writers.append(use)
        else:
            follow = next(rule for matches, rule in BRANCH_RULES if matches(walk, node))
            stack.extend(follow(walk, node))
    return found


# --- the walk -----------------------------------------------------------------------------------------

def residual_stream(gm: GraphModule, strict: bool = True, allow_scales: bool = False) -> ResidualStream:
    """Trace the residual stream forward from the token embedding; find every reader and writer.

    A node is on the stream when its last dim carries the stream's features. Rows may be moved,
    gathered, scaled per row or summed (MoE dispatch and combine keep this), but any op that mixes
    features of the last dim other than a linear reader, or a norm, is an error under `strict`:
    a rotation would not commute with it. `allow_scales` tolerates per-channel norm scales (to check a
    graph before its scales are folded).
    """
    graph = gm.graph
    embeddings = find_embeddings(graph)
    if not embeddings:
        raise GraphPatternError("no token embedding (aten.embedding of a parameter) in the graph: cannot find the residual stream")
    stream = ResidualStream(hidden=last_dim(embeddings[0][0]), embeddings=embeddings)
    norms_by_input: dict[Node, list[Norm]] = {}
    for norm in find_norms(graph):
        norms_by_input.setdefault(norm.input, []).append(norm)
    walk = _Walk(stream, strict, allow_scales, norms_by_input)
    for emb, _ in embeddings:
        walk.extend(emb, 0)
    for node in graph.nodes:
        if node.op == "output":
            stream.outputs += [arg for arg in flat_nodes(node.args) if arg in stream.nodes]
        elif node.op != "call_function" or node in stream.nodes or op_name(node).startswith("_assert"):
            continue
        elif not walk.on_stream(node):
            _off_stream(walk, node)
        else:
            handle = next(rule for matches, rule in STREAM_RULES if matches(walk, node))
            handle(walk, node)
    stream.readers.sort(key=lambda u: position(u.node))
    stream.writers.sort(key=lambda u: position(u.node))
    return stream


def final_readers(stream: ResidualStream) -> list[LinearUse]:
    """Readers after the last residual add (the LM head)."""
    last = len(stream.adds)
    return [r for r in stream.readers if stream.segment[r.input] == last]
