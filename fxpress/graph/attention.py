"""Attention: the SDPA node, its q/k/v/o projections, head counts and the KV-cache writes around it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxpress.graph.linears import LinearUse, linears_behind
from fxpress.graph.nodes import CAST_OPS, ancestors, calls, is_op, last_dim, op_name, shape, tensor_users, val

aten = torch.ops.aten


@dataclass
class Attention:
    """One attention: the SDPA node, its q/k/v/o linears and the KV-cache concatenations.

    `q_in`/`k_in`/`v_in` are SDPA's inputs ([B, heads, S, d]); `k_new` the fresh keys (after RoPE)
    that `k_cache` (cat([past, new], -2)) appends to the cache, `v_cache` the same for values, when found.
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
    rope: bool = False
    v_simple: bool = False
    o_simple: bool = False


def _heads_from(node: Node) -> tuple[int | None, int | None]:
    s = shape(node)
    try:
        return int(s[1]), int(s[-1])
    except (TypeError, ValueError, IndexError):
        return None, None


_PLAIN_OPS = {"view", "reshape", "_unsafe_view", "transpose", "unsqueeze", "expand", "contiguous", "clone",
              "permute", "cat", *CAST_OPS}


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
            if user is end or calls(user, _PLAIN_OPS):
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
        if name in CAST_OPS or name in ("reshape", "view", "expand", "unsqueeze", "_unsafe_view", "contiguous"):
            cur = cur.args[0]
            continue
        return None, None
    return None, None


def attention_at(sdpa: Node, writers: list[LinearUse]) -> Attention:
    """Describe the attention around one SDPA node (`writers`: the linears adding its branch into the stream)."""
    q_in, k_in, v_in = sdpa.args[:3]
    att = Attention(sdpa=sdpa, q_in=q_in, k_in=k_in, v_in=v_in)
    att.num_heads, att.head_dim = _heads_from(q_in)
    att.v_head_dim = _heads_from(v_in)[1]
    att.k_cache, att.k_new = _cache_cat(k_in)
    att.v_cache = _cache_cat(v_in)[0]
    if att.k_cache is not None:
        att.num_kv_heads = _heads_from(att.k_cache)[0]
    att.q_proj = linears_behind(q_in)
    att.k_proj = linears_behind(k_in)
    att.v_proj = linears_behind(v_in)
    att.rope = any(op_name(n) in ("neg", "sin", "cos") for n in ancestors(q_in, {u.node for u in att.q_proj}))
    outs = [w for w in writers if sdpa in ancestors(w.input, {sdpa})]
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

