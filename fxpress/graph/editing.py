"""Editing a graph and its module: read, replace, add and drop parameters; insert calls; cut out a subgraph."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from fxpress.graph.nodes import GraphPatternError, ancestors, val
from fxpress.weights import is_placeholder, placeholder, require_store, weight_store


def _resolve(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, name = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def get_param(gm: torch.nn.Module, node_or_target: Node | str) -> torch.Tensor:
    """The tensor behind a get_attr node (or its dotted target); a store-backed weight is read from the store."""
    target = str(node_or_target.target if isinstance(node_or_target, Node) else node_or_target)
    owner, name = _resolve(gm, target)
    value = getattr(owner, name)
    return require_store(gm, target).get(target) if is_placeholder(value) else value


def is_stored(gm: torch.nn.Module, target: str) -> bool:
    """Whether the attribute `target` is a placeholder whose value lives in the module's weight store."""
    owner, name = _resolve(gm, target)
    return is_placeholder(getattr(owner, name, None))


def read_is_private(gm: torch.nn.Module, target: str) -> bool:
    """Whether `get_param(gm, target)` hands back a tensor nothing else holds (a stored weight read from disk, not
    the overlay's, which clones of the store share): a pass that replaces the weight may then overwrite it."""
    store = weight_store(gm)
    return is_stored(gm, target) and store is not None and not store.in_memory(target)


def store_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Put `value` (as is, any dtype) behind the attribute `target`, keeping its kind: parameter, buffer or plain.

    In a store-backed module the value goes to the store and the attribute becomes its placeholder.
    """
    owner, name = _resolve(gm, target)
    store = weight_store(gm)
    if store is not None and not is_placeholder(value):
        store.set(target, value)
        value = placeholder(value.shape, value.dtype)
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
    device = "cpu" if is_placeholder(old) else old.device
    store_tensor(gm, str(target), value.detach().to(dtype=old.dtype, device=device).contiguous())
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
    store = weight_store(gm)
    if store is not None:  # a store-backed module keeps every weight in its store
        store.set(unique, value)
        value = placeholder(value.shape, value.dtype)
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
        store = weight_store(gm)
        if store is not None:
            store.drop(str(node.target))


def insert_before_use(gm: GraphModule, user: Node, arg: Node, target: Any, extra_args: tuple = ()) -> Node:
    """Insert `target(arg, *extra_args)` just before `user` and make only `user` read it."""
    with gm.graph.inserting_before(user):
        new = gm.graph.call_function(target, (arg, *extra_args), {})
    if "val" in arg.meta:
        new.meta["val"] = arg.meta["val"]
    user.replace_input_with(arg, new)
    return new


def subgraph_function(gm: GraphModule, inputs: list[Node], output: Node) -> GraphModule:
    """A GraphModule computing `output` from `inputs` (e.g. an expert's activation between its matmuls).

    The piece holds its own tensors: a store-backed module's stored ones it reads are read into it, so it runs
    as `piece(*xs)` (its generated code reads attributes, not the store). Meant for small pieces.
    Raises GraphPatternError if `output` depends on anything other than `inputs` and parameters.
    """
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(f"in_{i}")
    needed = ancestors(output, set(inputs))
    for node in gm.graph.nodes:
        if node not in needed or node in env:
            continue
        if node.op == "placeholder":
            raise GraphPatternError(f"'{output.name}' depends on graph input '{node.name}', not only on {[n.name for n in inputs]}")
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    sub = GraphModule(gm, graph)
    for node in graph.nodes:
        if node.op == "get_attr" and is_stored(sub, str(node.target)):
            store_tensor(sub, str(node.target), get_param(gm, node))
    return sub
