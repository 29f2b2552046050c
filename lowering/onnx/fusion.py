"""ONNX-graph fusions after materialization: the fused kernels ONNX Runtime runs fastest.

- `fxpress_ort::group_query_attention` (see genai.py) is exported as a placeholder and becomes
  `com.microsoft::GroupQueryAttention` here;
- MatMulNBits reading the same input with the same layout (q/k/v, gate/up) become one MatMulNBits over the
  concatenated packed rows, split after: one int4 kernel launch instead of two or three;
- RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) becomes SimplifiedLayerNormalization, and a residual
  Add before it SkipSimplifiedLayerNormalization, with onnxscript's ORT fusion rules;
- an 8-bit symmetric activation quantizer (a fake quant) feeding 8-bit per-channel MatMulNBits becomes
  MatMulInteger on the same int8 codes, and feeding 4-bit MatMulNBits is dropped for accuracy_level 4
  (`fuse_int8_activations`).
Each fusion counts what it did; what does not match stays in today's form.
"""

from __future__ import annotations

import functools
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


def _quantizes_activations(model: Any) -> bool:
    """Whether any activation quantizer is in the graph. SimplifiedLayerNormalization rounds differently from the
    program's RMSNorm ops (1e-7 relative); a 4-bit quantizer downstream turns that into flipped codes (3% logit
    error on the rotated W4A4KV4 tiny model), so scale-less norms stay plain ops there."""
    return any(node.domain == DOMAIN and node.op_type.startswith("QuantizeAct") for node in model.graph)


def _norm_fusions(model: Any) -> dict[str, int]:
    """RMSNorm -> SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization (onnxscript's ORT rules, then
    ours for norms without a scale)."""
    from onnxscript.rewriter import _fusion_utils, pattern
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    rms = fuse_rms_normalization(model)
    if not _quantizes_activations(model):
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


# -- real int8 activation compute (W8A8, W4A8) --------------------------------------------------------------
INT8_MODES = ("all", "exact", "none")


def _quantizer(node: Any) -> dict | None:
    """The attributes of a quantize_act call (None for any other node)."""
    from fxpress.lowering.onnx.ops.quantize_act import QUANTIZER_META

    return node.meta.get(QUANTIZER_META) if node.domain == DOMAIN else None


def _int8_quantizer(node: Any) -> dict | None:
    """A quantize_act call int8 kernels reproduce: 8 bits, symmetric per row, float32 (else None)."""
    meta = _quantizer(node)
    if meta is None or meta["bits"] != 8 or not meta["symmetric"] or meta["dtype"] != 1:  # 1: FLOAT
        return None
    return meta


def _nbits_readers(value: Any, bits: int) -> list:
    """The MatMulNBits of `bits` whose activation input is `value` (plain layout: no g_idx or bias input)."""
    return [node for node, index in value.uses() if index == 0 and node.domain == MS_DOMAIN
            and node.op_type == "MatMulNBits" and node.attributes["bits"].value == bits and len(node.inputs) <= 4]


def _per_channel_int8(node: Any) -> tuple | None:
    """An 8-bit MatMulNBits weight as int8 (code - 128) [K, N], int8 (zero - 128) [N] (None: symmetric) and
    float32 scales [N]; None unless each output column has one scale and one zero point (group-wise weights
    would need one MatMulInteger per group: they stay MatMulNBits)."""
    k, n = int(node.attributes["K"].value), int(node.attributes["N"].value)
    values = [v.const_value for v in node.inputs[1:]]
    if any(v is None for v in values):
        return None
    codes, scales, *zeros = (v.numpy() for v in values)
    scales = scales.reshape(n, -1)
    zeros = zeros[0].reshape(n, -1) if zeros else None
    if scales.dtype != np.float32 or (scales != scales[:, :1]).any() or (
            zeros is not None and (zeros.dtype != np.uint8 or (zeros != zeros[:, :1]).any())):
        return None
    weight = (codes.reshape(n, -1)[:, :k].T.astype(np.int16) - 128).astype(np.int8)
    zero = None if zeros is None or (zeros == 128).all() else (zeros[:, 0].astype(np.int16) - 128).astype(np.int8)
    return np.ascontiguousarray(weight), zero, np.ascontiguousarray(scales[:, 0])


def _int8_const(b: Any, name: str, array: np.ndarray) -> Any:
    """One initializer per small constant for the whole model."""
    cached = b.shared.setdefault("int8.constants", {})
    if name not in cached:
        cached[name] = b.initializer(f"int8.{name}", array)
    return cached[name]


def _uint8_codes(b: Any, call: Any, clip: float) -> tuple[Any, Any]:
    """(uint8 codes + 128, row scales) of the quantizer's input, computed with quantize_act's formulas, so the
    codes are PyTorch's: scale = max|x| * clip / 127 (1 where 0), code = round(clip(x / scale, -128, 127)).
    QuantizeLinear(x / scale, 1, 128) is that + 128: round half to even, then saturate to [0, 255], which for
    integers is the same as clipping to [-128, 127] first."""
    x = call.inputs[0]
    const = functools.partial(_int8_const, b)
    amax = b.node(call, "", "ReduceMax", [b.node(call, "", "Abs", [x]), const("axes", np.array([-1], np.int64))],
                  {"keepdims": 1})
    scale0 = b.node(call, "", "Mul", [amax, const(f"factor_{clip!r}", np.array(clip / 127, np.float32))])
    positive = b.node(call, "", "Greater", [scale0, const("zero", np.array(0, np.float32))])
    scale = b.node(call, "", "Where", [positive, scale0, const("one", np.array(1, np.float32))])
    ratio = b.node(call, "", "Div", [x, scale])
    offset = const("offset", np.array(128, np.uint8))
    return b.node(call, "", "QuantizeLinear", [ratio, const("one", np.array(1, np.float32)), offset]), scale


def _to_matmulinteger(b: Any, node: Any, codes: Any, row_scale: Any, weight: tuple) -> None:
    """MatMulNBits -> MatMulInteger(uint8 codes + 128, int8 weight codes) -> int32 -> float x column x row scale."""
    tag = node.inputs[1].name
    w, zero, scales = weight
    inputs = [codes, b.initializer(f"{tag}.int8", w), _int8_const(b, "offset", np.array(128, np.uint8))]
    if zero is not None:
        inputs.append(b.initializer(f"{tag}.int8_zero", zero))
    acc = b.node(node, "", "MatMulInteger", inputs)
    out = b.node(node, "", "Cast", [acc], {"to": b.ir.DataType.FLOAT})
    out = b.node(node, "", "Mul", [out, b.initializer(f"{tag}.column_scales", scales)])
    b.replace(node, b.node(node, "", "Mul", [out, row_scale]))


def fuse_int8_activations(model: Any, b: Any, mode: str = "exact", new_weights: bool = True) -> dict[str, int]:
    """8-bit symmetric activation quantizers become the compute instead of a fake quant around float:

    - mode "exact" and "all": feeding a per-channel 8-bit MatMulNBits (W8A8), MatMulInteger on the same codes
      (uint8 codes + 128 with zero point 128, int8 weights: ONNX Runtime's fastest exact int8 combination on
      CPU), equal to PyTorch up to float rounding of the final scale multiply;
    - mode "all": feeding a 4-bit MatMulNBits (W4A8), the fake quant is dropped and that MatMulNBits runs at
      accuracy_level 4 (MLAS quantizes activations to int8 per block of K: finer than per row, not exact).
    Anything else (asymmetric or 4-bit activations, group-wise 8-bit weights) stays as it is, counted.
    new_weights=False (a streamed export, weights already written) skips W8A8, which writes new int8 weights.
    """
    stats = {"int8_matmulinteger": 0, "int8_matmulnbits_level4": 0, "int8_quantizers_kept": 0}
    level4 = b.ir.convenience.convert_attribute("accuracy_level", 4)
    calls = [] if mode == "none" else [n for n in model.graph if _int8_quantizer(n) is not None]
    for call in calls:
        out = call.outputs[0]
        if mode == "all":
            for node in _nbits_readers(out, 4):
                node.replace_input_with(0, call.inputs[0])
                node.attributes["accuracy_level"] = level4
                stats["int8_matmulnbits_level4"] += 1
        readers = [(n, w) for n in (_nbits_readers(out, 8) if new_weights else [])
                   if (w := _per_channel_int8(n)) is not None]
        if readers:
            codes, row_scale = _uint8_codes(b, call, _int8_quantizer(call)["clip_ratio"])
            for node, weight in readers:
                _to_matmulinteger(b, node, codes, row_scale, weight)
                stats["int8_matmulinteger"] += 1
        if not out.uses() and not out.is_graph_output():
            b.graph.remove(call, safe=True)
    from fxpress.lowering.onnx.builder import _drop_unused_initializers

    _drop_unused_initializers(b.graph)  # the replaced MatMulNBits' weights
    stats["int8_quantizers_kept"] = sum(1 for n in model.graph if (_quantizer(n) or {}).get("bits") == 8)
    used = {n.op_type for n in model.graph if n.domain == DOMAIN}
    for key in [k for k, f in model.functions.items()
                if f.domain == DOMAIN and f.name.startswith("QuantizeAct_") and f.name not in used]:
        del model.functions[key]
    return stats
