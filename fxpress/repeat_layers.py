"""Capture a deep causal LM in seconds: torch.export three decoder layers, then repeat the third in the graph.

torch.export traces every layer (about 0.45 s each for SmolLM2 on one core: 14 s for 30 layers, 36 s for 80).
When the decoder layers are copies of one another (same classes, attributes, tensor shapes), the graph of
layer i >= 2 is that of layer 2 with its own weights and cache slot. So the model is exported with its first
three layers, and the nodes of the third ("unit": the layer's nodes and the cache reads only it uses) are
copied for layers 3..n-1, each wired to the previous copy where layer 2 reads layer 1, and to layer i's own
tensors. Any structural doubt (layers that differ, units of different shapes) returns None and the caller
exports the whole model; with real weights the caller also checks the grown graph against the eager model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from fxpress.checks import module_tensors

KEEP = 3  # layers exported: 0 and 1 fix how a layer reads the one before it, 2 is the one repeated
SCALARS = (bool, int, float, str, type(None))
SIZES = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList] | None:
    """The one ModuleList of `num_layers` modules (the decoder layers) and its dotted name, or None."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    return found[0] if len(found) == 1 else None


def _signature(layer: nn.Module) -> list[Any]:
    """What a layer's forward can depend on, but its index and tensor values: classes, scalar attributes, shapes."""
    out: list[Any] = []
    for name, module in layer.named_modules():
        attrs = sorted((k, v) for k, v in vars(module).items()
                       if not k.startswith("_") and k not in ("layer_idx", "training") and _scalar(v))
        out.append((name, type(module).__qualname__, attrs))
    out += [(name, tuple(t.shape), t.dtype) for name, t in module_tensors(layer)]
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, SCALARS) or (isinstance(value, tuple) and all(isinstance(v, SCALARS) for v in value))


def _per_layer_config(config: Any, num_layers: int) -> dict[str, list]:
    """Config entries with one value per layer (e.g. `layer_types`)."""
    return {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == num_layers}


def repeatable(model: nn.Module, layers: nn.ModuleList) -> bool:
    """Layers 2.. are copies of layer 1 in everything but their weights, so one of them can stand for all."""
    n = len(layers)
    if n <= KEEP:
        return False
    per_layer = _per_layer_config(getattr(model, "config", None) or object(), n)
    if any(any(v != values[1] for v in values[1:]) for values in per_layer.values()):
        return False
    reference = _signature(layers[1])
    return all(_signature(layers[i]) == reference for i in range(2, n))


@contextlib.contextmanager
def truncated(model: nn.Module, name: str, layers: nn.ModuleList) -> Iterator[None]:
    """The model with its first KEEP layers only (and its config saying so); restored on exit."""
    *path, attr = name.split(".")
    parent = model.get_submodule(".".join(path)) if path else model
    config = model.config
    saved = {k: v for k, v in vars(config).items() if k == "num_hidden_layers"}
    saved.update(_per_layer_config(config, len(layers)))
    setattr(parent, attr, nn.ModuleList(list(layers)[:KEEP]))
    for k, v in saved.items():
        setattr(config, k, KEEP if k == "num_hidden_layers" else type(v)(v[:KEEP]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)
        for k, v in saved.items():
            setattr(config, k, v)


# --- the graph ---------------------------------------------------------------------------------------
def _index_in(path: str, prefix: str) -> int | None:
    if not path.startswith(prefix):
        return None
    head = path[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _owner(node: Node, prefix: str) -> int | None:
    """The layer a node computes in (its module stack) or reads (a get_attr of its weights)."""
    if node.op == "get_attr":
        return _index_in(str(node.target), prefix)
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        index = _index_in(path, prefix)
        if index is not None:
            return index
    return None


def _units(gm: GraphModule, prefix: str) -> list[list[Node]]:
    """Each exported layer's tensor nodes, plus those outside it that only it uses (its cache reads), in graph order."""
    owner: dict[Node, int] = {}
    # sizes the tracer computes once and reuses in later layers are shared, whichever layer computed them
    sizes = {n for n in gm.graph.nodes if isinstance(n.meta.get("val"), SIZES)}
    for node in gm.graph.nodes:
        index = None if node in sizes else _owner(node, prefix)
        if index is not None:
            owner[node] = index
    for node in reversed(gm.graph.nodes):
        if node in owner or node in sizes or node.op in ("placeholder", "output") or not node.users:
            continue
        users = {owner.get(u) for u in node.users}
        if len(users) == 1 and None not in users:
            owner[node] = users.pop()
    return [[n for n in gm.graph.nodes if owner.get(n) == i] for i in range(KEEP)]


class _Template:
    """Layer 2's unit, checked against layer 1's node by node: which arguments are same-layer nodes, which are
    the previous layer's (by position in its unit), which are shared, and which integers are the layer index."""

    def __init__(self, units: list[list[Node]], prefix: str):
        self.prefix = prefix
        self.units = units
        self.position = [{node: p for p, node in enumerate(unit)} for unit in units]

    def matches(self) -> bool:
        if len(self.units[1]) != len(self.units[2]):
            return False
        return all(self._same(a, b) for a, b in zip(self.units[1], self.units[2]))

    def _same(self, a: Node, b: Node) -> bool:
        if a.op != b.op or a.op in ("placeholder", "output", "call_module"):
            return False
        if a.op == "get_attr":
            if _index_in(str(a.target), self.prefix) is not None:
                return self.retarget(str(a.target), 2) == b.target
            return True  # a constant of the cache reads (torch.export's lifted empty tensors): same for every layer
        return a.target == b.target and self._args(a.args, b.args) and self._args(a.kwargs, b.kwargs)

    def _args(self, x: Any, y: Any) -> bool:
        if isinstance(x, Node) or isinstance(y, Node):
            return isinstance(x, Node) and isinstance(y, Node) and self._same_source(x, y)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(self._args(p, q) for p, q in zip(x, y))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(self._args(x[k], y[k]) for k in x)
        return x == y or self._is_index(x, y)

    def _same_source(self, x: Node, y: Node) -> bool:
        """Layer 2 reads `y` where layer 1 reads `x`: its own counterpart of x, the same kind of node of the layer
        before (layer 0 may have extra nodes, so not by position), or the same shared node (a size that the
        tracer computed once in layer 1 and reused)."""
        if x is y:
            return True
        if x in self.position[1]:
            return self.units[2][self.position[1][x]] is y
        if x in self.position[0]:
            return y in self.position[1] and (x.op, x.target) == (y.op, y.target)
        return x is y

    @staticmethod
    def _is_index(x: Any, y: Any) -> bool:
        return type(x) is int and type(y) is int and (x, y) == (1, 2)

    def retarget(self, target: str, layer: int) -> str:
        return _in_layer(target, self.prefix, layer)

    def copy(self, gm: GraphModule, layer: int, previous: dict[Node, Node], tensors: nn.Module) -> dict[Node, Node]:
        """Layer `layer`'s unit inserted at the graph's insertion point; `previous` maps layer 2's nodes to the
        layer before's. Returns the map from layer 2's nodes to the new ones."""
        new: dict[Node, Node] = {}

        def arg(x: Any, y: Any) -> Any:  # x: layer 1's argument, y: layer 2's
            if isinstance(y, Node):
                if y in self.position[2]:
                    return new[y]
                if y in self.position[1] and y is not x:  # the layer before's: layer 2's counterpart, as the previous copy has it
                    twin = self.units[2][self.position[1][y]]
                    return previous.get(twin, twin)
                return y
            if isinstance(y, (list, tuple)):
                return type(y)(arg(p, q) for p, q in zip(x, y))
            if isinstance(y, dict):
                return {k: arg(x[k], y[k]) for k in y}
            return layer if self._is_index(x, y) else y

        for a, b in zip(self.units[1], self.units[2]):
            if b.op == "get_attr" and _index_in(str(b.target), self.prefix) is None:
                new[b] = b  # a constant of the cache reads: every layer's copy reads the same one
                continue
            if b.op == "get_attr":
                target = self.retarget(str(b.target), layer)
                _attach(gm, target, tensors, target[len(self.prefix):].split(".", 1)[1])
                node = gm.graph.get_attr(target)
            else:
                node = gm.graph.create_node(b.op, b.target, arg(a.args, b.args), arg(a.kwargs, b.kwargs))
            node.meta = {k: _renumber(v, self.prefix, layer) if k == "nn_module_stack" else v
                         for k, v in b.meta.items()}
            new[b] = node
        return new


def _in_layer(path: str, prefix: str, layer: int) -> str:
    """`path` with its layer index (the part after `prefix`) replaced by `layer`; unchanged outside the layers."""
    index = _index_in(path, prefix)
    return path if index is None else f"{prefix}{layer}{path[len(prefix) + len(str(index)):]}"


def _renumber(stack: dict, prefix: str, layer: int) -> dict:
    return {k.replace(f"{prefix}2", f"{prefix}{layer}", 1): (_in_layer(p, prefix, layer), t) for k, (p, t) in stack.items()}


def _attach(gm: GraphModule, target: str, layer_module: nn.Module, name_in_layer: str) -> None:
    """Put layer i's own tensor at `target` in the graph module (as torch.export does: the same tensor object)."""
    *path, attr = target.split(".")
    owner: nn.Module = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    *inner, leaf = name_in_layer.split(".")
    source = layer_module.get_submodule(".".join(inner)) if inner else layer_module
    value = getattr(source, leaf)
    if leaf in source._parameters:
        owner.register_parameter(attr, value)
    else:
        owner.register_buffer(attr, value)


def grow(gm: GraphModule, prefix: str, layers: nn.ModuleList) -> bool:
    """Turn a graph of layers 0..2 into one of all `layers` in place; False (graph untouched) if it cannot."""
    units = _units(gm, prefix)
    template = _Template(units, prefix)
    if not template.matches():
        return False
    last = units[2]
    outside = {b: [u for u in b.users if u not in template.position[2]] for b in last}
    anchor = [n for n in gm.graph.nodes if n in template.position[2]][-1].next
    copies: list[dict[Node, Node]] = []
    previous: dict[Node, Node] = {}
    with gm.graph.inserting_before(anchor):
        for layer in range(KEEP, len(layers)):
            previous = template.copy(gm, layer, previous, layers[layer])
            copies.append(previous)
    counterpart = {b: units[1][template.position[2][b]] for b in last}
    for b, users in outside.items():
        for user in users:
            user.args = _rewire(user.args, b, counterpart[b], copies)
            user.kwargs = _rewire(user.kwargs, b, counterpart[b], copies)
    _resize_stacked(gm, len(layers))
    _drop_guards(gm)
    gm.graph.lint()
    gm.recompile()
    return True


def _rewire(value: Any, b: Node, before: Node, copies: list[dict[Node, Node]]) -> Any:
    """A list holding every layer's value ([.., layer 1's, layer 2's]) gets the copies' appended after layer 2's;
    any other use of layer 2's value now reads the last layer's."""
    if isinstance(value, (list, tuple)):
        items = list(value)
        if b in items and items.index(b) > 0 and items[items.index(b) - 1] is before:
            at = items.index(b) + 1
            items[at:at] = [c[b] for c in copies]
            return type(value)(items)
        return type(value)(_rewire(v, b, before, copies) for v in value)
    if isinstance(value, dict):
        return {k: _rewire(v, b, before, copies) for k, v in value.items()}
    return copies[-1][b] if value is b else value


def _resize_stacked(gm: GraphModule, num_layers: int) -> None:
    """The stacked cache inputs and outputs say KEEP layers in their fake values: make them say all."""
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    stacked = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    stacked += [n for n in (outputs if isinstance(outputs, (list, tuple)) else [outputs])[1:] if isinstance(n, Node)]
    for node in stacked:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == KEEP:
            mode = getattr(value, "fake_mode", None)
            with mode if mode is not None else contextlib.nullcontext():
                node.meta["val"] = value.new_empty((num_layers, *value.shape[1:]))


def _drop_guards(gm: GraphModule) -> None:
    """torch.export's guard function and input check hold the 3-layer shapes; the Program checks its inputs."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    if hasattr(gm, "validate_inputs"):
        gm.validate_inputs = False
