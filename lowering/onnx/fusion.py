"""ONNX-graph fusions after materialization: the fused kernels ONNX Runtime runs fastest.

- `fxpress_ort::group_query_attention` (see genai.py) is exported as a placeholder and becomes
  `com.microsoft::GroupQueryAttention` here;
- MatMulNBits reading the same input with the same layout (q/k/v, gate/up) become one MatMulNBits over the
  concatenated packed rows, split after: one int4 kernel launch instead of two or three;
- RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) becomes SimplifiedLayerNormalization, and a residual
  Add before it SkipSimplifiedLayerNormalization, with onnxscript's ORT fusion rules.
Each fusion counts what it did; what does not match stays in today's form.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from fxpress.lowering.onnx.builder import DOMAIN, MS_DOMAIN

GQA_PLACEHOLDER = "GroupQueryAttention"
_GQA_ATTRS = {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "do_rotary": "INT"}


def _gqa_schema() -> None:
    """Let onnxscript build the 3-output placeholder node (it looks ops up by schema)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(GQA_PLACEHOLDER, DOMAIN):
        return
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        GQA_PLACEHOLDER, DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(f"input_{i}", "T", param_option=optional) for i in range(9)],
        outputs=[OpSchema.FormalParameter(f"output_{i}", "T") for i in range(3)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(int32)"], "any tensor")],
        attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, t), "", required=False)
                    for a, t in _GQA_ATTRS.items()],
    )
    onnx.defs.register_schema(schema)


def translate_gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                  num_heads=1, kv_num_heads=1, scale=0.0, do_rotary=0):
    """torch.onnx translation of fxpress_ort::group_query_attention: a placeholder, made real by `fuse`."""
    import onnx_ir as ir
    import onnxscript

    _gqa_schema()
    rotary = [cos_cache, sin_cache] if do_rotary else []
    out, present_k, present_v = onnxscript.values.Opset(DOMAIN, 1).GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length, *rotary, num_heads=num_heads,
        kv_num_heads=kv_num_heads, scale=float(scale), do_rotary=int(do_rotary))
    for value_out, like in ((out, query), (present_k, past_key), (present_v, past_value)):
        value_out.dtype = like.dtype
    if query.shape is not None and past_value.shape is not None:
        out.shape = ir.Shape([query.shape[0], query.shape[1], num_heads * past_value.shape[3]])
    return out, present_k, present_v


def gqa_translations() -> dict[Any, Any]:
    """custom_translation_table entries for the lowering's own ops."""
    from fxpress.lowering.onnx import genai  # noqa: F401  (defines fxpress_ort::group_query_attention)

    return {torch.ops.fxpress_ort.group_query_attention.default: translate_gqa}


def _real_gqa(model: Any) -> int:
    """Placeholder -> com.microsoft::GroupQueryAttention (same inputs and attributes)."""
    count = 0
    for node in model.graph.all_nodes():
        if node.domain == DOMAIN and node.op_type == GQA_PLACEHOLDER:
            node.domain = MS_DOMAIN
            count += 1
    return count


def _nbits_key(node: Any) -> tuple | None:
    """What MatMulNBits must share to be fused: input, attributes, optional inputs present; None if not fusable."""
    if node.domain != MS_DOMAIN or node.op_type != "MatMulNBits" or len(node.inputs) < 3:
        return None
    weights = list(node.inputs[1:])
    if any(w is None or w.const_value is None or len(w.uses()) != 1 for w in weights):
        return None
    attrs = tuple(sorted((k, a.value) for k, a in node.attributes.items() if k != "N"))
    return (id(node.inputs[0]), attrs, len(weights))


def _fuse_group(b: Any, nodes: list) -> None:
    """One MatMulNBits over the concatenated rows of `nodes` (same input and layout), then Split."""
    ir = b.ir
    first = nodes[0]
    sizes = [int(n.attributes["N"].value) for n in nodes]
    inputs = [first.inputs[0]]
    for i in range(1, len(first.inputs)):
        arrays = [n.inputs[i].const_value.numpy() for n in nodes]
        inputs.append(b.initializer(f"{first.inputs[i].name}.fused", np.concatenate(arrays, axis=0),
                                    first.inputs[i].dtype))
    attrs = {k: a.value for k, a in first.attributes.items()}
    attrs["N"] = sum(sizes)
    fused = b.node(first, MS_DOMAIN, "MatMulNBits", inputs, attrs)
    split_sizes = b.initializer("nbits.split", np.array(sizes, dtype=np.int64))
    split = ir.Node("", "Split", [fused, split_sizes], [ir.convenience.convert_attribute("axis", -1)],
                    num_outputs=len(nodes), name=f"Split_{b.counter}")
    b.graph.insert_before(first, split)
    fused.dtype = first.inputs[0].dtype  # MatMulNBits computes in its input's float type
    for node, out in zip(nodes, split.outputs):
        old = node.outputs[0]
        out.shape, out.dtype = old.shape, old.dtype or fused.dtype
        old.replace_all_uses_with(out, replace_graph_outputs=True)
    for node in nodes:
        b.graph.remove(node, safe=True)


def fuse_matmulnbits(b: Any) -> int:
    """Fuse MatMulNBits reading the same input (q/k/v, gate/up); returns how many kernels were saved."""
    groups: dict[tuple, list] = defaultdict(list)
    for node in b.graph:
        key = _nbits_key(node)
        if key is not None:
            groups[key].append(node)
    saved = 0
    for nodes in groups.values():
        if len(nodes) > 1:
            _fuse_group(b, nodes)
            saved += len(nodes) - 1
    return saved


def _through_reshapes(value: Any) -> Any:
    while value is not None and value.producer() is not None and value.producer().op_type == "Reshape":
        value = value.producer().inputs[0]
    return value


def packed_qkv(graph: Any) -> int:
    """GroupQueryAttention whose query, key and value are (through reshapes only, [B, S, n] to [B, S, n]) the
    three outputs of one Split of a fused q/k/v MatMulNBits reads the packed output itself (key, value empty)."""
    count = 0
    for node in list(graph):
        if node.domain != MS_DOMAIN or node.op_type != "GroupQueryAttention":
            continue
        sources = [_through_reshapes(node.inputs[i]) for i in range(3)]
        split = sources[0].producer() if sources[0] is not None else None
        if split is None or split.op_type != "Split" or list(split.outputs) != sources:
            continue
        if any(s.shape is None or v.shape is None or s.shape[-1] != v.shape[-1] for s, v in zip(sources, node.inputs)):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        count += 1
    return count


UNIT_SCALE = "rms.unit_scale"


def _unscaled_rms_rule() -> Any:
    """RMSNorm with no scale after it (a rotated model's: Rotate folds the scales into the next weights) ->
    SimplifiedLayerNormalization with a scale of ones. onnxscript's rules need the scale Mul, and without this
    the rotated graph keeps six plain nodes per norm (889 nodes against 530 for SmolLM2)."""
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    class UnscaledRmsNorm(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, epsilon):
            mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
            return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon))))

        def check(self, op, x, epsilon, **_) -> Any:
            result = pattern.MatchResult()
            if not isinstance(_ir_utils.get_singleton_value(epsilon), float):
                return result.fail("epsilon is not a float constant", epsilon)
            if x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE) or x.shape is None \
                    or not isinstance(x.shape[-1], int):
                return result.fail("input is not float32/64 with a static last dimension", x)
            return result

        def rewrite(self, op, x, epsilon, **_):
            ones = ir.tensor(np.ones(x.shape[-1], dtype=x.dtype.numpy()), name=f"{UNIT_SCALE}.{x.shape[-1]}")
            return op.SimplifiedLayerNormalization(x, op.Constant(value=ones), axis=-1,
                                                   epsilon=_ir_utils.get_singleton_value(epsilon),
                                                   stash_type=x.dtype.value)

    return UnscaledRmsNorm.rule("UnscaledRmsNorm")


def _norm_fusions(model: Any) -> dict[str, int]:
    """RMSNorm -> SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization (onnxscript's ORT rules, then
    ours for norms without a scale)."""
    from onnxscript.rewriter import _fusion_utils, pattern
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    rms = fuse_rms_normalization(model)
    rms += _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([_unscaled_rms_rule()]))(model)
    skip = fuse_skip_rms_normalization(model) if rms else 0
    return {"simplified_layer_norm": rms, "skip_simplified_layer_norm": skip}


def _share_unit_scales(b: Any) -> None:
    """The unscaled-norm rule's Constant scales of ones -> one initializer per width, shared by every norm."""
    shared: dict[int, Any] = {}
    for node in list(b.graph):
        if node.op_type not in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            continue
        scale = node.inputs[1 if node.op_type == "SimplifiedLayerNormalization" else 2]
        const = scale.producer()
        if const is None or const.op_type != "Constant" or "value" not in const.attributes:
            continue
        ones = const.attributes["value"].value.numpy()
        if ones.ndim != 1 or not (ones == 1).all():
            continue
        if ones.size not in shared:
            shared[ones.size] = b.initializer(UNIT_SCALE, ones)
        scale.replace_all_uses_with(shared[ones.size])
        b.graph.remove(const, safe=True)


def _unfuse_plain_norms(b: Any) -> int:
    """A SimplifiedLayerNormalization no residual Add feeds (the first block's) back to plain ops: ONNX Runtime
    registers it in the standard domain, where onnx.checker knows no such op. One per model: negligible."""
    count = 0
    for node in list(b.graph):
        if node.domain != "" or node.op_type != "SimplifiedLayerNormalization":
            continue
        x, scale = node.inputs[0], node.inputs[1]
        eps = b.initializer("rms.eps", np.array(node.attributes["epsilon"].value, dtype=np.float32))
        axes = b.initializer("rms.axes", np.array([-1], dtype=np.int64))
        mean = b.node(node, "", "ReduceMean", [b.node(node, "", "Mul", [x, x]), axes], {"keepdims": 1})
        if x.dtype != b.ir.DataType.FLOAT:
            eps = b.node(node, "", "CastLike", [eps, x])
        inv = b.node(node, "", "Reciprocal", [b.node(node, "", "Sqrt", [b.node(node, "", "Add", [mean, eps])])])
        normalized = b.node(node, "", "Mul", [x, inv])
        unit = (scale.name or "").startswith(UNIT_SCALE)  # a rotated model's norm: no scale to apply
        b.replace(node, normalized if unit else b.node(node, "", "Mul", [normalized, scale]))
        count += 1
    return count


def fuse(model: Any, b: Any, merge_weights: bool = True) -> dict[str, Any]:
    """Every fusion on the materialized model; the counts go into the export statistics.

    merge_weights=False keeps MatMulNBits that share an input apart (a streamed export has written their
    weights already)."""
    from fxpress.lowering.onnx.builder import _drop_unused_initializers

    stats: dict[str, Any] = {"group_query_attention_ops": _real_gqa(model)}
    stats["matmulnbits_fused_away"] = fuse_matmulnbits(b) if merge_weights else 0
    stats["packed_qkv_attention"] = packed_qkv(b.graph) if merge_weights else 0
    if stats["packed_qkv_attention"]:
        import onnx_ir as ir

        ir.passes.common.RemoveUnusedNodesPass()(model)
    stats.update(_norm_fusions(model))
    _share_unit_scales(b)
    stats["simplified_layer_norm"] -= _unfuse_plain_norms(b)
    _drop_unused_initializers(b.graph)
    if stats["group_query_attention_ops"] or stats["skip_simplified_layer_norm"]:
        model.opset_imports[MS_DOMAIN] = 1
    return stats
