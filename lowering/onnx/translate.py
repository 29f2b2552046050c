"""torch.onnx's translation steps, cut to what fxpress's graphs need: SmolLM2's export went from ~70 s to ~30 s.

1. Skip torch.onnx's re-trace of the whole program when it would change nothing but the time it takes.
torch.onnx.export (dynamo) decomposes the ExportedProgram before translating it: `run_decompositions` traces the
whole graph again, functionalized, with symbolic shapes. On SmolLM2 that re-trace is ~75% of the export (~45 s of
~60). It exists to lower ops that have no ONNX translation; a program the re-export already wrote in ops that all
have one (fxpress's custom ops, the attention, reshapes...) needs none. Three training-IR forms stand between
such a graph and the translator, and are rewritten here in place: `aten.to` becomes `aten._to_copy` (what the
decomposition makes of it), the in-place `aten.detach_` on a lifted constant is dropped (it returns its input),
and assertion nodes are removed as the exporter does. A graph with any other untranslatable op, an in-place op or
an op returning a list of tensors takes the exporter's own decomposition, as before (the MoE routing does).

2. One iteration of onnxscript's optimizer, not two, then the Identity nodes it leaves removed: the second
iteration matches every rewrite rule on every node again (~30 of ~45 s on the rotated SmolLM2) and changes
nothing else on these graphs (same node count and types).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_DROPPED = (torch.ops.aten.detach_.default, torch.ops.aten.detach.default)
_TO = (torch.ops.aten.to.dtype, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout)
_ASSERTIONS = frozenset({torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten._assert_async.default,
                         torch.ops.aten._assert_async.msg, torch.ops.aten._assert_scalar.default,
                         torch.ops.aten._assert_tensor_metadata.default})  # what the exporter removes


def untranslatable_ops(graph: torch.fx.Graph, registry: Any) -> set[Any]:
    """The call targets of `graph` that need torch.onnx's decomposition: no ONNX translation in `registry`, or
    not functional (below); the forms rewritten here do not count."""
    from torch.onnx._internal.exporter import _decomp

    known = set(_decomp.get_onnx_implemented_overloads(registry))
    ignored = {*_DROPPED, *_TO, *_ASSERTIONS}
    return {n.target for n in graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target not in ignored
            and (n.target not in known or _needs_functional_form(n.target))}


def _needs_functional_form(op: torch._ops.OpOverload) -> bool:
    """In-place ops (index_put_ in MoE routing) need the functionalization the re-trace does, and ops returning
    a list of tensors (chunk) translate to outputs without types unless decomposed first."""
    schema = op._schema
    return schema.is_mutable or any(str(r.type) == "List[Tensor]" for r in schema.returns)


def rewrite_training_forms(gm: torch.fx.GraphModule) -> int:
    """`to` -> `_to_copy`, drop `detach_`/`detach`, drop assertions; returns how many nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPPED:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target in _ASSERTIONS and not node.users:
            gm.graph.erase_node(node)
        elif node.target in _TO:
            _to_copy(node)
        else:
            continue
        changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed


def _to_copy(node: torch.fx.Node) -> None:
    """aten.to(x, [device,] dtype, ...) as aten._to_copy(x, dtype=...): the value's own dtype says what it casts to."""
    val = node.meta.get("val")
    node.target = torch.ops.aten._to_copy.default
    node.args = (node.args[0],)
    node.kwargs = {"dtype": val.dtype} if isinstance(val, torch.Tensor) else {}


@contextmanager
def decompose_only_when_needed(stats: dict[str, Any]) -> Iterator[None]:
    """Within the block, torch.onnx's decomposition step runs only on graphs that need it (see the module doc);
    `stats["decomposition"]` says which path each export took."""
    from torch.onnx._internal.exporter import _fx_passes

    original = _fx_passes.decompose_with_registry

    def decompose(exported_program: torch.export.ExportedProgram, registry: Any) -> torch.export.ExportedProgram:
        missing = untranslatable_ops(exported_program.graph, registry)
        if missing:
            stats["decomposition"] = f"torch.onnx ({len(missing)} ops without an ONNX translation)"
            return original(exported_program, registry)
        stats["decomposition"] = f"skipped ({rewrite_training_forms(exported_program.graph_module)} nodes rewritten)"
        return exported_program

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


def optimize(model: Any, should_fold: Any = None) -> None:
    """onnxscript's optimizer (constant folding, its rewrite rules, unused nodes), one iteration (see the module
    doc), then Identity elimination and onnxscript's ONNX fusions, as torch.onnx's `optimize()` ends."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(model, num_iterations=1,
                                     **({"should_fold": should_fold} if should_fold is not None else {}))
    common.IdentityEliminationPass()(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)
