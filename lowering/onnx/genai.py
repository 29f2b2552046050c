"""onnxruntime-genai's model I/O and fused attention, as a rewrite of the graph before the ONNX export.

Why before the export: `fxpress.graph` finds each attention's SDPA, its KV-cache concatenations and the
per-layer cache reads structurally, for every family, where matching the exported ONNX graph would
depend on how torch.onnx decomposed SDPA. The rewrite
- gives a causal LM per-layer cache inputs/outputs (`past_key_values.{i}.key/value` [batch, kv_heads, past,
  head_dim] -> `present.{i}.key/value`) and an `attention_mask` input [batch, past + seq], as the GenAI
  builder's models have, instead of one stacked cache split and restacked every step;
- replaces each attention (cat(past, new) -> repeat KV heads -> SDPA) by `fxpress_ort::group_query_attention`,
  which lowers to ONNX Runtime's `com.microsoft::GroupQueryAttention` (cache appended in place, KV heads not
  expanded). RoPE, and any online Hadamard after it (R3), stay where the program computes them, so the rotated
  model's keys are exactly the program's. Attentions it cannot prove equivalent stay as they were (counted).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from fxpress import graph as G
from fxpress.lowering.export import view_through_flat
from fxpress.signature import Signature

GQA_DTYPES = (torch.float32, torch.float16)  # ONNX Runtime's CPU GroupQueryAttention kernels


@torch.library.custom_op("fxpress_ort::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float, do_rotary: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """com.microsoft::GroupQueryAttention's semantics (BSD query/key/value, BNSH cache, causal, right-aligned,
    rotary (half-split form) at each row's positions when `do_rotary`): the reference the graph is traced with."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    q_pos = torch.arange(s) + (seqlens_k.long()[:, None] + 1 - s)  # [B, S]: each row's own length
    q = query.view(b, s, num_heads, d).transpose(1, 2)
    k = key.view(b, s, kv_num_heads, d).transpose(1, 2)
    if do_rotary:
        q, k = (_rotary(t, q_pos, cos_cache, sin_cache) for t in (q, k))
    keys = torch.cat([past_key, k], 2)
    values = torch.cat([past_value, value.view(b, s, kv_num_heads, -1).transpose(1, 2)], 2)
    allowed = torch.arange(keys.shape[2])[None, None, :] <= q_pos[:, :, None]  # [B, S, T]
    rep = num_heads // kv_num_heads
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1), attn_mask=allowed[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, s, -1), keys, values


def _rotary(x: torch.Tensor, pos: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, d] rotated at positions pos [B, S]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    cos, sin = cos_cache[pos][:, None].to(x.dtype), sin_cache[pos][:, None].to(x.dtype)  # [B, 1, S, d/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale, do_rotary):
    b, s, _ = query.shape
    total = past_key.shape[2] + s
    keys = past_key.new_empty(b, past_key.shape[1], total, past_key.shape[3])
    values = past_value.new_empty(b, past_value.shape[1], total, past_value.shape[3])
    return query.new_empty(b, s, num_heads * past_value.shape[3]), keys, values


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                    mask: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int,
                    kv_heads: int, scale: float, do_rotary: int) -> tuple:
    """SDPA over cat(past, new) with KV heads repeated, as GroupQueryAttention: q/k/v [B, heads, S, d] in (before
    RoPE when `do_rotary`), (output [B, S, heads * d], present key, present value) out; lengths from the mask."""
    b, _, s, _ = q.shape
    flat = [t.transpose(1, 2).reshape(b, s, -1) for t in (q, k, v)]
    seqlens = (mask.sum(1) - 1).to(torch.int32)
    total = (seqlens.max() + 1).to(torch.int32)
    return torch.ops.fxpress_ort.group_query_attention(*flat, past_k, past_v, seqlens, total, cos_cache, sin_cache,
                                                       num_heads, kv_heads, scale, do_rotary)


@dataclass
class GenaiRewrite:
    """What the rewrite did: per-layer I/O or not, attentions fused, and why any were not."""

    per_layer_io: bool = False
    fused: int = 0
    rotary_inside: int = 0
    layout_round_trips: int = 0  # attention outputs handed to o_proj as GroupQueryAttention's own layout
    unfused: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"io": "genai" if self.per_layer_io else "stacked", "group_query_attention": self.fused,
                "rotary_in_attention": self.rotary_inside, "attention_layout_round_trips_removed": self.layout_round_trips,
                "attention_unfused": list(self.unfused)}


def _layer_reads(cache: torch.fx.Node, layers: int) -> dict[int, list[torch.fx.Node]] | None:
    """select(cache, 0, i) readers by layer, or None when the stacked cache is read any other way."""
    reads: dict[int, list[torch.fx.Node]] = {i: [] for i in range(layers)}
    for user in cache.users:
        if G.is_op(user, torch.ops.aten.select.int) and user.args[1] == 0 and isinstance(user.args[2], int):
            reads[user.args[2] % layers].append(user)
        elif not (G.is_op(user, torch.ops.aten.sym_size.int) and user.args[1] in (1, 3)):
            return None
    return reads


def _split_cache_io(gm: torch.fx.GraphModule, sig: Signature, layers: int) -> Signature | None:
    """Stacked (past_keys, past_values) -> per-layer inputs and outputs plus attention_mask; None if not that graph."""
    graph = gm.graph
    places = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    if len(places) != 3 or not isinstance(results, (tuple, list)) or len(results) != 3:
        return None
    stacks = results[1:]
    if not all(G.is_op(s, torch.ops.aten.stack.default) and len(s.args[0]) == layers for s in stacks):
        return None
    for node in [n for n in graph.nodes if n.op == "call_module" and not n.users]:
        graph.erase_node(node)  # torch.export's _guards_fn: it reads the stacked inputs, and checks nothing now
    reads = [_layer_reads(c, layers) for c in places[1:]]
    if any(r is None for r in reads):
        return None
    with graph.inserting_after(places[0]):
        inputs = [graph.placeholder("attention_mask")]
    for i in range(layers):
        for kind in ("key", "value"):
            with graph.inserting_after(inputs[-1]):
                inputs.append(graph.placeholder(f"past_key_values_{i}_{kind}"))
    for j, (cache, by_layer) in enumerate(zip(places[1:], reads)):
        for i, nodes in by_layer.items():
            for node in nodes:
                node.replace_all_uses_with(inputs[1 + 2 * i + j])
        for user in list(cache.users):  # sym_size(stacked, 1 = batch | 3 = past) -> the layer-0 entry's dims
            user.args = (inputs[1 + j], 0 if user.args[1] == 1 else 2)
    output.args = ((results[0], *[s.args[0][i] for i in range(layers) for s in stacks]),)
    graph._codegen = torch.fx.graph.CodeGen()  # torch.export's pytree in/out specs describe the stacked signature
    for node in (*stacks, *places[1:]):
        graph.erase_node(node)
    return _genai_signature(sig, layers)


def _genai_signature(sig: Signature, layers: int) -> Signature:
    from torch.export import Dim

    ids, past_k, past_v = sig.example_args
    batch, seq, past = (sig.dynamic_shapes[0][0], sig.dynamic_shapes[0][1], sig.dynamic_shapes[1][3])
    mask = torch.ones(ids.shape[0], ids.shape[1] + past_k.shape[3], dtype=torch.int64)
    args, shapes = [ids, mask], [{0: batch, 1: seq}, {0: batch, 1: Dim("total", min=1, max=16384)}]
    names_in, names_out = ["input_ids", "attention_mask"], [sig.output_names[0]]
    for i in range(layers):
        for kind, cache in (("key", past_k), ("value", past_v)):
            args.append(cache[i].clone())
            shapes.append({0: batch, 2: past})
            names_in.append(f"past_key_values.{i}.{kind}")
            names_out.append(f"present.{i}.{kind}")
    return Signature(tuple(names_in), tuple(names_out), tuple(args), tuple(shapes), {})


def _sdpa_scale(sdpa: torch.fx.Node, head_dim: int) -> float | None:
    """SDPA's scale (its default 1/sqrt(d) when unset); None when dropout, GQA flags or odd arguments are set."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = dict(zip(names, sdpa.args[3:]), **sdpa.kwargs)
    if given.get("dropout_p", 0.0) or given.get("enable_gqa", False):
        return None
    scale = given.get("scale")
    return float(scale) if isinstance(scale, (int, float)) else head_dim ** -0.5


def _why_not(att: Any, past: dict[torch.fx.Node, tuple[int, str]], dtype: torch.dtype) -> str | None:
    """The reason one attention cannot become GroupQueryAttention, or None."""
    if dtype not in GQA_DTYPES:
        return f"activations are {dtype} (GroupQueryAttention runs float32/float16)"
    if att.k_cache is None or att.v_cache is None or att.k_new is None:
        return "no cat(past, new) KV-cache append found before its SDPA"
    k_past, v_past = att.k_cache.args[0][0], att.v_cache.args[0][0]
    if past.get(k_past, (None, ""))[1] != "key" or past.get(v_past, (None, ""))[1] != "value":
        return "its cache is not read from a per-layer past input"
    if not (att.num_heads and att.num_kv_heads and att.head_dim) or att.num_heads % att.num_kv_heads:
        return "head counts not found"
    if att.v_head_dim != att.head_dim:
        return f"key head size {att.head_dim} != value head size {att.v_head_dim}"
    if _sdpa_scale(att.sdpa, att.head_dim) is None:
        return "SDPA uses dropout or enable_gqa"
    return None


def _rope_of(node: Any) -> tuple[Any, Any, Any] | None:
    """(x, cos, sin) when `node` = x * cos + rotate_half(x) * sin (HF's half-split RoPE over the whole head), else None."""
    if not G.is_op(node, torch.ops.aten.add.Tensor) or len(node.args) != 2:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (G.is_op(plain, torch.ops.aten.mul.Tensor) and G.is_op(rotated, torch.ops.aten.mul.Tensor)):
            continue
        for x, cos in (plain.args, plain.args[::-1]):
            for half, sin in (rotated.args, rotated.args[::-1]):
                if _is_rotate_half(half, x):
                    return x, cos, sin
    return None


def _is_rotate_half(node: Any, x: Any) -> bool:
    """node == cat([-x[..., d/2:], x[..., :d/2]], -1)."""
    if not G.is_op(node, torch.ops.aten.cat.default) or len(node.args[0]) != 2 or node.args[1] not in (-1, 3):
        return False
    neg, first = node.args[0]
    if not G.is_op(neg, torch.ops.aten.neg.default):
        return False
    second, d = neg.args[0], G.last_dim(x)
    return (_is_slice(first, x, 0, d // 2) and _is_slice(second, x, d // 2, None)) if d else False


def _is_slice(node: Any, x: Any, start: int, end: int | None) -> bool:
    if not G.is_op(node, torch.ops.aten.slice.Tensor) or node.args[0] is not x or node.args[1] not in (-1, 3):
        return False
    stop = node.args[3] if len(node.args) > 3 else None
    return node.args[2] == start and (stop == end or (end is None and stop is not None and stop >= 2**62))


def _rotary_caches(gm: torch.fx.GraphModule, cos: Any, sin: Any, positions: int, sig: Signature) -> tuple | None:
    """cos/sin caches [positions, d/2] evaluated from the graph's own cos/sin nodes (prompt of `positions` tokens,
    empty past); None when they are not duplicated halves or depend on more than the positions."""
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        fns = [G.subgraph_function(gm, places, node) for node in (cos, sin)]
    except Exception:  # noqa: BLE001  (GraphPatternError and friends: not a positions-only subgraph)
        return None
    ids = torch.zeros(1, positions, dtype=torch.long)
    args = [ids, torch.ones(1, positions, dtype=torch.long)]
    args += [a.new_zeros(1, a.shape[1], 0, a.shape[3]) for a in sig.example_args[2:]]
    with torch.no_grad():
        tables = [fn(*args).reshape(positions, -1) for fn in fns]
    half = tables[0].shape[-1] // 2
    if any(tables[0].shape[-1] != G.last_dim(cos) or not torch.equal(t[:, :half], t[:, half:]) for t in tables):
        return None
    return tuple(t[:, :half].contiguous() for t in tables)


def _fuse(gm: torch.fx.GraphModule, att: Any, mask: Any, rotary: dict, positions: int, sig: Signature,
          done: GenaiRewrite) -> bool:
    """Replace one attention by fused_attention (RoPE inside when both q and k are plainly RoPE'd); returns
    whether RoPE went inside. Presents go where the cache concatenations went."""
    graph = gm.graph
    q, k = att.q_in, att.k_new
    q_rope, k_rope = _rope_of(q), _rope_of(k)
    caches = None
    if q_rope and k_rope and q_rope[1:] == k_rope[1:]:
        if q_rope[1:] not in rotary:
            rotary[q_rope[1:]] = _rotary_caches(gm, *q_rope[1:], positions, sig)
        caches = rotary[q_rope[1:]]
    if caches is not None:
        q, k = q_rope[0], k_rope[0]
        if not isinstance(caches[0], torch.fx.Node):  # one pair of cache weights for every layer with these values
            same = [v for v in rotary.values() if v and isinstance(v[0], torch.fx.Node)
                    and all(torch.equal(G.get_param(gm, n), t) for n, t in zip(v, caches))]
            first = next(n for n in graph.nodes if n.op != "placeholder")
            caches = rotary[q_rope[1:]] = same[0] if same else tuple(
                G.add_param(gm, f"rotary_{name}_cache", t, first) for name, t in zip(("cos", "sin"), caches))
    else:
        caches = (q, q)  # unused (do_rotary = 0); any tensor keeps the schema simple
    v_new = att.v_cache.args[0][1]
    args = (q, k, v_new, att.k_cache.args[0][0], att.v_cache.args[0][0], mask, *caches,
            att.num_heads, att.num_kv_heads, _sdpa_scale(att.sdpa, att.head_dim), int(q is not att.q_in))
    with graph.inserting_before(att.sdpa):
        fused = graph.call_function(fused_attention, args)
        out, present_k, present_v = (graph.call_function(operator.getitem, (fused, i)) for i in range(3))
        b, h, s, d = (graph.call_function(torch.ops.aten.sym_size.int, (att.q_in, i)) for i in range(4))
        heads = graph.call_function(torch.ops.aten.view.default, (out, [b, s, h, d]))
        sdpa_like = graph.call_function(torch.ops.aten.transpose.int, (heads, 1, 2))
    att.sdpa.replace_all_uses_with(sdpa_like)
    end = _layout_round_trip_end(sdpa_like, getattr(att.q_in.meta.get("val"), "shape", None))
    if end is not None:  # the program turns SDPA's [b, h, s, d] back into [b, s, h*d]: GQA's output is that
        end.replace_all_uses_with(out)
        done.layout_round_trips += 1
    for cat, present in ((att.k_cache, present_k), (att.v_cache, present_v)):  # other readers stay on the cat
        cat.replace_all_uses_with(present, delete_user_cb=lambda user: user.op == "output")
    return q is not att.q_in


_RESHAPES = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
             view_through_flat)


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_dim(arg: Any, dim: Any) -> bool:
    """A shape argument (int, or a node whose traced value is a SymInt) equal to a traced dimension."""
    value = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
    return value is not None and str(value) == str(dim)


def _is_shape(size: Any, dims: tuple, free: int) -> bool:
    """`size` (a view's shape argument) equals `dims`, entry `free` also matching as -1."""
    return isinstance(size, (list, tuple)) and len(size) == len(dims) and all(
        (i == free and a == -1) or _is_dim(a, d) for i, (a, d) in enumerate(zip(size, dims)))


def _layout_round_trip_end(sdpa_like: torch.fx.Node, q_shape: Any) -> torch.fx.Node | None:
    """The program's node that turns SDPA's output layout back into [b, s, h*d] (HF attention: an optional
    same-shape view, transpose(1, 2), reshape(b, s, -1)), when nothing else reads the chain; None otherwise.
    Without this the ONNX graph goes from GroupQueryAttention's [b, s, h*d] to [b, h, s, d] and back: six
    Reshape/Transpose kernels per layer, an identity."""
    if q_shape is None or len(q_shape) != 4:
        return None
    b, h, s, d = q_shape
    node = _only_user(sdpa_like)
    if node is not None and node.target in _RESHAPES:
        if not _is_shape(node.args[1], (b, h, s, d), free=1):
            return None
        node = _only_user(node)
    if node is None or node.target != torch.ops.aten.transpose.int or sorted(node.args[1:3]) != [1, 2]:
        return None
    end = _only_user(node)
    if end is None or end.target not in _RESHAPES or not _is_shape(end.args[1], (b, s, h * d), free=2):
        return None
    return end


def _attentions(gm: torch.fx.GraphModule, done: GenaiRewrite) -> list:
    """Every SDPA's attention, found from the SDPA itself (no residual stream needed: a packed embedding table or
    another block layout does not hide attentions); the o projection is not needed here."""
    sdpas = [n for n in gm.graph.nodes if G.is_op(n, torch.ops.aten.scaled_dot_product_attention.default)]
    return [G.attention_at(n, []) for n in sdpas]


def rewrite_for_genai(gm: torch.fx.GraphModule, sig: Signature, layers: int, dtype: torch.dtype,
                      positions: int, fuse_attention: bool = True) -> tuple[Signature, GenaiRewrite]:
    """Per-layer cache I/O and fused attention on `gm` in place; returns the new signature and what was done."""
    done = GenaiRewrite()
    new_sig = _split_cache_io(gm, sig, layers)
    if new_sig is None:
        done.unfused.append("the graph has no stacked (past_keys, past_values) cache: I/O and attention kept")
        return sig, done
    done.per_layer_io = True
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mask = places[1]
    past = {n: (i // 2, "key" if i % 2 == 0 else "value") for i, n in enumerate(places[2:])}
    rotary: dict = {}
    if fuse_attention:
        for att in _attentions(gm, done):
            reason = _why_not(att, past, dtype)
            if reason is None:
                done.rotary_inside += _fuse(gm, att, mask, rotary, positions, new_sig, done)
                done.fused += 1
            else:
                done.unfused.append(f"{att.sdpa.name}: {reason}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return new_sig, done


def genai_rewriter(program: Any) -> tuple[Any, GenaiRewrite | None]:
    """The `reexport` rewrite hook for `program` (None for models that are not causal LMs) and its record."""
    if not program.is_causal_lm or not program.info.num_layers:
        return None, None
    done = GenaiRewrite()

    def rewrite(gm: torch.fx.GraphModule, sig: Signature) -> Signature:
        new_sig, record = rewrite_for_genai(gm, sig, program.info.num_layers, program.info.torch_activation_dtype,
                                            int(program.info.max_positions or 4096))
        done.__dict__.update(record.__dict__)
        return new_sig

    return rewrite, done
