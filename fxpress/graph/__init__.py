"""Graph queries shared by every pass: parameters, linears, norms, the residual stream, blocks, attention, MoE.

Everything here recognises structure from the ATen graph itself (ops, shapes, data flow), never from
module class names or parameter names, so one query serves Llama, Qwen, Mistral, Mixtral, OLMoE and
DeepSeek alike. Passes call these functions instead of re-deriving patterns.

Conventions: an FX `Node` stands for the tensor it produces; `meta["val"]` (set by torch.export) gives
its shape. A parameter is reached through a `get_attr` node. Linear weights are `[out, in]`; fused
experts are 3-D `[E, out, in]` (or `[E, in, out]`), see `LinearUse.in_axis` / `out_axis`.

One module per concern: `nodes` (queries and traversals), `editing`, `linears`, `norms`, `residual`,
`attention`, `moe` and `blocks`; this package re-exports their public names (`G.linear_uses(...)`).
"""

from fxpress.graph.attention import Attention, CacheWrite, attention_at, cache_writes
from fxpress.graph.blocks import Block, Part, attentions, decoder_blocks, down_projections, moe_blocks
from fxpress.graph.editing import (
    add_param,
    drop_param,
    get_param,
    insert_after,
    insert_before_use,
    is_stored,
    read_is_private,
    replace_with_call,
    set_param,
    store_tensor,
    subgraph_function,
    untie,
)
from fxpress.graph.linears import LinearUse, linear_use, linear_uses, linears_behind, param_source
from fxpress.graph.moe import ExpertLayer, MoE, RoutedExpert, expert_layers, moe_at
from fxpress.graph.nodes import (
    CAST_OPS,
    ROW_OPS,
    GraphPatternError,
    ancestors,
    calls,
    descendants,
    flat_nodes,
    is_cast,
    is_op,
    last_dim,
    ndim,
    op_name,
    position,
    reset_order_cache,
    shape,
    tensor_users,
    val,
)
from fxpress.graph.norms import Norm, find_norms, norm_consumers, norm_readers
from fxpress.graph.residual import ResidualStream, final_readers, find_embeddings, residual_stream

_find_embeddings = find_embeddings  # the name passes/quantize still calls

__all__ = [
    "CAST_OPS", "ROW_OPS", "Attention", "Block", "CacheWrite", "ExpertLayer", "GraphPatternError", "LinearUse", "MoE",
    "Norm", "Part", "ResidualStream", "RoutedExpert", "add_param", "ancestors", "attention_at", "attentions",
    "cache_writes", "calls", "decoder_blocks", "descendants", "down_projections", "drop_param", "expert_layers",
    "final_readers", "find_embeddings", "find_norms", "flat_nodes", "get_param", "insert_after", "insert_before_use",
    "is_cast", "is_op", "is_stored", "last_dim", "linear_use", "linear_uses", "linears_behind", "moe_at", "moe_blocks", "ndim",
    "norm_consumers", "norm_readers", "op_name", "param_source", "position", "replace_with_call", "reset_order_cache",
    "read_is_private", "residual_stream", "set_param", "shape", "store_tensor", "subgraph_function", "tensor_users", "untie", "val",
]
