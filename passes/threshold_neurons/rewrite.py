"""The graph edit of `threshold_neurons`: quantize -> `fxpress::threshold_linear` -> scale where linear(+relu) was."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxpress.graph import add_param, is_op
from fxpress.passes.threshold_neurons.plan import Plan

aten = torch.ops.aten
QUANT_TAG = "fxpress_threshold_quant"  # marks the input-quantizing nodes (the training copy rounds them with an STE)
INT_OUTPUT = "fxpress_threshold_int"  # on a layer's scale node: its integer output, read directly by a chained layer


def _quantized_input(gm: GraphModule, plan: Plan) -> Node:
    """The layer's integer input: a chain head quantizes its float input, a chained layer reads its producer's codes."""
    c = plan.cand
    x = c.linear.args[0]
    if not plan.head:
        return x.meta[INT_OUTPUT]
    with gm.graph.inserting_before(c.linear):
        d = gm.graph.call_function(aten.div.Tensor, (x, plan.input_scale))
        r = gm.graph.call_function(aten.round.default, (d,))
        q = gm.graph.call_function(aten.clamp.default, (r, plan.in_lo, plan.in_hi))
    for node in (d, r, q):
        node.meta[QUANT_TAG] = True
        if "val" in x.meta:
            node.meta["val"] = x.meta["val"]
    return q


def _erase_linear(gm: GraphModule, plan: Plan) -> None:
    """Remove the replaced linear(+relu) and the weights no other node reads."""
    c = plan.cand
    if c.relu is not None:
        gm.graph.erase_node(c.relu)
    weight_nodes = [a for a in c.linear.args[1:] if isinstance(a, Node)]
    gm.graph.erase_node(c.linear)
    for node in weight_nodes:
        if node.users:
            continue
        target = str(node.target)
        gm.graph.erase_node(node)
        owner, _, attr = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if hasattr(module, attr):
            delattr(module, attr)


def rewrite_layer(gm: GraphModule, plan: Plan) -> None:
    """Put quantize -> threshold_linear -> scale where linear(+relu) was; `plan.node` becomes the threshold node."""
    c = plan.cand
    q = _quantized_input(gm, plan)
    conn = add_param(gm, f"{c.name}.conn", plan.conn, before=c.linear, buffer=True)
    thr = add_param(gm, f"{c.name}.threshold", plan.threshold, before=c.linear, buffer=True)
    with gm.graph.inserting_before(c.linear):
        t = gm.graph.call_function(torch.ops.fxpress.threshold_linear.default, (q, conn, thr, c.relu is not None))
        y = gm.graph.call_function(aten.mul.Tensor, (t, plan.output_scale))
    for node in (t, y):
        if "val" in c.out.meta:
            node.meta["val"] = c.out.meta["val"]
    y.meta[INT_OUTPUT] = t
    c.out.replace_all_uses_with(y)
    _erase_linear(gm, plan)
    plan.node = t


def drop_dead_scales(gm: GraphModule) -> None:
    """Remove the scale nodes a chained layer bypassed (they have no users left)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and not node.users and is_op(node, aten.mul.Tensor):
            gm.graph.erase_node(node)
    gm.recompile()
