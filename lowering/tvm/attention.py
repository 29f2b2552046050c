"""Attention in TVM as one kernel that reads the KV heads once: grouped-query attention without the expanded copies.

Why: a Llama-family program repeats its KV heads before SDPA (unsqueeze -> expand -> reshape), and TVM's import
decomposes SDPA into transposes, an unscheduled matmul, a softmax and another matmul. Per decode step that
copied each layer's whole cache once per query-head group and ran ~10 kernels a layer. Before the re-export,
`rewrite_attention` replaces each such SDPA by `fxpress_tvm::grouped_attention` over the un-repeated keys and
values (its PyTorch body is the SDPA it replaces, so the re-export traces the same values); the converter
lowers it to `attention_kernel`: per (batch, head) row, scores against keys of head // group, a softmax
and the weighted sum of values, vectorised along the head dimension.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from fxpress import graph as G
from fxpress.lowering.export import additive_mask
from fxpress.lowering.tvm.relax_helpers import dtype_of, shape_of
from fxpress.lowering.tvm.row_dot import lanes_for

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@torch.library.custom_op("fxpress_tvm::grouped_attention", mutates_args=())
def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """SDPA of query [B, H, S, d] over key/value [B, KVH, T, d] whose heads serve H / KVH query heads each;
    `mask` is additive, broadcast to [B, H, S, T]."""
    group = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=mask, scale=scale)


@grouped_attention.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(*query.shape[:3], value.shape[3])


def _repeated_heads(node: Any) -> tuple[Any, int] | None:
    """(kv, group) when `node` is kv [B, KVH, T, d] with each head repeated `group` times (unsqueeze(2) ->
    expand -> reshape, transformers' repeat_kv) or kv itself (group 1); None for anything else."""
    out = G.shape(node)
    if out is None or len(out) != 4:
        return None
    if not G.is_op(node, *_RESHAPES):
        return node, 1
    expand = node.args[0]
    unsqueeze = expand.args[0] if G.is_op(expand, aten.expand.default) else None
    if not G.is_op(unsqueeze, aten.unsqueeze.default) or unsqueeze.args[1] != 2 or len(unsqueeze.users) != 1:
        return None
    kv = unsqueeze.args[0]
    kv_shape, wide = G.shape(kv), G.shape(expand)
    if kv_shape is None or len(kv_shape) != 4 or wide is None or len(wide) != 5:
        return None
    group = wide[2]
    kept = all(_same_dim(a, w) for a, w in zip(kv_shape, (wide[0], wide[1], wide[3], wide[4])))
    flat = all(_same_dim(a, w) for a, w in zip(out, (wide[0], wide[1] * group, wide[3], wide[4])))
    return (kv, group) if kept and flat and isinstance(group, int) else None


def _same_dim(a: Any, b: Any) -> bool:
    """Equal sizes: static ones by value; symbolic ones are taken as equal (a capture may name one length by two
    symbols, e.g. past keys' and past values'), as expand cannot change a size other than 1 and repeat_kv expands
    only the new axis."""
    static = isinstance(a, int), isinstance(b, int)
    return a == b if all(static) else not any(static)


def _sdpa_parts(node: torch.fx.Node) -> tuple | None:
    """(q, k, v, mask, scale) of an SDPA this kernel computes: a mask, no dropout, no causal flag, 4-D inputs."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names or k == "scale"}
    extra = set(node.kwargs) - set(names) - {"scale"}
    mask = args.get("attn_mask")
    if extra or args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) or not isinstance(mask, torch.fx.Node):
        return None
    q_shape = G.shape(args["query"])
    if q_shape is None or len(q_shape) != 4 or not isinstance(q_shape[3], int):
        return None
    scale = args.get("scale")
    return args["query"], args["key"], args["value"], mask, 1 / math.sqrt(q_shape[3]) if scale is None else scale


def rewrite_attention(gm: torch.fx.GraphModule) -> int:
    """Replace every SDPA over repeated KV heads (or plain multi-head) by `grouped_attention`; returns the count."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if not G.is_op(node, aten.scaled_dot_product_attention.default):
            continue
        parts = _sdpa_parts(node)
        keys, values = (_repeated_heads(parts[i]) if parts else None for i in (1, 2))
        if parts is None or keys is None or values is None or keys[1] != values[1]:
            continue
        query, _, _, mask, scale = parts
        heads = G.shape(query)[1]
        if not isinstance(heads, int) or heads != G.shape(keys[0])[1] * keys[1]:
            continue
        with graph.inserting_before(node):
            if G.val(mask) is not None and G.val(mask).dtype == torch.bool:
                mask = graph.call_function(additive_mask, (mask, query))
            fused = graph.call_function(torch.ops.fxpress_tvm.grouped_attention.default,
                                        (query, keys[0], values[0], mask, float(scale)))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    gm.recompile()
    return count


def attention_kernel(heads: int, kv_heads: int, d: int, dv: int, scale: float, dtype: str) -> Any:
    """out[b, h, i] = Σ_j softmax_j(scale · q[b, h, i] · k[b, h / g, j] + mask[b, h, i, j]) · v[b, h / g, j].

    Parallel over (batch, head); the scores of one query row live in a scratch row of length T; the mask
    [MB, MH, MS, T] broadcasts over any of its first three dims of size 1.
    """
    from tvm.script import tirx as T

    group = heads // kv_heads
    lanes, vlanes = lanes_for(d), lanes_for(dv)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_m: T.handle, var_out: T.handle):
        T.func_attr({"tir.noalias": True})
        b, s, t = T.int64(), T.int64(), T.int64()
        mb, mh, ms = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (b, heads, s, d), dtype)
        k = T.match_buffer(var_k, (b, kv_heads, t, d), dtype)
        v = T.match_buffer(var_v, (b, kv_heads, t, dv), dtype)
        m = T.match_buffer(var_m, (mb, mh, ms, t), dtype)
        out = T.match_buffer(var_out, (b, heads, s, dv), dtype)
        scores = T.alloc_buffer((b * heads, t), dtype)
        for bh in T.parallel(b * heads):
            for i in range(s):
                top = T.alloc_buffer((1,), dtype)
                top[0] = T.min_value(dtype)
                for j in range(t):
                    part = T.alloc_buffer((lanes,), dtype)
                    for lane in T.vectorized(lanes):
                        part[lane] = T.Cast(dtype, 0)
                    for step in range(d // lanes):
                        for lane in T.vectorized(lanes):
                            part[lane] = part[lane] + q[bh // heads, bh % heads, i, step * lanes + lane] * k[
                                bh // heads, bh % heads // group, j, step * lanes + lane]
                    scores[bh, j] = m[T.min(bh // heads, mb - 1), T.min(bh % heads, mh - 1), T.min(i, ms - 1), j]
                    for lane in range(lanes):
                        scores[bh, j] = scores[bh, j] + part[lane] * T.Cast(dtype, scale)
                    top[0] = T.max(top[0], scores[bh, j])
                total = T.alloc_buffer((1,), dtype)
                total[0] = T.Cast(dtype, 0)
                acc = T.alloc_buffer((dv,), dtype)
                for lane in T.vectorized(dv):
                    acc[lane] = T.Cast(dtype, 0)
                for j in range(t):
                    weight = T.exp(scores[bh, j] - top[0])
                    total[0] = total[0] + weight
                    for step in range(dv // vlanes):
                        for lane in T.vectorized(vlanes):
                            acc[step * vlanes + lane] = acc[step * vlanes + lane] + weight * v[
                                bh // heads, bh % heads // group, j, step * vlanes + lane]
                for lane in T.vectorized(dv):
                    out[bh // heads, bh % heads, i, lane] = acc[lane] / total[0]

    return kernel


def convert_grouped_attention(node: Any, importer: Any) -> Any:
    """fxpress_tvm::grouped_attention as `attention_kernel` (one call per layer)."""
    from tvm import relax

    q, k, v, mask = importer.retrieve_args(node)[:4]
    scale = node.args[4]
    b, heads, s, d = shape_of(q)
    kv_heads, dv = int(shape_of(k)[1]), int(shape_of(v)[3])
    dtype = dtype_of(q)
    if dtype_of(mask) != dtype:
        mask = importer.block_builder.emit(relax.op.astype(mask, dtype))
    gv = importer.block_builder.add_func(attention_kernel(int(heads), kv_heads, int(d), dv, scale, dtype), "attention")
    return importer.block_builder.emit(
        relax.call_tir(gv, [q, k, v, mask], out_ty=relax.TensorType([b, heads, s, dv], dtype)))
