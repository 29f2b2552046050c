"""Quantize's embedding tables and LM head: packed RTN tables, a tied table stored once per bit width."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.passes.quantize.config import TableQuant, WeightQuant
from fxpress.passes.quantize.gptq import WeightSpec, rtn
from fxpress.runtime import embedding, quant  # noqa: F401  (define the fxpress ops)

LINEAR_NBIT = torch.ops.fxpress.linear_nbit.default
EMBEDDING_NBIT = torch.ops.fxpress.embedding_nbit.default


def select_tables(gm: GraphModule, tables: TableQuant) -> tuple[list[tuple[Node, Node]], list[G.LinearUse]]:
    """(embedding node, table get_attr) pairs when embedding_bits is set, and the LM heads when lm_head_bits
    is; a ConfigError, before any work, when the model has none."""
    lookups: list[tuple[Node, Node]] = []
    if tables.embedding_bits is not None:
        lookups = [(n, a) for n, a in G._find_embeddings(gm.graph) if n.args[0] is a and G.val(a).dim() == 2]
        if not lookups:
            raise ConfigError("quantize.tables.embedding_bits is set but the graph has no embedding lookup in a weight "
                              "table (aten.embedding): set embedding_bits=None for this model")
    heads = lm_heads(gm) if tables.lm_head_bits is not None else []
    if tables.lm_head_bits is not None and not heads:
        raise ConfigError("quantize.tables.lm_head_bits is set but no plain linear produces the model's first output "
                          "(the logits): set lm_head_bits=None for this model")
    return lookups, heads


def lm_heads(gm: GraphModule) -> list[G.LinearUse]:
    """The plain 2-D linear that makes the first graph output (the logits), reached back through one-input
    ops only (casts, views, soft-capping by constants); empty when there is none."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    node = out.args[0]
    while isinstance(node, (tuple, list)):
        node = node[0] if node else None
    for _ in range(12):
        if not isinstance(node, Node) or node.op != "call_function":
            return []
        use = G.linear_use(node)
        if use is not None:
            plain = use.kind == "linear" and use.expert is None and G.val(use.weight).dim() == 2
            return [use] if plain and not G.param_source(node.args[1])[1] else []
        inputs = [a for a in node.args if isinstance(a, Node)]
        if len(inputs) != 1:
            return []
        node = inputs[0]
    return []


def bias_of(node: Node) -> Any:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def add_packed(gm: GraphModule, base: str, packed: tuple, dtype: torch.dtype, before: Node) -> tuple:
    """The packed codes, scales (in the weight's dtype) and zero points (or None) as buffers before `before`."""
    qweight, scales, zeros = packed
    return (G.add_param(gm, base + "_packed", qweight, before, buffer=True),
            G.add_param(gm, base + "_scales", scales.to(dtype), before, buffer=True),
            None if zeros is None else G.add_param(gm, base + "_zeros", zeros, before, buffer=True))


def packed_bytes(packed: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in packed if t is not None)


def rewrite_tables(gm: GraphModule, lookups: list[tuple[Node, Node]], heads: list[G.LinearUse],
                   tables: TableQuant, weights: WeightQuant) -> dict[str, Any]:
    """Pack each table once per bit width asked of it (RTN): aten.embedding -> fxpress.embedding_nbit,
    the LM head's aten.linear -> fxpress.linear_nbit, a tied table's two uses reading the same packed nodes."""
    groups: dict[str, list[tuple[int, Node, Node]]] = {}  # table -> [(bits, node, get_attr)]
    for emb, attr in lookups:
        groups.setdefault(str(attr.target), []).append((tables.embedding_bits, emb, attr))
    for head in heads:
        groups.setdefault(str(head.weight.target), []).append((tables.lm_head_bits, head.node, head.weight))
    group_size = weights.group_size if tables.group_size is None else tables.group_size
    stats = {"embedding_bits": tables.embedding_bits, "lm_head_bits": tables.lm_head_bits, "tables_packed": len(groups),
             "tied_tables_shared": 0, "table_bytes_fp": 0, "table_bytes_packed": 0, "warnings": []}
    for name, uses in groups.items():
        _pack_table(gm, name, uses, WeightSpec(8, group_size, weights.symmetric, weights.clip_search), stats)
    G.reset_order_cache(gm.graph)
    return stats


def _pack_table(gm: GraphModule, name: str, uses: list[tuple[int, Node, Node]], spec: WeightSpec,
                stats: dict[str, Any]) -> None:
    """One table's uses rewritten to read its packed copies (one per bit width); adds to `stats`."""
    attrs = list(dict.fromkeys(a for _, _, a in uses))
    weight = G.get_param(gm, attrs[0])
    stats["table_bytes_fp"] += weight.numel() * weight.element_size()
    widths = sorted({b for b, _, _ in uses})
    for bits in widths:
        qw = rtn(weight, WeightSpec(bits, spec.group_size, spec.symmetric, spec.clip_search))
        packed = qw.packed()
        stats["table_bytes_packed"] += packed_bytes(packed)
        nodes = add_packed(gm, f"{name}_q{bits}", packed, weight.dtype, attrs[0])
        mine = [node for b, node, _ in uses if b == bits]
        stats["tied_tables_shared"] += len(mine) > 1
        for node in mine:
            if G.is_op(node, torch.ops.aten.embedding):
                G.replace_with_call(gm, node, EMBEDDING_NBIT, (node.args[1], *nodes, bits, qw.block_size, weight.shape[1]))
            else:
                G.replace_with_call(gm, node, LINEAR_NBIT, (node.args[0], *nodes, bias_of(node), bits, qw.block_size,
                                                            weight.shape[1]))
    if len(widths) > 1:
        stats["warnings"].append(f"{name} is tied (embedding and LM head) but gets {widths[0]} and {widths[-1]} bits: "
                                 "stored twice; give embedding_bits and lm_head_bits the same value to store it once")
    readers = sorted({u.name for a in attrs for u in a.users})
    if readers:
        stats["warnings"].append(f"{name} is still read in full precision by {', '.join(readers)}, so it is stored both "
                                 "packed and in float: set embedding_bits and lm_head_bits both to pack it once")
    for attr in attrs:
        if not attr.users:
            G.drop_param(gm, attr)
