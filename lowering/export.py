"""Re-export a Program's (rewritten) GraphModule as a torch.export ExportedProgram that lowerings translate.

Both the ONNX and the TVM lowering start here, so they see the same graph: a copy of the program's
graph with capture artefacts that other frontends reject removed, exported again with dynamic
batch / sequence / past-length dimensions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx

from fxpress.errors import LoweringError
from fxpress.program import Program
from fxpress.signature import Signature, signature


def refuse_bfloat16(program: Program, runtime: str) -> None:
    """ONNX Runtime (CPU) and TVM's PyTorch frontend have no bfloat16: say so, and how to export, before any work."""
    if program.info.activation_dtype == "bfloat16":
        raise LoweringError(
            f"this program computes in bfloat16, which {runtime} does not run: add Precision(dtype='float32') as "
            "the last pass to export it in float32, or compile with dtype=torch.float16 (float16 exports run)"
        )


def _is_empty_vector(node: object) -> bool:
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.ndim == 1 and val.shape[0] == 0


def _fetch(module: torch.nn.Module, target: str) -> object:
    obj: object = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def histc_by_comparison(x: torch.Tensor, bins: int = 100, min: float = 0.0, max: float = 0.0) -> torch.Tensor:  # noqa: A002
    """aten.histc from comparisons and a sum, for frontends without histc (TVM).

    transformers' MoE routing counts tokens per expert with histc on expert ids; the same counts
    come from comparing each value's bin index with every bin. Values outside [min, max] are ignored,
    and max itself falls in the last bin, as histc does.
    """
    if min == max:
        min, max = x.min(), x.max()  # noqa: A001
    scale = bins / (max - min)
    index = ((x - min) * scale).floor().clamp(0, bins - 1)
    inside = (x >= min) & (x <= max)
    hits = (index.unsqueeze(-1) == torch.arange(bins, device=x.device, dtype=x.dtype)) & inside.unsqueeze(-1)
    return hits.to(x.dtype).sum(0)


def grouped_mm_by_masks(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:  # noqa: A002
    """transformers' grouped_mm_fallback (rows sorted by expert, `offs` = cumulative rows per expert) in plain ops.

    The original loops over `offs.tolist()`, which no frontend can import. Here every expert's matmul
    runs on all rows and a mask keeps each row's own expert: E times the FLOPs of the fp32 expert
    matmuls, but static shapes. Quantized MoE graphs use fxpress::grouped_linear_nbit instead.
    """
    rows = torch.arange(input.shape[0], device=input.device)
    expert_of_row = (rows.unsqueeze(1) >= offs.unsqueeze(0)).sum(1)
    out = (expert_of_row == 0).unsqueeze(1).to(input.dtype) * (input @ weight[0])  # no zeros(): TVM needs static
    for e in range(1, weight.shape[0]):
        out = out + (expert_of_row == e).unsqueeze(1).to(input.dtype) * (input @ weight[e])
    return out


def floor_divide_same_dtype(x: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
    """floor_divide with the divisor as a tensor of x's dtype: TVM's frontend makes a Python int an int32
    constant and then rejects int64 // int32 (MoE routing divides expert slots by top-k this way)."""
    if not isinstance(y, torch.Tensor):
        y = torch.full((), y, dtype=x.dtype, device=x.device)
    return torch.floor_divide(x, y.to(x.dtype))


def empty_like_by_mul(x: torch.Tensor, **_: object) -> torch.Tensor:
    """empty_like as x * 0: empty's contents are undefined anyway, and TVM's frontend cannot build an
    empty/zeros tensor whose shape is symbolic (MoE routing inverts a permutation into one)."""
    return x * 0


def new_empty_as_zeros(x: torch.Tensor, size: list, dtype: torch.dtype | None = None, **_: object) -> torch.Tensor:
    """new_empty as new_zeros: TVM's frontend builds `empty` from the raw size list, which fails on symbolic
    dims (DeepSeek-V3's MLA keys, [batch, heads, past+seq, dim], are assembled in a new_empty); new_zeros
    resolves them. empty's contents are undefined anyway."""
    return x.new_zeros(size, dtype=dtype or x.dtype)


def topk_sorted(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):  # noqa: A002
    """topk with sorted output: TVM's frontend supports only that, and sorted is one valid order of an
    unsorted topk (DeepSeek-V3 picks expert groups and experts with sorted=False; what follows is a mask
    or a weighted sum, which the order does not change beyond float rounding)."""
    return torch.topk(x, k, dim, largest, True)


def view_through_flat(x: torch.Tensor, size: list) -> torch.Tensor:
    """aten.view as a 1-D view first: TVM's frontend skips identity reshapes by comparing a same-rank
    reshape's old and new shapes element by element, and a symbolic dim there (DeepSeek-V3's MLA key/value
    view, [batch, 1, past+seq, 96] -> [batch, past+seq, -1, 24]) raises "Cannot use and/or/not operator to
    Expr". Through a 1-D view the ranks differ, so the comparison never runs; the data is not copied."""
    return x.reshape(-1).view(size)


def _same_rank_symbolic_view(node: torch.fx.Node) -> bool:
    """A view/reshape of rank >= 2 to the same rank, with a symbolic input dim: what view_through_flat avoids."""
    if node.op != "call_function" or node.target not in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
        return False
    before, after = (getattr(n, "meta", {}).get("val") for n in (node.args[0], node))
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    return before.ndim == after.ndim >= 2 and any(not isinstance(d, int) for d in before.shape)


FRONTEND_REPLACEMENTS = {
    "aten.empty_like.default": empty_like_by_mul,
    "aten.floor_divide.default": floor_divide_same_dtype,
    "aten.histc.default": histc_by_comparison,
    "aten.new_empty.default": new_empty_as_zeros,
    "aten.topk.default": topk_sorted,
    "transformers.grouped_mm_fallback.default": grouped_mm_by_masks,
}


_SCALAR_BINARY = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Tensor,
                  torch.ops.aten.div.Tensor)


def _float64_scalars(graph: torch.fx.Graph, root: dict[str, object]) -> int:
    """In a float64 program, a Python float operand that float32 cannot hold (RMSNorm's eps = 1e-6) becomes a 0-d
    float64 weight of shape (1,) (broadcasts like the scalar; TVM rejects 0-d weights): torch.onnx builds scalar
    operands as float32 constants and casts them, so 1e-6 would reach ONNX Runtime as 9.99999997e-7 and move every
    norm by ~1e-12 relative."""
    count = 0
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.target not in _SCALAR_BINARY or not (isinstance(val, torch.Tensor) and val.is_floating_point()
                                                      and val.ndim >= 1):
            continue
        args = list(node.args)
        for i, arg in enumerate(args):
            if isinstance(arg, float) and float(torch.tensor(arg, dtype=torch.float32)) != arg:
                name = f"_float64_scalar_{count}"
                root[name] = torch.nn.Parameter(torch.tensor([arg], dtype=torch.float64), requires_grad=False)
                with graph.inserting_before(node):
                    args[i] = graph.get_attr(name)
                count += 1
        node.args = tuple(args)
    return count


def additive_mask(mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask as the additive mask SDPA applies for it (query's dtype): 0 where allowed, else -inf."""
    return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(mask.logical_not(),
                                                                                      float("-inf"))


def _additive_attention_masks(graph: torch.fx.Graph) -> int:
    """Boolean SDPA masks -> additive float masks (one per distinct mask), for causal language models only.

    Why: torch.onnx lowers a boolean-mask SDPA with a guard for rows that mask every key (IsNaN + Where over
    every [batch, heads, query, key] score, ~a quarter of ONNX Runtime's prefill time); a causal model's every
    query sees at least itself, so the guard never fires and the additive form computes the same softmax.
    """
    converted: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        if not isinstance(mask_val, torch.Tensor) or mask_val.dtype != torch.bool:
            continue
        if mask not in converted:  # before the first reader: its query exists there, later readers follow it
            with graph.inserting_before(node):
                converted[mask] = graph.call_function(additive_mask, (mask, node.args[0]))
        if len(node.args) > 3:
            node.args = (*node.args[:3], converted[mask], *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": converted[mask]}
    return len(converted)


def lowering_module(program: Program, additive_masks: bool = False) -> torch.fx.GraphModule:
    """A copy of the program's graph whose every weight is a parameter (storage shared, nothing copied).

    Buffers and constants (packed low-bit weights, scales, Hadamard bases) become parameters so that
    frontends keep them as weights (TVM binds buffers into the library otherwise). Also drops
    capture artefacts that frontends reject: transformers' DynamicCache starts each layer from
    `torch.tensor([])` and concatenates the past onto it, `cat([empty(0), past], -2)`, which PyTorch
    accepts and TVM does not; the one-input cat left is its input. `additive_masks`: see `_additive_attention_masks` (the ONNX lowering asks).
    """
    graph = copy.deepcopy(program.module.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and str(node.target) in FRONTEND_REPLACEMENTS:
            node.target = FRONTEND_REPLACEMENTS[str(node.target)]  # traced into plain ops by the re-export
        elif _same_rank_symbolic_view(node):
            node.target = view_through_flat
        if node.op == "call_function" and node.target is torch.ops.aten.cat.default:
            inputs = list(node.args[0])
            kept = [a for a in inputs if not _is_empty_vector(a)] or inputs
            if len(kept) == 1:  # cat([x]) is x: the cache's cat([empty, past]) would otherwise copy the past
                node.replace_all_uses_with(kept[0])
                graph.erase_node(node)
            elif len(kept) != len(inputs):
                node.args = (kept, *node.args[1:])
    # Before collecting weights: an unread get_attr (a tied model's second name for its table, whose other
    # use a pass replaced by packed storage) would otherwise become an artifact weight nothing reads.
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    if additive_masks and program.is_causal_lm:
        _additive_attention_masks(graph)
    root: dict[str, object] = {}
    if program.info.torch_activation_dtype == torch.float64:
        _float64_scalars(graph, root)
    as_parameter: dict[int, torch.nn.Parameter] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target in root:
            continue
        value = _fetch(program.module, node.target)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            key = id(value)
            if key not in as_parameter:
                as_parameter[key] = torch.nn.Parameter(value.detach(), requires_grad=False)
            value = as_parameter[key]
        root[node.target] = value
    module = torch.fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _dim_names(ep: torch.export.ExportedProgram, sig: Signature) -> dict[str, str]:
    """Map the exporter's symbols (s5, s70, ...) to the Dim names we asked for (batch, seq, past)."""
    names: dict[str, str] = {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name in {s.arg.name for s in ep.graph_signature.input_specs
                                                    if s.kind.name == "USER_INPUT"}]
    for node, spec in zip(user, sig.dynamic_shapes):
        val = node.meta.get("val")
        for axis, dim in spec.items():
            names[str(val.shape[axis])] = dim.__name__
    return names


def reexport(program: Program, decompose: bool = False, additive_masks: bool = False,
             rewrite: Callable[[torch.fx.GraphModule, Signature], Signature] | None = None,
             ) -> tuple[torch.export.ExportedProgram, Signature]:
    """torch.export the program's module again (dynamic dims); `decompose` runs the core ATen decompositions;
    `rewrite` edits the module copy (and its signature) first: a lowering's own graph-level fusions."""
    sig = signature(program)
    module = lowering_module(program, additive_masks)
    if rewrite is not None:
        sig = rewrite(module, sig)
    try:
        ep = torch.export.export(module, sig.example_args, dynamic_shapes=sig.dynamic_shapes, strict=False)
        if decompose:
            ep = ep.run_decompositions()
    except Exception as err:  # torch.export raises many types; all mean "could not trace the rewritten graph"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoweringError(
            f"could not re-export the compiled program ({type(err).__name__}: {first}); a pass probably left an "
            "op without a fake kernel or a shape that is not symbolic (passes run before: "
            f"{', '.join(program.history) or 'none'})"
        ) from err
    sig.dim_names = _dim_names(ep, sig)
    return ep, sig
