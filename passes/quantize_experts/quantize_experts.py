"""QuantizeExperts: MoQa-style mixed precision for mixture-of-experts layers under an average-bit budget.

Find the MoE layers (`fxpress.graph.expert_layers`) -> analyse routing on calibration data (`routing`,
`analysis`: activation, sensitivity per expert/projection/bit width, correlation; `sensitivity`: the same at
the model output) -> choose bits per expert projection with an exact multiple-choice knapsack (`solver`;
with a trust-region family of plans measured whole on held-out text, as the additive prediction is most
wrong for plans far from uniform) -> rewrite: fused 3-D experts become `fxpress::grouped_linear_nbit`,
per-expert and shared-expert linears `fxpress::linear_nbit`, all with packed low-bit storage. Routers and
small gates stay in full precision; shared experts get `weights.shared_bits`. The plan is printed as a
table and saved in `program.metadata["quantize_experts"]`. The configuration groups are in `config`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

import fxpress.runtime.moe_quant  # noqa: F401  (defines fxpress::grouped_linear_nbit)
import fxpress.runtime.quant  # noqa: F401  (defines fxpress::linear_nbit)
from fxpress.errors import ConfigError
from fxpress.graph import (
    ExpertLayer,
    LinearUse,
    add_param,
    drop_param,
    expert_layers,
    param_source,
    replace_with_call,
)
from fxpress.passes.base import FLOAT_EXPERTS, Pass, register_pass
from fxpress.passes.quantize.config import regroup_fields
from fxpress.passes.quantize.gptq import QuantizedWeight
from fxpress.passes.quantize_experts.analysis import (
    ExpertFn,
    LayerAnalysis,
    MoEAnalysis,
    analyse_layer,
    expert_functions,
    proj_name,
    quantize_matrix,
    weight_matrix,
    weighted_hessian,
)
from fxpress.passes.quantize_experts.config import V3_FIELDS, ExpertAnalysis, ExpertBudget, ExpertWeights
from fxpress.passes.quantize_experts.routing import LayerData, calibration_rows, record_routing
from fxpress.passes.quantize_experts.sensitivity import layer_significance, model_sensitivity
from fxpress.passes.quantize_experts.solver import (
    Item,
    allocation_items,
    average_bits,
    bits_per_projection,
    select_plan,
    solve_allocation,
    trust_region_items,
)
from fxpress.passes.quantize_experts.stored import SpilledCandidates, check_streams
from fxpress.spill import SpillFolder

if TYPE_CHECKING:
    from fxpress.program import Program


# --- rewriting ------------------------------------------------------------------------------------
def _weight_source(node: torch.fx.Node, weight: torch.fx.Node) -> tuple | None:
    """The get_attr behind a matmul's weight operand and the view/cast chain between them."""
    return param_source(node.args[1] if node.args[1] is not None else weight)


def _erase_weight_chain(gm: torch.fx.GraphModule, src: tuple | None) -> None:
    """Erase the transposes/casts of a replaced matmul's weight that nothing else reads, and the orphaned parameter."""
    if src is None:
        return
    attr, chain = src
    for n in chain[::-1]:
        if n.users:
            return
        gm.graph.erase_node(n)
    if not attr.users:
        drop_param(gm, attr)


def _packed_nodes(gm: torch.fx.GraphModule, base: str, quantized: QuantizedWeight, before: torch.fx.Node
                  ) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None]:
    qweight, scales, zeros = quantized.packed()
    return (add_param(gm, f"{base}_qweight", qweight, before, buffer=True),
            add_param(gm, f"{base}_scales", scales, before, buffer=True),
            add_param(gm, f"{base}_zeros", zeros, before, buffer=True) if zeros is not None else None)


def replace_linear(gm: torch.fx.GraphModule, use: LinearUse, quantized: QuantizedWeight) -> None:
    """`use` (a 2-D linear or mm, or one expert slice) -> fxpress::linear_nbit with packed weights."""
    node = use.node
    q, s, z = _packed_nodes(gm, use.name.replace(".", "_"), quantized, node)
    src = _weight_source(node, use.weight)
    replace_with_call(gm, node, torch.ops.fxpress.linear_nbit.default, (
        use.input, q, s, z, use.bias, quantized.spec.bits, quantized.block_size, quantized.codes.shape[1]))
    _erase_weight_chain(gm, src)


def replace_grouped(gm: torch.fx.GraphModule, use: LinearUse, offsets: torch.fx.Node,
                    quantized: Iterable[QuantizedWeight]) -> None:
    """A fused grouped_mm over 3-D experts -> fxpress::grouped_linear_nbit (bits per expert).

    `quantized` may be a generator: each expert's packed codes go to the module (or its weight store) before
    the next expert is quantized.
    """
    node = use.node
    base = use.name.replace(".", "_")
    qs, zs, scales, bits = [], [], [], []
    for e, qw in enumerate(quantized):
        qweight, scale, zeros = qw.packed()
        qs.append(add_param(gm, f"{base}_e{e}_qweight", qweight, node, buffer=True))
        zs.append(add_param(gm, f"{base}_e{e}_zeros", zeros, node, buffer=True))
        scales.append(scale)
        bits.append(qw.spec.bits)
        block_size, columns = qw.block_size, qw.codes.shape[1]
    s = add_param(gm, f"{base}_scales", torch.stack(scales), node, buffer=True)
    src = _weight_source(node, use.weight)
    replace_with_call(gm, node, torch.ops.fxpress.grouped_linear_nbit.default, (
        use.input, offsets, qs, s, zs, bits, block_size, columns))
    _erase_weight_chain(gm, src)


# --- the pass ---------------------------------------------------------------------------------------
@register_pass
@dataclass
class QuantizeExperts(Pass):
    """Mixed-precision weight quantization of MoE experts under an average-bit `budget` (MoQa-style)."""

    name: ClassVar[str] = "quantize_experts"
    version: ClassVar[int] = 4
    needs_calibration: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset({FLOAT_EXPERTS})
    invalidates: ClassVar[frozenset[str]] = frozenset({FLOAT_EXPERTS})

    budget: ExpertBudget = field(default_factory=ExpertBudget)
    weights: ExpertWeights = field(default_factory=ExpertWeights)
    analysis: ExpertAnalysis = field(default_factory=ExpertAnalysis)
    verbose: bool = True

    def validate(self) -> None:
        for group in (self.budget, self.weights, self.analysis):
            group.validate()

    @classmethod
    def upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Version 3 held 16 flat fields (avg_bits, group_size, sensitivity, ...); version 4 groups them."""
        if version == 3:
            return regroup_fields(fields, V3_FIELDS)
        return super().upgrade_fields(version, fields)

    @property
    def _fisher(self) -> bool:
        """Whether the analysis records sampled-Fisher gradients (the model-output sensitivities)."""
        return self.budget.allocation == "moqa" and self.analysis.sensitivity in ("fisher", "loss")

    def run(self, program: Program) -> dict[str, Any]:
        gm = program.module
        layers = expert_layers(gm)
        if not layers:
            raise ConfigError("quantize_experts found no mixture-of-experts layer (a router whose topk feeds fused "
                              "grouped_mm experts or per-expert linears): use the 'quantize' pass for dense models")
        if self._fisher and program.is_causal_lm:
            check_streams(program, self.analysis.sensitivity)
        samples, select = self._split_calibration(program)
        keep = self._keeps_quantized(program)
        # a store-backed program keeps each layer's candidates on disk, not every layer's in memory
        spill = SpillFolder(program.weights.spill_dir) if keep and program.weights is not None else None

        def analyse(i: int, d: LayerData) -> tuple[LayerAnalysis, LayerData | None]:  # once the run passed layer i
            a = analyse_layer(expert_functions(gm, layers[i]), d, layers[i].index, tuple(self.budget.bit_choices),
                              self.weights.group_size, self.analysis.min_rows, prior_rows=self.analysis.prior_rows,
                              method=self.weights.method, keep_quantized=keep)
            if spill is not None:
                a.quantized = SpilledCandidates(a.quantized, spill)
            return a, self._kept_data(program, d)

        try:
            stats = self._run(program, layers, samples, select, analyse)
        finally:
            if spill is not None:
                spill.close()
        return {**stats, "candidates_spilled_bytes": spill.bytes if spill is not None else 0}

    def _run(self, program: Program, layers: list[ExpertLayer], samples: torch.Tensor | None,
             select: torch.Tensor | None, analyse: Callable[[int, LayerData], tuple[LayerAnalysis, LayerData | None]]
             ) -> dict[str, Any]:
        """Record routing (analysing each layer as the run passes it), measure, allocate, rewrite."""
        gm = program.module
        recorded = record_routing(program, layers, samples, fisher=self._fisher,
                                  fisher_samples=self.analysis.fisher_samples,
                                  text_gradient=self.analysis.sensitivity == "loss", on_layer=analyse)
        data = [d for _, d in recorded]
        calib = samples if samples is not None else program.calibration.batches
        with torch.no_grad():
            analysis = self._measure(program, layers, [a for a, _ in recorded], calib)
            items = allocation_items(analysis, self.budget.allocation, self.budget.granularity)
            plan, candidates = self._allocate(program, layers, analysis, items, calib if select is None else select)
            bits = bits_per_projection(plan)
            for layer, d, a in zip(layers, data, analysis.layers):  # one layer's expert weights read at a time
                self._rewrite_layer(gm, layer, expert_functions(gm, layer), d, a, bits)
                a.quantized.clear()
            warnings = self._shared_and_gates(gm, layers)
        if self._fisher and not program.is_causal_lm:
            warnings.append(f"sensitivity={self.analysis.sensitivity!r} needs a causal LM's next-token distributions: "
                            "the allocation used the routed MoE output error instead")
        summary = self._summary(analysis, items, plan, bits, layers)
        summary["candidates"] = candidates
        program.metadata["quantize_experts"] = summary
        program.metadata["moe_analysis"] = analysis.to_dict()
        if self.verbose:
            print(format_plan(summary))
        return {"avg_bits": summary["avg_bits"], "predicted_error": summary["predicted_error"],
                "experts": sum(a.num_experts for a in analysis.layers), "layers": len(layers),
                "forced_experts": summary["forced_experts"], "bits_histogram": summary["bits_histogram"],
                "warnings": warnings}

    def _split_calibration(self, program: Program) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(samples for the analysis or None = all, samples that score candidate plans or None = the analysis')."""
        if program.calibration is None:
            raise ConfigError("quantize_experts needs calibration data: pass calibration=... to fxpress.compile")
        batches = program.calibration.batches
        held_out = self.budget.selection_samples
        select = None
        if held_out:
            if held_out >= batches.shape[0]:
                raise ConfigError(f"quantize_experts.budget.selection_samples = {held_out} leaves no calibration "
                                  f"for the analysis ({batches.shape[0]} samples): give more calibration or fewer")
            batches, select = batches[:-held_out], batches[-held_out:]
        if self.analysis.calib_samples is not None:
            return batches[: self.analysis.calib_samples], select
        return (batches if select is not None else None), select

    def _keeps_quantized(self, program: Program) -> bool:
        """Whether the analysis keeps every quantized matrix: the measured sensitivities and plans swap them in;
        an in-memory program also reuses them in the rewrite. A store-backed one quantizes again there, so that
        only one layer's matrices are in memory at a time."""
        budget = self.budget
        measured = budget.allocation == "moqa" and (self.analysis.sensitivity == "kl" or len(set(budget.trust_region)) > 1)
        return measured or program.weights is None

    def _kept_data(self, program: Program, data: LayerData) -> LayerData | None:
        """What the rewrite needs of a layer's calibration rows: GPTQ's Hessians; RTN on a store-backed program
        nothing, so those rows are released as soon as the layer is analysed."""
        return data if self.weights.method == "gptq" or program.weights is None else None

    def _measure(self, program: Program, layers: list[ExpertLayer], analyses: list[LayerAnalysis], calib: torch.Tensor
                 ) -> MoEAnalysis:
        """The layers' analyses, then (per `analysis.sensitivity`) the model-output KL or the layer calibration."""
        choices, group_size = tuple(self.budget.bit_choices), self.weights.group_size
        analysis = MoEAnalysis(analyses, choices, group_size)
        if self.budget.allocation == "moqa" and self.analysis.sensitivity == "kl":
            model_sensitivity(program, layers, analysis.layers, calib)
        elif self.analysis.layer_calibration and self.budget.allocation == "moqa":
            layer_significance(program, layers, analysis.layers, calib, min(choices), group_size)
        return analysis

    def _allocate(self, program: Program, layers: list[ExpertLayer], analysis: MoEAnalysis, items: list[Item],
                  select: torch.Tensor) -> tuple[dict[tuple, int], list[dict[str, Any]]]:
        """The plan (bits per item) and, when several trust-region plans were measured on `select`, all of them."""
        budget = self.budget
        if budget.allocation == "uniform" and budget.avg_bits in budget.bit_choices:
            return {it.key: int(budget.avg_bits) for it in items}, []
        if budget.allocation == "moqa" and len(set(budget.trust_region)) > 1:
            return select_plan(program, layers, analysis, items, budget, select)
        return solve_allocation(trust_region_items(items, budget.avg_bits, budget.trust_region[0]), budget.avg_bits), []

    def _quantize(self, weight: torch.Tensor, bits: int, x: torch.Tensor | None, w: torch.Tensor | None
                  ) -> QuantizedWeight:
        gptq = self.weights.method == "gptq" and x is not None
        h = weighted_hessian(x, w) if gptq else None
        return quantize_matrix(weight, bits, self.weights.group_size, self.weights.method, h)

    def _rewrite_layer(self, gm: torch.fx.GraphModule, layer: ExpertLayer, fns: list[ExpertFn], data: LayerData | None,
                       analysis: LayerAnalysis, bits: dict[tuple[int, int, str], int]) -> None:
        """Replace the layer's expert matmuls, reusing the matrices the analysis already quantized."""
        def quantized(e: int, use: LinearUse, weight: torch.Tensor) -> QuantizedWeight:
            p = proj_name(use)
            b = bits[(layer.index, e, p)]
            if (e, p, b) in analysis.quantized:
                return analysis.quantized[(e, p, b)]
            x = w = None
            if self.weights.method == "gptq":
                x, w, _ = calibration_rows(data, e, self.analysis.min_rows)
                x = fns[e].inner(x) if p == proj_name(fns[e].down) else x
            return self._quantize(weight, b, x, w)

        if layer.fused:
            for use in [*layer.up, layer.down]:
                p = proj_name(use)
                replace_grouped(gm, use, layer.offsets, (quantized(e, use, fns[e].weights[p])
                                                         for e in range(layer.num_experts)))
            return
        for e, ex in enumerate(layer.experts):
            for use in [*ex.up, ex.down]:
                replace_linear(gm, use, quantized(e, use, weight_matrix(gm, use)))

    def _shared_and_gates(self, gm: torch.fx.GraphModule, layers: list[ExpertLayer]) -> list[str]:
        warnings = []
        shared_bits = self.weights.shared_bits
        for layer in layers:
            warnings.append(f"layer {layer.index}: router {layer.router.name} kept in full precision (by design)")
            for g in layer.gates:
                warnings.append(f"layer {layer.index}: gate {g.name} kept in full precision (by design)")
            for use in layer.shared:
                if shared_bits is None:
                    warnings.append(f"layer {layer.index}: shared expert {use.name} kept in full precision (shared_bits=None)")
                elif use.kind in ("linear", "mm"):
                    replace_linear(gm, use, quantize_matrix(weight_matrix(gm, use), shared_bits, self.weights.group_size))
                else:
                    warnings.append(f"layer {layer.index}: shared expert {use.name} ({use.kind}) left in full precision")
        return warnings

    def _summary(self, analysis: MoEAnalysis, items: list[Item], plan: dict[tuple, int],
                 bits: dict[tuple[int, int, str], int], layers: list[ExpertLayer]) -> dict[str, Any]:
        hist: dict[str, int] = {}
        for it in items:
            hist[str(plan[it.key])] = hist.get(str(plan[it.key]), 0) + it.numel
        rows = []
        for a in analysis.layers:
            for e in range(a.num_experts):
                rows.append({"layer": a.layer, "expert": e, "rows": a.rows[e], "share": a.share[e],
                             "forced_rows": a.forced.get(e, 0), "bits": {p: bits[(a.layer, e, p)] for p in a.projections}})
        budget = self.budget
        return {
            "trust_region": list(budget.trust_region), "selection_samples": budget.selection_samples,
            "allocation": budget.allocation, "granularity": budget.granularity, "method": self.weights.method,
            "sensitivity": self.analysis.sensitivity if budget.allocation == "moqa" else None,
            "avg_bits_target": budget.avg_bits, "avg_bits": average_bits(items, plan),
            "group_size": self.weights.group_size, "bit_choices": list(budget.bit_choices),
            "predicted_error": sum(it.errors[plan[it.key]] for it in items),
            "bits_histogram": hist, "shared_bits": self.weights.shared_bits, "router": "full precision",
            "forced_experts": sum(len(a.forced) for a in analysis.layers),
            "experts": rows,
            "shared": [u.name for layer in layers for u in layer.shared],
        }


def format_plan(summary: dict[str, Any]) -> str:
    """The allocation as a text table: one row per expert, one column per projection."""
    projs = list(summary["experts"][0]["bits"]) if summary["experts"] else []
    head = f"{'layer':>5} {'expert':>6} {'rows':>7} {'share':>6} {'forced':>6} " + " ".join(f"{p:>13}" for p in projs)
    lines = [f"quantize_experts: {summary['allocation']} allocation, {summary['avg_bits']:.3f} average bits "
             f"(target {summary['avg_bits_target']}), group {summary['group_size']}, {summary['method']}; "
             f"router full precision, shared experts {summary['shared_bits'] or 'full precision'}", head]
    for r in summary["experts"]:
        lines.append(f"{r['layer']:>5} {r['expert']:>6} {r['rows']:>7} {r['share']:>6.3f} {r['forced_rows']:>6} "
                     + " ".join(f"{r['bits'][p]:>13}" for p in projs))
    return "\n".join(lines)
