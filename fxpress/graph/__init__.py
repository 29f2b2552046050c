"""Graph queries shared by every pass: parameters, linears, norms, the residual stream, blocks, attention, MoE.

Everything here recognises structure from the ATen graph itself (ops, shapes, data flow), never from
module class names or parameter names, so one query serves Llama, Qwen, Mistral, Mixtral, OLMoE and
DeepSeek alike. Passes call these functions instead of re-deriving patterns.

Conventions: an FX `Node` stands for the tensor it produces; `meta["val"]` (set by torch.export) gives
its shape. A parameter is reached through a `get_attr` node. Linear weights are `[out, in]`; fused
experts are 3-D `[E, out, in]` (or `[E, in, out]`), see `LinearUse.in_axis` / `out_axis`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from fxpress.errors import FxpressError

aten = torch.ops.aten


class GraphPatternError(FxpressError):
    """The graph does not have the structure a query expects (says which node and why)."""


# ----------------------------------------------------------------------------------------------
# nodes, shapes, parameters
# ----------------------------------------------------------------------------------------------

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


def is_get_attr(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def tensor_users(node: Node) -> list[Node]:
    """Users that consume the value (skips export's metadata assertions)."""
    return [u for u in node.users if not (u.op == "call_function" and op_name(u).startswith("_assert"))]


def _resolve(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, name = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def get_param(gm: torch.nn.Module, node_or_target: Node | str) -> torch.Tensor:
    """The tensor behind a get_attr node (or its dotted target)."""
    target = node_or_target.target if isinstance(node_or_target, Node) else node_or_target
    owner, name = _resolve(gm, str(target))
    return getattr(owner, name)


def store_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Put `value` (as is, any dtype) behind the attribute `target`, keeping its kind: parameter, buffer or plain."""
    owner, name = _resolve(gm, target)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def set_param(gm: torch.nn.Module, node_or_target: Node | str, value: torch.Tensor) -> None:
    """Replace the tensor behind a get_attr node, keeping its kind (parameter or buffer) and dtype.

    Every get_attr node with this target sees the new value; untie first if only one use must change.
    """
    target = node_or_target.target if isinstance(node_or_target, Node) else node_or_target
    owner, name = _resolve(gm, str(target))
    old = getattr(owner, name)
    store_tensor(gm, str(target), value.detach().to(dtype=old.dtype, device=old.device).contiguous())
    if isinstance(node_or_target, Node) and isinstance(val(node_or_target), torch.Tensor):
        if tuple(val(node_or_target).shape) != tuple(value.shape):
            node_or_target.meta["val"] = value


def add_param(gm: GraphModule, name: str, value: torch.Tensor, before: Node, buffer: bool = False) -> Node:
    """Register a new parameter (or buffer) on the module and a get_attr node for it before `before`."""
    base = name.replace(".", "_")
    unique, i = base, 0
    while hasattr(gm, unique):
        i += 1
        unique = f"{base}_{i}"
    value = value.detach().contiguous()
    if buffer:
        gm.register_buffer(unique, value)
    else:
        gm.register_parameter(unique, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(unique)
    node.meta["val"] = value
    return node


def untie(gm: GraphModule, use: Node, attr_node: Node, suffix: str = "untied") -> Node:
    """Give `use` its own copy of the parameter behind `attr_node` (tied embeddings), return the new node."""
    value = get_param(gm, attr_node).detach().clone()
    new = add_param(gm, f"{attr_node.target}_{suffix}", value, before=attr_node.next if attr_node.next.op != "root" else use)
    use.replace_input_with(attr_node, new)
    return new


def insert_after(gm: GraphModule, node: Node, target: Any, args: tuple, kwargs: dict | None = None,
                 like: Node | None = None, reroute: bool = True) -> Node:
    """Insert `target(*args)` right after `node`; with `reroute`, `node`'s other users read the new node.

    `like` gives the example value to copy into meta (the new node has that node's shape).
    """
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    ref = like if like is not None else node
    if "val" in ref.meta:
        new.meta["val"] = ref.meta["val"]
    if reroute:
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def replace_with_call(gm: GraphModule, node: Node, target: Any, args: tuple) -> Node:
    """Put `target(*args)` in place of `node` (same example value and provenance) and erase `node`."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update({key: v for key, v in node.meta.items() if key in ("val", "stack_trace", "nn_module_stack")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def drop_param(gm: GraphModule, node: Node) -> None:
    """Erase an unused get_attr node and, when no other node reads it, the tensor behind it (so it no longer counts)."""
    owner, name = _resolve(gm, str(node.target))
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
        owner._parameters.pop(name, None)
        owner._buffers.pop(name, None)


def insert_before_use(gm: GraphModule, user: Node, arg: Node, target: Any, extra_args: tuple = ()) -> Node:
    """Insert `target(arg, *extra_args)` just before `user` and make only `user` read it."""
    with gm.graph.inserting_before(user):
        new = gm.graph.call_function(target, (arg, *extra_args), {})
    if "val" in arg.meta:
        new.meta["val"] = arg.meta["val"]
    user.replace_input_with(arg, new)
    return new


# ----------------------------------------------------------------------------------------------
# linears (aten.linear, mm/addmm/matmul with a parameter, grouped MoE matmuls)
# ----------------------------------------------------------------------------------------------

_CAST_OPS = ("to", "_to_copy", "alias", "clone", "contiguous", "detach", "lift_fresh_copy")


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
        if name in _CAST_OPS or name in ("t", "transpose", "permute", "select", "numpy_T"):
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


def linear_use(node: Node) -> LinearUse | None:
    """Describe `node` as a LinearUse if it multiplies an activation by a parameter."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    name = op_name(node)
    if name == "linear":
        src = param_source(node.args[1])
        if src is None:
            return None
        attr, chain = src
        pnd = val(attr).dim()
        axes, expert = _axes_after_chain(pnd, chain)  # value is [out, in] as linear reads it
        if len(axes) != 2:
            return None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias_src = param_source(bias) if bias is not None else None
        return LinearUse(node, attr, node.args[0], bias_src[0] if bias_src else None,
                         in_axis=_neg(axes[1], pnd), out_axis=_neg(axes[0], pnd), kind="linear", expert=expert)
    if name in ("mm", "matmul", "addmm", "bmm"):
        a_idx, b_idx = (1, 2) if name == "addmm" else (0, 1)
        src = param_source(node.args[b_idx])
        if src is None or param_source(node.args[a_idx]) is not None:
            return None
        attr, chain = src
        pnd = val(attr).dim()
        axes, expert = _axes_after_chain(pnd, chain)  # value is [in, out] as mm reads it
        if len(axes) < 2:
            return None
        bias = None
        if name == "addmm":
            bsrc = param_source(node.args[0])
            bias = bsrc[0] if bsrc else None
        return LinearUse(node, attr, node.args[a_idx], bias, in_axis=_neg(axes[-2], pnd),
                         out_axis=_neg(axes[-1], pnd), kind="mm", expert=expert)
    if "grouped_mm" in name:
        src = param_source(node.args[1])
        if src is None:
            return None
        attr, chain = src
        pnd = val(attr).dim()
        axes, expert = _axes_after_chain(pnd, chain)  # value is [E, in, out]
        if len(axes) != 3:
            return None
        return LinearUse(node, attr, node.args[0], None, in_axis=_neg(axes[1], pnd),
                         out_axis=_neg(axes[2], pnd), kind="grouped_mm", expert=expert)
    return None


def linear_uses(graph: torch.fx.Graph) -> list[LinearUse]:
    """Every LinearUse in graph order."""
    out = []
    for node in graph.nodes:
        use = linear_use(node)
        if use is not None:
            out.append(use)
    return out


def rotate_param_axis(w: torch.Tensor, axis: int, q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Return W with `axis` multiplied by Q (W_axis -> W_axis @ Q), or by Q^T with `transpose`.

    In float64, so repeated folding stays exact to ~1e-12 before the cast back.
    """
    q = q.to(torch.float64)
    if transpose:
        q = q.T
    moved = w.to(torch.float64).movedim(axis, -1)
    return (moved @ q).movedim(-1, axis)


# ----------------------------------------------------------------------------------------------
# norms (RMSNorm and LayerNorm as ATen emits them)
# ----------------------------------------------------------------------------------------------

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
    while isinstance(node, Node) and node.op == "call_function" and op_name(node) in _CAST_OPS:
        node = node.args[0]
    return node


def _single_cast_forward(node: Node) -> Node:
    """Follow a node through casts that are its only use."""
    while True:
        users = tensor_users(node)
        if len(users) == 1 and users[0].op == "call_function" and op_name(users[0]) in _CAST_OPS:
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
            elif user.op == "call_function" and (op_name(user) in _ROW_OPS or op_name(user) in _CAST_OPS):
                stack.append(user)
            else:
                others.append(user)
    return sorted(readers, key=lambda u: _order(u.node)), others


def norm_readers(norm: Norm) -> list[LinearUse]:
    """The linears that read a norm's output (through reshapes, casts and token gathers)."""
    return norm_consumers(norm)[0]


def _order(node: Node) -> int:
    """Position of a node in its graph (cached per graph in meta)."""
    graph = node.graph
    cache = getattr(graph, "_fxpress_order", None)
    if cache is None or node not in cache:
        cache = {n: i for i, n in enumerate(graph.nodes)}
        graph._fxpress_order = cache
    return cache[node]


def reset_order_cache(graph: torch.fx.Graph) -> None:
    if hasattr(graph, "_fxpress_order"):
        del graph._fxpress_order


# ----------------------------------------------------------------------------------------------
# the residual stream
# ----------------------------------------------------------------------------------------------

# ops that move or copy whole rows (tokens) and never mix features of the last dim
_ROW_OPS = {
    "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "select", "slice", "index",
    "index_select", "gather", "flatten", "repeat", "permute", "transpose", "cat", "stack", "getitem",
    "split", "split_with_sizes", "chunk", "unbind", "narrow",
}
_ZERO_OPS = {"zeros", "zeros_like", "new_zeros", "empty_like", "new_empty", "full", "full_like", "scalar_tensor"}


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

    def reader_segment(self, use: LinearUse) -> int:
        return self.segment[use.input]


def _dim_arg(node: Node, default: int = 0) -> Any:
    """The `dim` argument of an op (positional or keyword)."""
    if len(node.args) > 1 and not isinstance(node.args[1], Node):
        return node.args[1]
    return node.kwargs.get("dim", default)


def _touches_last(node: Node, ref: Node) -> bool:
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
        dims = _dim_arg(node, None)
        if dims is None:
            return True
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        return any(int(d) % n_in == last for d in dims)
    if name in ("split", "split_with_sizes", "chunk"):
        d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return int(d) % n_in == last
    if name in ("select", "slice", "index_select", "gather", "narrow", "squeeze", "cat"):
        d = _dim_arg(node, 0)
        return isinstance(d, int) and d % n_in == last
    if name == "index":
        return len(node.args[1]) >= n_in and node.args[1][last] is not None
    return False


def _is_per_row(node: Any, hidden: int) -> bool:
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


def _find_embeddings(graph: torch.fx.Graph) -> list[tuple[Node, Node]]:
    out = []
    for node in graph.nodes:
        if is_op(node, aten.embedding):
            src = param_source(node.args[0])
            if src is not None:
                out.append((node, src[0]))
    return out


def residual_stream(gm: GraphModule, strict: bool = True, allow_scales: bool = False) -> ResidualStream:
    """Trace the residual stream forward from the token embedding; find every reader and writer.

    A node is on the stream when its last dim carries the stream's features. Rows may be moved,
    gathered, scaled per row or summed (MoE dispatch and combine keep this), but any op that mixes
    features of the last dim other than a linear reader, or a norm, is an error under `strict`:
    a rotation would not commute with it. `allow_scales` tolerates per-channel norm scales (to check a
    graph before its scales are folded).
    """
    graph = gm.graph
    embeddings = _find_embeddings(graph)
    if not embeddings:
        raise GraphPatternError("no token embedding (aten.embedding of a parameter) in the graph: cannot find the residual stream")
    hidden = last_dim(embeddings[0][0])
    stream = ResidualStream(hidden=hidden, embeddings=embeddings)
    invariant: set[Node] = set()  # per-row statistics of stream tensors (norms' rsqrt etc.)
    squares: set[Node] = set()  # x*x of a stream tensor, allowed only into a last-dim mean
    norms_by_input = {}
    for norm in find_norms(graph):
        norms_by_input.setdefault(norm.input, []).append(norm)
    seg = stream.segment

    def fail(node: Node, why: str) -> None:
        if strict:
            raise GraphPatternError(f"residual stream: node '{node.name}' ({op_name(node)}) {why}")

    def add_stream(node: Node, segment: int) -> None:
        stream.nodes.add(node)
        seg[node] = segment
        for norm in norms_by_input.get(node, []):
            if norm not in stream.norms and norm.dim == hidden:
                stream.norms.append(norm)

    for emb, _ in embeddings:
        add_stream(emb, 0)

    for node in graph.nodes:
        if node.op == "output":
            for arg in _flat_nodes(node.args):
                if arg in stream.nodes:
                    stream.outputs.append(arg)
            continue
        if node.op != "call_function" or node in stream.nodes:
            continue
        inputs = _flat_nodes((node.args, node.kwargs))
        s_in = [a for a in inputs if a in stream.nodes]
        name = op_name(node)
        if not s_in:
            if any(a in invariant for a in inputs) and not any(a in squares for a in inputs):
                invariant.add(node)
            elif any(a in squares for a in inputs):
                if name == "mean" and not _touches_last(node, node.args[0]):
                    fail(node, "reduces a squared stream tensor over other dims than the last")
                invariant.add(node)
            continue
        segment = max(seg[a] for a in s_in)
        if name.startswith("_assert"):
            continue
        use = linear_use(node)
        if use is not None:
            if use.input in stream.nodes and all(a is use.input or a not in stream.nodes for a in inputs):
                stream.readers.append(use)
                continue
            fail(node, "uses a stream tensor as a weight")
            continue
        if name in _CAST_OPS or name in ("dropout", "lift_fresh_copy"):
            add_stream(node, segment)
        elif name in _ROW_OPS:
            if last_dim(node) == hidden and not _touches_last(node, s_in[0]):
                add_stream(node, segment)
            elif name == "getitem" and last_dim(node) == hidden:
                add_stream(node, segment)
            else:
                fail(node, f"changes the last (hidden) dim: {shape(s_in[0])} -> {shape(node)}")
        elif name in ("add", "sub"):
            tensors = [a for a in node.args[:2] if isinstance(a, Node)]
            others = [a for a in tensors if a not in stream.nodes]
            if not others and len(tensors) == 2:
                add_stream(node, segment)
            elif len(others) == 1 and last_dim(others[0]) == hidden:
                stream.adds.append(node)
                idx = len(stream.adds) - 1
                for w in _writers(others[0], hidden, stream, fail):
                    stream.writer_segment[w.node] = idx
                add_stream(node, segment + 1)
            else:
                fail(node, "adds something that is not a [.., hidden] tensor to the stream")
        elif name in ("mul", "div"):
            a, b = node.args[0], node.args[1]
            other = b if a in stream.nodes else a
            if other in stream.nodes:
                if name == "mul" and a is b:
                    squares.add(node)
                else:
                    fail(node, "multiplies two stream tensors")
                continue
            if _is_per_row(other, hidden) or other in invariant:
                add_stream(node, segment)
            elif param_source(other) is not None and shape(other) and len(shape(other)) == 1:
                stream.scales.append(node)
                add_stream(node, segment)
                if not allow_scales:
                    fail(node, "scales the stream by a per-channel parameter (fold the norm scales first)")
            else:
                fail(node, "multiplies the stream elementwise by a non-scalar tensor")
        elif name == "pow" and node.args[1] == 2:
            squares.add(node)
        elif name in ("sum", "mean") and not _touches_last(node, s_in[0]):
            add_stream(node, segment)
        elif name in ("index_add", "index_put", "scatter_add", "index_copy", "scatter"):
            add_stream(node, segment)
        elif name == "rms_norm" and list(node.args[1]) == [hidden] and node.args[0] in stream.nodes:
            add_stream(node, segment)
            if (node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")) is not None:
                stream.scales.append(node)
                if not allow_scales:
                    fail(node, "is an RMSNorm with its scale inside (fold the norm scales first)")
        elif name in ("layer_norm", "native_layer_norm"):
            fail(node, "is a LayerNorm: its mean subtraction does not commute with a rotation")
        else:
            fail(node, "mixes the hidden features in a way a rotation does not commute with")
    stream.readers.sort(key=lambda u: _order(u.node))
    stream.writers.sort(key=lambda u: _order(u.node))
    return stream


def _flat_nodes(args: Any) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out


def _writers(start: Node, hidden: int, stream: ResidualStream, fail) -> list[LinearUse]:
    """Walk back from a branch added into the stream to the linears whose outputs it sums."""
    found: list[LinearUse] = []
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        if node in stream.nodes:
            fail(node, "feeds the stream back into a branch added to it")
            continue
        if node.op == "get_attr":
            stream.biases.append(node)
            continue
        if node.op != "call_function":
            fail(node, "adds a graph input to the stream")
            continue
        use = linear_use(node)
        if use is not None:
            if use.out_features() != hidden:
                fail(node, f"writes {use.out_features()} features into a stream of {hidden}")
            if use not in found:
                found.append(use)
                stream.writers.append(use)
            continue
        name = op_name(node)
        if name in _ZERO_OPS:
            continue
        if name in _CAST_OPS or name in _ROW_OPS or name in ("sum", "mean"):
            src = node.args[0]
            if isinstance(src, (list, tuple)):
                stack.extend(a for a in src if isinstance(a, Node))
            else:
                stack.append(src)
        elif name in ("add", "sub"):
            stack.extend(a for a in node.args[:2] if isinstance(a, Node) and last_dim(a) == hidden)
        elif name in ("mul", "div"):
            wide = [a for a in node.args[:2] if isinstance(a, Node) and not _is_per_row(a, hidden)]
            if len(wide) != 1:
                fail(node, "multiplies a stream branch elementwise by a non-scalar")
            stack.extend(wide)
        elif name in ("index_add", "scatter_add", "index_copy"):
            stack.extend([node.args[0], node.args[3] if len(node.args) > 3 else node.kwargs.get("source")])
        elif name in ("index_put",):
            stack.extend([node.args[0], node.args[2]])
        elif name == "copy":
            stack.extend([node.args[0], node.args[1]])
        else:
            fail(node, "is on a branch added to the stream and is not a linear, a row op or a sum")
    return found


# ----------------------------------------------------------------------------------------------
# decoder blocks, attention, MoE
# ----------------------------------------------------------------------------------------------

@dataclass
class Attention:
    """One attention: the SDPA node, its q/k/v/o linears and the KV-cache concatenations.

    `q_in`/`k_in`/`v_in` are SDPA's inputs ([B, heads, S, d]); `k_new`/`v_new` the fresh keys/values
    (after RoPE) that `k_cache`/`v_cache` (cat([past, new], -2)) append to the cache, when found.
    `v_simple` is True when v_proj's output reaches SDPA by a plain per-head reshape (R2 can be folded).
    """

    sdpa: Node
    q_in: Node
    k_in: Node
    v_in: Node
    q_proj: list[LinearUse] = field(default_factory=list)
    k_proj: list[LinearUse] = field(default_factory=list)
    v_proj: list[LinearUse] = field(default_factory=list)
    o_proj: LinearUse | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    v_head_dim: int | None = None
    k_cache: Node | None = None
    v_cache: Node | None = None
    k_new: Node | None = None
    v_new: Node | None = None
    rope: bool = False
    v_simple: bool = False
    o_simple: bool = False


@dataclass
class MoE:
    """A mixture-of-experts MLP: its router, routed experts (fused 3-D or per-expert), shared experts."""

    router: LinearUse
    experts: list[LinearUse] = field(default_factory=list)  # every expert matmul (fused or per-expert)
    expert_down: list[LinearUse] = field(default_factory=list)
    shared: list[LinearUse] = field(default_factory=list)  # dense linears of shared experts (incl. their gate)
    shared_down: list[LinearUse] = field(default_factory=list)
    num_experts: int | None = None
    top_k: int | None = None


@dataclass
class Part:
    """One branch of a decoder block between reading the stream and adding back into it."""

    kind: str  # "attention" | "mlp" | "moe"
    add: Node
    norm: Norm | None
    readers: list[LinearUse]
    writers: list[LinearUse]
    attention: Attention | None = None
    moe: MoE | None = None


@dataclass
class Block:
    index: int
    attention: Part | None = None
    mlp: Part | None = None


def _ancestors(node: Node, stop: set[Node]) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        stack.extend(_flat_nodes((n.args, n.kwargs)))
    return seen


def _linears_behind(node: Node) -> list[LinearUse]:
    """The nearest linears upstream of `node` (stopping at each one found)."""
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
            stack.extend(_flat_nodes((n.args, n.kwargs)))
    return sorted(found, key=lambda u: _order(u.node))


def _heads_from(node: Node) -> tuple[int | None, int | None]:
    s = shape(node)
    try:
        return int(s[1]), int(s[-1])
    except (TypeError, ValueError, IndexError):
        return None, None


_PLAIN_OPS = {"view", "reshape", "_unsafe_view", "transpose", "unsqueeze", "expand", "contiguous", "clone",
              "permute", "cat", *_CAST_OPS}


def _plain_path(start: Node, end: Node, limit: int = 12) -> list[Node] | None:
    """A path start -> ... -> end through view/transpose/cast/expand/cat ops only (searched forward), or None."""
    stack = [(start, [start])]
    while stack:
        node, path = stack.pop()
        if node is end:
            return path
        if len(path) > limit:
            continue
        for user in tensor_users(node):
            if user is end or (user.op == "call_function" and op_name(user) in _PLAIN_OPS):
                stack.append((user, path + [user]))
    return None


def _cache_cat(node: Node) -> tuple[Node | None, Node | None]:
    """Walk back from an SDPA k/v input through GQA expand/reshape to cat([past, new], -2)."""
    cur = node
    for _ in range(8):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return None, None
        name = op_name(cur)
        if name == "cat" and len(cur.args[0]) == 2 and cur.args[1] in (-2, 2):
            return cur, cur.args[0][1]
        if name in _CAST_OPS or name in ("reshape", "view", "expand", "unsqueeze", "_unsafe_view", "contiguous"):
            cur = cur.args[0]
            continue
        return None, None
    return None, None


def attention_at(sdpa: Node, readers: list[LinearUse], writers: list[LinearUse]) -> Attention:
    """Describe the attention around one SDPA node."""
    q_in, k_in, v_in = sdpa.args[:3]
    att = Attention(sdpa=sdpa, q_in=q_in, k_in=k_in, v_in=v_in)
    att.num_heads, att.head_dim = _heads_from(q_in)
    kv_heads, att.v_head_dim = _heads_from(v_in)
    att.k_cache, att.k_new = _cache_cat(k_in)
    att.v_cache, att.v_new = _cache_cat(v_in)
    if att.k_cache is not None:
        att.num_kv_heads = _heads_from(att.k_cache)[0]
    att.q_proj = _linears_behind(q_in)
    att.k_proj = _linears_behind(k_in)
    att.v_proj = _linears_behind(v_in)
    att.rope = any(op_name(n) in ("neg", "sin", "cos") for n in _ancestors(q_in, {u.node for u in att.q_proj}))
    outs = [w for w in writers if sdpa in _ancestors(w.input, {sdpa})]
    att.o_proj = outs[0] if len(outs) == 1 else None
    if len(att.v_proj) == 1 and att.v_proj[0].expert is None and val(att.v_proj[0].weight).dim() == 2:
        path = _plain_path(att.v_proj[0].node, v_in)
        att.v_simple = path is not None and all(last_dim(n) == att.v_head_dim for n in path[2:])
        if att.v_simple and att.v_cache is not None:
            att.num_kv_heads = _heads_from(att.v_cache)[0]
    if att.o_proj is not None:
        path = _plain_path(sdpa, att.o_proj.input)
        att.o_simple = path is not None and att.o_proj.in_features() == (att.num_heads or 0) * (att.v_head_dim or 0)
    return att


def _moe_in(readers: list[LinearUse], writers: list[LinearUse], stop: set[Node]) -> MoE | None:
    """A router (reader whose output goes through topk) plus the experts it dispatches to."""
    routers = []
    for r in readers:
        down = _descendants(r.node, limit=12)
        if any(op_name(n) == "topk" for n in down):
            routers.append(r)
    if not routers:
        return None
    router = routers[0]
    moe = MoE(router=router, num_experts=router.out_features())
    grouped = [r for r in readers if r.kind == "grouped_mm" or r.expert is not None]
    moe.experts = grouped + [w for w in writers if w.kind == "grouped_mm" or w.expert is not None]
    moe.expert_down = [w for w in writers if w.kind == "grouped_mm" or w.expert is not None]
    # per-expert nn.Linear experts: writers whose output is scaled by routing weights downstream of topk
    topk_nodes = [n for n in _descendants(router.node, limit=12) if op_name(n) == "topk"]
    if topk_nodes:
        k = max(topk_nodes, key=_order).args[1]
        moe.top_k = int(k) if isinstance(k, int) else None
    routed_linear = []
    for w in writers:
        if w in moe.expert_down:
            continue
        anc = _ancestors(w.node, stop | {router.node})
        if any(op_name(a) == "topk" for a in anc) or router.node in anc:
            routed_linear.append(w)
    moe.expert_down += routed_linear
    dense_readers = [r for r in readers if r is not router and r not in grouped]
    for r in dense_readers:
        anc = _ancestors(r.node, stop | {router.node})
        if router.node in anc or any(op_name(a) == "topk" for a in anc):
            moe.experts.append(r)
        else:
            moe.shared.append(r)
    for w in writers:
        if w not in moe.expert_down:
            moe.shared_down.append(w)
            moe.shared.append(w)
    moe.experts += routed_linear
    return moe


def _descendants(node: Node, limit: int = 50) -> list[Node]:
    out, frontier = [], [node]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in out:
                    out.append(u)
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            break
    return out


def _norm_of(stream: ResidualStream, readers: list[LinearUse], segment: int) -> Norm | None:
    """The stream norm of `segment` whose output reaches these readers (through row ops and casts)."""
    inputs = {r.input for r in readers}
    for norm in stream.norms:
        if stream.segment.get(norm.input) != segment:
            continue
        stack, seen = [norm.output], set()
        while stack:
            node = stack.pop()
            if node in inputs:
                return norm
            for user in tensor_users(node):
                if user not in seen and user.op == "call_function" and (op_name(user) in _ROW_OPS or op_name(user) in _CAST_OPS):
                    seen.add(user)
                    stack.append(user)
    return None


def decoder_blocks(gm: GraphModule, stream: ResidualStream | None = None) -> list[Block]:
    """Split the stream into blocks: each residual add closes one part (attention, MLP or MoE)."""
    stream = stream or residual_stream(gm, strict=False)
    sdpas = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]
    parts: list[Part] = []
    for i, add in enumerate(stream.adds):
        writers = [w for w in stream.writers if stream.writer_segment.get(w.node) == i]
        readers = [r for r in stream.readers if stream.segment[r.input] == i]
        # readers of this segment that feed this add's writers (not readers of a later final norm)
        branch = next(a for a in add.args[:2] if isinstance(a, Node) and a not in stream.nodes)
        writer_anc = _ancestors(branch, stream.nodes)
        readers = [r for r in readers if r.node in writer_anc]
        norm = _norm_of(stream, readers, i)
        sdpa = next((s for s in sdpas if s in writer_anc), None)
        if sdpa is not None:
            part = Part("attention", add, norm, readers, writers, attention=attention_at(sdpa, readers, writers))
        else:
            moe = _moe_in(readers, writers, stream.nodes)
            part = Part("moe" if moe else "mlp", add, norm, readers, writers, moe=moe)
        parts.append(part)
    blocks: list[Block] = []
    for part in parts:
        if part.kind == "attention" or not blocks or blocks[-1].mlp is not None:
            blocks.append(Block(index=len(blocks)))
        if part.kind == "attention":
            blocks[-1].attention = part
        else:
            blocks[-1].mlp = part
    return blocks


def attentions(gm: GraphModule, stream: ResidualStream | None = None) -> list[Attention]:
    return [b.attention.attention for b in decoder_blocks(gm, stream) if b.attention and b.attention.attention]


def moe_blocks(gm: GraphModule, stream: ResidualStream | None = None) -> list[MoE]:
    return [b.mlp.moe for b in decoder_blocks(gm, stream) if b.mlp and b.mlp.moe]


def down_projections(gm: GraphModule, stream: ResidualStream | None = None) -> list[LinearUse]:
    """Every MLP down projection (dense, shared expert, each routed expert / fused expert tensor)."""
    out = []
    for block in decoder_blocks(gm, stream):
        if block.mlp is not None:
            out.extend(block.mlp.writers)
    return out


def final_readers(stream: ResidualStream) -> list[LinearUse]:
    """Readers after the last residual add (the LM head)."""
    last = len(stream.adds)
    return [r for r in stream.readers if stream.segment[r.input] == last]


# --- quantize helper ---
# (owned by the quantize pass's author: queries the quantize pass needs that the sections above lack)

@dataclass
class CacheWrite:
    """One layer's KV-cache append: `cat` = cat([past, new], -2) returned as a present key/value."""

    cat: Node
    new: Node  # the fresh entry (keys after RoPE and any online Hadamard; values)
    kind: str  # "key" | "value"
    layer: int


def cache_writes(gm: GraphModule) -> list[CacheWrite]:
    """Where keys and values are written to the cache, found from the captured causal-LM signature.

    fxpress captures causal LMs as (input_ids, past_keys, past_values) -> (logits, present_keys,
    present_values), each present a stack over layers of cat([past, new], -2). Returns [] for graphs
    without that signature (encoders, plain modules).
    """
    output = next((n for n in gm.graph.nodes if n.op == "output"), None)
    results = output.args[0] if output is not None else None
    if not isinstance(results, (tuple, list)) or len(results) != 3:
        return []
    found: list[CacheWrite] = []
    for kind, stacked in (("key", results[1]), ("value", results[2])):
        if not is_op(stacked, aten.stack):
            continue
        for layer, entry in enumerate(stacked.args[0]):
            cat, new = _cache_cat(entry)
            if cat is not None and isinstance(new, Node):
                found.append(CacheWrite(cat, new, kind, layer))
    return found


# ==============================================================================================
# Sections appended by other helpers go below this line, each under its own marked header.
# ==============================================================================================


# --- quantize_experts helper ---
# (owned by the quantize_experts pass's author: MoE structure as routing data meets it)

@dataclass
class RoutedExpert:
    """One expert in per-expert form: the linears reading the tokens, its down projection, its weight."""

    up: list[LinearUse]
    down: LinearUse
    weight: Node  # the per-token routing weight that multiplies the expert's output


@dataclass
class ExpertLayer:
    """One MoE layer: router, routed experts (fused 3-D or per-expert linears), shared experts.

    Fused form (transformers 5 `grouped_mm`): `up` are the 3-D matmuls reading the rows routed to the
    experts (sorted by expert), `down` the one writing back, `offsets` the cumulative rows per expert,
    `row_weights` the routing weight of each sorted row. Per-expert form: `experts`.
    `expert_ids` is the flat tensor of chosen experts ([tokens * top_k]) when it can be found.
    """

    index: int
    router: LinearUse
    input: Node  # the hidden states [tokens, hidden] the router reads
    num_experts: int
    fused: bool
    up: list[LinearUse] = field(default_factory=list)
    down: LinearUse | None = None
    offsets: Node | None = None
    row_weights: Node | None = None
    expert_ids: Node | None = None
    experts: list[RoutedExpert] = field(default_factory=list)
    shared: list[LinearUse] = field(default_factory=list)  # shared-expert linears
    gates: list[LinearUse] = field(default_factory=list)  # other small gates (e.g. a shared-expert gate)

    def linears(self) -> list[LinearUse]:
        """Every routed-expert matmul of the layer (fused nodes, or each expert's linears)."""
        if self.fused:
            return [*self.up, self.down]
        return [u for e in self.experts for u in (*e.up, e.down)]


_PASS_THROUGH = (*_CAST_OPS, "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "expand")


def _root(node: Any) -> Any:
    """Strip casts and reshapes: the tensor a linear really reads."""
    while isinstance(node, Node) and node.op == "call_function" and op_name(node) in _PASS_THROUGH:
        node = node.args[0]
    return node


def _weight_operand(out: Node) -> Node | None:
    """The other factor of the `mul` that scales `out` (through casts): the routing weight."""
    stack = [out]
    for _ in range(4):
        nxt = []
        for n in stack:
            for u in tensor_users(n):
                if op_name(u) == "mul" and len(u.args) == 2:
                    other = u.args[1] if _root(u.args[0]) is n or u.args[0] is n else u.args[0]
                    if isinstance(other, Node):
                        return other
                if op_name(u) in _CAST_OPS:
                    nxt.append(u)
        stack = nxt
    return None


def _nearest_topk_above(node: Node) -> Node | None:
    found = [a for a in _ancestors(node, set()) if a.op == "call_function" and op_name(a) == "topk"]
    return max(found, key=_order) if found else None


def _router_above(node: Node) -> LinearUse | None:
    """The last linear upstream of a routing tensor (the router)."""
    found = _linears_behind(node)
    return found[-1] if found else None


def _shared_linears(gm: GraphModule, layer: ExpertLayer, routed: set[Node]) -> None:
    """Dense linears reading the MoE input, and the ones reading their outputs, are shared experts."""
    root = _root(layer.input)
    readers = []
    for use in linear_uses(gm.graph):
        if use.node in routed or use.node is layer.router.node or use.kind == "grouped_mm":
            continue
        if _root(use.input) is root:
            readers.append(use)
    reader_nodes = {u.node for u in readers}
    downs = []
    for use in linear_uses(gm.graph):
        if use.node in routed or use.node in reader_nodes:
            continue
        behind = _linears_behind(use.input)
        if behind and all(b.node in reader_nodes for b in behind):
            downs.append(use)
    for use in readers + downs:
        small = use.out_features() < 8  # a scalar gate on the shared expert's output
        (layer.gates if small else layer.shared).append(use)
    layer.shared.sort(key=lambda u: _order(u.node))


def expert_layers(gm: GraphModule) -> list[ExpertLayer]:
    """Every MoE layer in graph order, in either form, found from data flow alone.

    Fused: grouped matmuls that share one offsets tensor; the last one is the down projection.
    Per-expert: linears whose output is scaled by a tensor computed from a `topk` (routing weights).
    """
    layers: list[ExpertLayer] = []
    groups: dict[Node, list[LinearUse]] = {}
    for node in gm.graph.nodes:
        use = linear_use(node)
        if use is not None and use.kind == "grouped_mm" and use.expert is None:
            offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
            if isinstance(offs, Node):
                groups.setdefault(offs, []).append(use)
    for offs, uses in groups.items():
        uses.sort(key=lambda u: _order(u.node))
        router = _router_above(offs)
        if router is None or len(uses) < 2:
            continue
        sort = next((a for a in sorted(_ancestors(offs, set()), key=_order, reverse=True) if op_name(a) == "sort"), None)
        layers.append(ExpertLayer(
            index=0, router=router, input=router.input, num_experts=int(val(uses[0].weight).shape[0]), fused=True,
            up=uses[:-1], down=uses[-1], offsets=offs, row_weights=_weight_operand(uses[-1].node),
            expert_ids=sort.args[0] if sort is not None else None,
        ))
    per_expert: dict[Node, list[RoutedExpert]] = {}
    for use in linear_uses(gm.graph):
        if use.kind == "grouped_mm":
            continue
        weight = _weight_operand(use.node)
        topk = _nearest_topk_above(weight) if weight is not None else None
        if topk is None or topk in _ancestors(use.node, set()):
            continue
        router = _router_above(weight)
        if router is None:
            continue
        up = [u for u in _linears_behind(use.input) if u.node is not router.node]
        per_expert.setdefault(router.node, []).append(RoutedExpert(up=up, down=use, weight=weight))
    for experts in per_expert.values():
        router = _router_above(experts[0].weight)
        layers.append(ExpertLayer(index=0, router=router, input=router.input, num_experts=len(experts),
                                  fused=False, experts=experts))
    layers.sort(key=lambda layer: _order(layer.router.node))
    for i, layer in enumerate(layers):
        layer.index = i
        _shared_linears(gm, layer, {u.node for u in layer.linears()})
    return layers


def subgraph_function(gm: GraphModule, inputs: list[Node], output: Node) -> GraphModule:
    """A GraphModule computing `output` from `inputs` (e.g. an expert's activation between its matmuls).

    Raises GraphPatternError if `output` depends on anything other than `inputs` and parameters.
    """
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"in_{i}")
    needed = _ancestors(output, set(inputs))
    for node in gm.graph.nodes:
        if node not in needed or node in env:
            continue
        if node.op == "placeholder":
            raise GraphPatternError(f"'{output.name}' depends on graph input '{node.name}', not only on {[n.name for n in inputs]}")
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    return GraphModule(gm, graph)
