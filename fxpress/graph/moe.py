"""Mixtures of experts: routers, routed experts (fused 3-D or per-expert linears) and shared experts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule, Node

from fxpress.graph.linears import LinearUse, linear_uses, linears_behind
from fxpress.graph.nodes import (
    CAST_OPS,
    ancestors,
    calls,
    descendants,
    is_cast,
    op_name,
    position,
    tensor_users,
    val,
)


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


def moe_at(readers: list[LinearUse], writers: list[LinearUse], stop: set[Node]) -> MoE | None:
    """A router (reader whose output goes through topk) plus the experts it dispatches to."""
    routers = []
    for r in readers:
        down = descendants(r.node, depth=12)
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
    topk_nodes = [n for n in descendants(router.node, depth=12) if op_name(n) == "topk"]
    if topk_nodes:
        k = max(topk_nodes, key=position).args[1]
        moe.top_k = int(k) if isinstance(k, int) else None
    routed_linear = []
    for w in writers:
        if w in moe.expert_down:
            continue
        anc = ancestors(w.node, stop | {router.node})
        if any(op_name(a) == "topk" for a in anc) or router.node in anc:
            routed_linear.append(w)
    moe.expert_down += routed_linear
    dense_readers = [r for r in readers if r is not router and r not in grouped]
    for r in dense_readers:
        anc = ancestors(r.node, stop | {router.node})
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


_PASS_THROUGH = (*CAST_OPS, "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "expand")


def _root(node: Any) -> Any:
    """Strip casts and reshapes: the tensor a linear really reads."""
    while calls(node, _PASS_THROUGH):
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
                if is_cast(u):
                    nxt.append(u)
        stack = nxt
    return None


def _nearest_topk_above(node: Node) -> Node | None:
    found = [a for a in ancestors(node) if a.op == "call_function" and op_name(a) == "topk"]
    return max(found, key=position) if found else None


def _router_above(node: Node) -> LinearUse | None:
    """The last linear upstream of a routing tensor (the router)."""
    found = linears_behind(node)
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
        behind = linears_behind(use.input)
        if behind and all(b.node in reader_nodes for b in behind):
            downs.append(use)
    for use in readers + downs:
        small = use.out_features() < 8  # a scalar gate on the shared expert's output
        (layer.gates if small else layer.shared).append(use)
    layer.shared.sort(key=lambda u: position(u.node))


def _fused_layers(gm: GraphModule) -> list[ExpertLayer]:
    """Grouped matmuls that share one offsets tensor form a layer; the last one is the down projection."""
    layers: list[ExpertLayer] = []
    groups: dict[Node, list[LinearUse]] = {}
    for use in linear_uses(gm.graph):
        if use.kind == "grouped_mm" and use.expert is None:
            offs = use.node.args[2] if len(use.node.args) > 2 else use.node.kwargs.get("offs")
            if isinstance(offs, Node):
                groups.setdefault(offs, []).append(use)
    for offs, uses in groups.items():
        uses.sort(key=lambda u: position(u.node))
        router = _router_above(offs)
        if router is None or len(uses) < 2:
            continue
        sort = next((a for a in sorted(ancestors(offs), key=position, reverse=True) if op_name(a) == "sort"), None)
        layers.append(ExpertLayer(
            index=0, router=router, input=router.input, num_experts=int(val(uses[0].weight).shape[0]), fused=True,
            up=uses[:-1], down=uses[-1], offsets=offs, row_weights=_weight_operand(uses[-1].node),
            expert_ids=sort.args[0] if sort is not None else None,
        ))
    return layers


def _per_expert_layers(gm: GraphModule) -> list[ExpertLayer]:
    """Linears whose output is scaled by a tensor computed from a `topk` (routing weights), grouped by router."""
    per_expert: dict[Node, list[RoutedExpert]] = {}
    for use in linear_uses(gm.graph):
        if use.kind == "grouped_mm":
            continue
        weight = _weight_operand(use.node)
        topk = _nearest_topk_above(weight) if weight is not None else None
        if topk is None or topk in ancestors(use.node):
            continue
        router = _router_above(weight)
        if router is None:
            continue
        up = [u for u in linears_behind(use.input) if u.node is not router.node]
        per_expert.setdefault(router.node, []).append(RoutedExpert(up=up, down=use, weight=weight))
    layers = []
    for experts in per_expert.values():
        router = _router_above(experts[0].weight)
        layers.append(ExpertLayer(index=0, router=router, input=router.input, num_experts=len(experts),
                                  fused=False, experts=experts))
    return layers


def expert_layers(gm: GraphModule) -> list[ExpertLayer]:
    """Every MoE layer in graph order, in either form, found from data flow alone."""
    layers = sorted(_fused_layers(gm) + _per_expert_layers(gm), key=lambda layer: position(layer.router.node))
    for i, layer in enumerate(layers):
        layer.index = i
        _shared_linears(gm, layer, {u.node for u in layer.linears()})
    return layers
