"""QuantizeExperts: MoQa-style mixed precision for mixture-of-experts layers under an average-bit budget.

Find the MoE layers (`fxpress.graph.expert_layers`) -> analyse routing on calibration data
(`fxpress.passes.quantize_experts.analysis`: activation, sensitivity per expert/projection/bit width, correlation) ->
choose bits per expert projection with an exact multiple-choice knapsack -> rewrite: fused 3-D experts
become `fxpress::grouped_linear_nbit`, per-expert and shared-expert linears `fxpress::linear_nbit`,
all with packed low-bit storage. Routers and small gates stay in full precision; shared experts get
`shared_bits`. The plan is printed as a table and saved in `program.metadata["quantize_experts"]`.

Fields: `avg_bits` (budget over the routed experts' weights), `bit_choices`, `group_size`, `allocation`,
`granularity` ("projection": gate/up and down get their own bits; "expert": one width per expert),
`method` ("rtn", or "gptq" with each expert's routing-weighted Hessian), `sensitivity` ("fisher", the
default: the model's output KL on the calibration text when only that expert projection is quantized
at that bit width, to second order from `fisher_samples` sampled-label gradients per routed row, one
forward and `fisher_samples` backwards per calibration batch; "kl": the same KL measured exactly, one
forward over the calibration text per projection and bit width (slow); "output": the MoE output error
weighted by routing weight, local to the layer; causal LMs only for "fisher" and "kl" on KL, other
programs fall back to the output error),
`layer_calibration` (with "output"/"fisher": rescale each layer's errors by a measured end-to-end KL),
`min_rows` (experts with fewer routed rows get tokens routed to them on purpose), `shared_bits`,
`trust_region` (penalties mu: one knapsack plan per mu, the error plus mu x the mean predicted error per
parameter, per parameter and bit away from `avg_bits`; mu = 0 is the plain knapsack, a large mu keeps
bits near uniform) and `selection_samples` (the last that many calibration samples are kept out of the
analysis and each "moqa" candidate plan is measured whole on them, all its errors together: next-token
NLL for causal LMs, output error otherwise; the lowest wins; 0: measured on the analysis' own samples).
Why measured: the additive second-order KL is a good per-projection predictor, but on text unlike the
calibration text the next-token loss does not follow the KL for plans that move many weights to 2 and
4 bits (the loss's first-order term, which the KL leaves out, differs between texts), so a held-out text
decides how far to trust it. Give text of another kind than the calibration text (e.g. the "heldout" split).

Allocations: "moqa" (the analysis' stage 2 sensitivity: end-to-end KL, or routed output error),
"frequency" (activation frequency x weight error, as earlier MoE work), "uniform" (every expert
alike: one bit width when the budget is one of the choices, else weight error alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar

import numpy as np
import torch

import fxpress.runtime.moe_quant  # noqa: F401  (defines fxpress::grouped_linear_nbit)
import fxpress.runtime.quant  # noqa: F401  (defines fxpress::linear_nbit)
from fxpress.calibration import program_inputs
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
from fxpress.passes.base import FLOAT_EXPERTS, Pass, check_choice, check_range, register_pass
from fxpress.passes.quantize_experts.analysis import (
    LayerAnalysis,
    LayerData,
    MoEAnalysis,
    analyse_layer,
    calibration_rows,
    expert_functions,
    layer_significance,
    model_sensitivity,
    planned_weights,
    program_loss,
    proj_name,
    quantize_matrix,
    record_routing,
    weight_matrix,
    weighted_hessian,
)
from fxpress.program import Program


# --- allocation: exact multiple-choice knapsack ----------------------------------------------------
@dataclass
class Item:
    """One thing that gets a bit width: (layer, expert, projection); cost per bit and error per choice."""

    key: tuple
    numel: int
    errors: dict[int, float]


def solve_allocation(items: list[Item], avg_bits: float) -> dict[tuple, int]:
    """Bits per item minimising the summed error with sum(numel*bits) <= avg_bits * sum(numel). Exact.

    Multiple-choice knapsack by dynamic programming over the budget in units of gcd(numel), so
    every cost is an integer and the optimum is exact (ties go to the fewest bits used).
    """
    if not items:
        return {}
    unit = reduce(math.gcd, [it.numel for it in items])
    sizes = [it.numel // unit for it in items]
    capacity = int(math.floor(avg_bits * sum(sizes) + 1e-9))
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = np.full((len(items), capacity + 1), -1, dtype=np.int16)
    for i, (it, size) in enumerate(zip(items, sizes)):
        new = np.full(capacity + 1, np.inf)
        for bits in sorted(it.errors):
            cost = size * bits
            if cost > capacity:
                continue
            cand = best[: capacity + 1 - cost] + it.errors[bits]
            better = cand < new[cost:]
            new[cost:][better] = cand[better]
            picks[i, cost:][better] = bits
        best = new
    if not np.isfinite(best).any():
        low = min(min(it.errors) for it in items)
        raise ConfigError(f"an average of {avg_bits} bits is below the smallest bit choice ({low}): raise avg_bits")
    c = int(np.argmin(best))  # first minimum: the cheapest among equal errors
    plan: dict[tuple, int] = {}
    for i in range(len(items) - 1, -1, -1):
        bits = int(picks[i, c])
        plan[items[i].key] = bits
        c -= sizes[i] * bits
    return plan


def trust_region_items(items: list[Item], avg_bits: float, mu: float) -> list[Item]:
    """Items whose error also pays `mu` x (mean predicted error per parameter) per parameter and bit away from avg_bits.

    mu = 0 is the plain knapsack; a larger mu keeps the plan closer to uniform bits. The predicted
    (additive, second-order) error is most wrong for plans that move many weights far from the average,
    so a family over mu, each member measured, guards against trusting it too far.
    """
    if mu == 0:
        return items
    ref = min(items[0].errors, key=lambda b: (abs(b - avg_bits), b))
    scale = sum(it.errors[ref] for it in items) / max(1, sum(it.numel for it in items))
    return [Item(it.key, it.numel, {b: v + mu * scale * it.numel * abs(b - avg_bits) for b, v in it.errors.items()})
            for it in items]


def average_bits(items: list[Item], plan: dict[tuple, int]) -> float:
    total = sum(it.numel for it in items)
    return sum(it.numel * plan[it.key] for it in items) / max(1, total)


def allocation_items(analysis: MoEAnalysis, allocation: str, granularity: str) -> list[Item]:
    """Items and their predicted errors for one allocation rule (see the module docstring)."""
    items = []
    for a in analysis.layers:
        for e in range(a.num_experts):
            groups = [[p] for p in a.projections] if granularity == "projection" else [a.projections]
            for projs in groups:
                errors = {}
                for bits in analysis.bit_choices:
                    if allocation == "moqa" and a.model_kl is not None:
                        errors[bits] = sum(a.model_kl[(e, p)][bits] for p in projs)
                    elif allocation == "moqa":
                        errors[bits] = a.significance * sum(a.sensitivity[(e, p)][bits] for p in projs)
                    elif allocation == "frequency":
                        errors[bits] = a.share[e] * sum(a.weight_error[(e, p)][bits] for p in projs)
                    else:
                        errors[bits] = sum(a.weight_error[(e, p)][bits] for p in projs)
                key = (a.layer, e, "+".join(projs))
                items.append(Item(key, sum(a.numel[p] for p in projs), errors))
    return items


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


def _packed_nodes(gm, base: str, quantized, before) -> tuple[Any, Any, Any]:
    qweight, scales, zeros = quantized.packed()
    return (add_param(gm, f"{base}_qweight", qweight, before, buffer=True),
            add_param(gm, f"{base}_scales", scales, before, buffer=True),
            add_param(gm, f"{base}_zeros", zeros, before, buffer=True) if zeros is not None else None)


def replace_linear(gm: torch.fx.GraphModule, use: LinearUse, quantized) -> None:
    """`use` (a 2-D linear or mm, or one expert slice) -> fxpress::linear_nbit with packed weights."""
    node = use.node
    q, s, z = _packed_nodes(gm, use.name.replace(".", "_"), quantized, node)
    src = _weight_source(node, use.weight)
    replace_with_call(gm, node, torch.ops.fxpress.linear_nbit.default, (
        use.input, q, s, z, use.bias, quantized.spec.bits, quantized.block_size, quantized.codes.shape[1]))
    _erase_weight_chain(gm, src)


def replace_grouped(gm: torch.fx.GraphModule, use: LinearUse, offsets, quantized: list) -> None:
    """A fused grouped_mm over 3-D experts -> fxpress::grouped_linear_nbit (bits per expert)."""
    node = use.node
    base = use.name.replace(".", "_")
    qs, zs, scales = [], [], []
    for e, qw in enumerate(quantized):
        qweight, scale, zeros = qw.packed()
        qs.append(add_param(gm, f"{base}_e{e}_qweight", qweight, node, buffer=True))
        zs.append(add_param(gm, f"{base}_e{e}_zeros", zeros, node, buffer=True))
        scales.append(scale)
    s = add_param(gm, f"{base}_scales", torch.stack(scales), node, buffer=True)
    bits = [qw.spec.bits for qw in quantized]
    src = _weight_source(node, use.weight)
    replace_with_call(gm, node, torch.ops.fxpress.grouped_linear_nbit.default, (
        use.input, offsets, qs, s, zs, bits, quantized[0].block_size, quantized[0].codes.shape[1]))
    _erase_weight_chain(gm, src)


# --- the pass ---------------------------------------------------------------------------------------
@register_pass
@dataclass
class QuantizeExperts(Pass):
    """Mixed-precision weight quantization of MoE experts under an average-bit budget (MoQa-style)."""

    name: ClassVar[str] = "quantize_experts"
    version: ClassVar[int] = 3
    needs_calibration: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = frozenset({FLOAT_EXPERTS})
    invalidates: ClassVar[frozenset[str]] = frozenset({FLOAT_EXPERTS})

    avg_bits: float = 3.0
    bit_choices: tuple[int, ...] = (2, 3, 4)
    group_size: int = 64
    allocation: str = "moqa"
    granularity: str = "projection"
    method: str = "rtn"
    shared_bits: int | None = 8
    min_rows: int = 32
    prior_rows: float = 2.0
    sensitivity: str = "fisher"
    fisher_samples: int = 8
    layer_calibration: bool = False
    calib_samples: int | None = None
    trust_region: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    selection_samples: int = 0
    verbose: bool = True

    def validate(self) -> None:
        choices = tuple(self.bit_choices)
        if not choices or any(not isinstance(b, int) or not 1 <= b <= 8 for b in choices) or len(set(choices)) != len(choices):
            raise ConfigError(f"quantize_experts.bit_choices = {self.bit_choices!r}: give distinct integers in 1..8, e.g. (2, 3, 4)")
        check_range(self.name, "avg_bits", self.avg_bits, min(choices), max(choices))
        if not (self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size >= 8 and self.group_size % 8 == 0)):
            raise ConfigError(f"quantize_experts.group_size = {self.group_size!r}: use -1 (per channel) or a multiple of 8 (e.g. 64)")
        check_choice(self.name, "allocation", self.allocation, ("moqa", "frequency", "uniform"))
        check_choice(self.name, "granularity", self.granularity, ("projection", "expert"))
        check_choice(self.name, "method", self.method, ("rtn", "gptq"))
        check_choice(self.name, "sensitivity", self.sensitivity, ("fisher", "loss", "kl", "output"))
        check_range(self.name, "fisher_samples", self.fisher_samples, 1, 256)
        if self.shared_bits is not None:
            check_range(self.name, "shared_bits", self.shared_bits, 2, 8)
        check_range(self.name, "min_rows", self.min_rows, 1, 1 << 20)
        mus = tuple(self.trust_region)
        if not mus or any(not isinstance(m, (int, float)) or m < 0 or not math.isfinite(m) for m in mus):
            raise ConfigError(f"quantize_experts.trust_region = {self.trust_region!r}: give one or more finite "
                              "penalties >= 0, e.g. (0.0, 0.5, 1.0); (0.0,) is the plain knapsack")
        check_range(self.name, "selection_samples", self.selection_samples, 0, 1 << 20)

    def run(self, program: Program) -> dict[str, Any]:
        gm = program.module
        layers = expert_layers(gm)
        if not layers:
            raise ConfigError("quantize_experts found no mixture-of-experts layer (a router whose topk feeds fused "
                              "grouped_mm experts or per-expert linears): use the 'quantize' pass for dense models")
        samples, select = self._split_calibration(program)
        fisher = self.allocation == "moqa" and self.sensitivity in ("fisher", "loss")
        data = record_routing(program, layers, samples, fisher=fisher, fisher_samples=self.fisher_samples,
                              text_gradient=self.sensitivity == "loss")
        with torch.no_grad():
            fns = [expert_functions(gm, layer) for layer in layers]
            analysis = MoEAnalysis([
                analyse_layer(f, d, layer.index, tuple(self.bit_choices), self.group_size, self.min_rows,
                              prior_rows=self.prior_rows, method=self.method, keep_quantized=True)
                for layer, f, d in zip(layers, fns, data)
            ], tuple(self.bit_choices), self.group_size)
            calib = samples if samples is not None else program.calibration.batches
            if self.allocation == "moqa" and self.sensitivity == "kl":
                model_sensitivity(program, layers, analysis.layers, calib)
            elif self.layer_calibration and self.allocation == "moqa":
                layer_significance(program, layers, fns, analysis.layers, calib, min(self.bit_choices), self.group_size)
            items = allocation_items(analysis, self.allocation, self.granularity)
            candidates: list[dict[str, Any]] = []
            if self.allocation == "uniform" and self.avg_bits in self.bit_choices:
                plan = {it.key: int(self.avg_bits) for it in items}
            elif self.allocation == "moqa" and len(set(self.trust_region)) > 1:
                plan, candidates = self._select(program, layers, analysis, items, calib if select is None else select)
            else:
                plan = solve_allocation(trust_region_items(items, self.avg_bits, self.trust_region[0]), self.avg_bits)
            bits = self._bits_per_projection(analysis, plan)
            for layer, f, d, a in zip(layers, fns, data, analysis.layers):
                self._rewrite_layer(gm, layer, f, d, a, bits)
                a.quantized.clear()
            warnings = self._shared_and_gates(gm, layers)
            if self.allocation == "moqa" and self.sensitivity in ("fisher", "loss") and not program.is_causal_lm:
                warnings.append(f"sensitivity={self.sensitivity!r} needs a causal LM's next-token distributions: "
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

    def _split_calibration(self, program) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(samples for the analysis or None = all, samples that score candidate plans or None = the analysis')."""
        if program.calibration is None:
            raise ConfigError("quantize_experts needs calibration data: pass calibration=... to fxpress.compile")
        batches = program.calibration.batches
        select = None
        if self.selection_samples:
            if self.selection_samples >= batches.shape[0]:
                raise ConfigError(f"quantize_experts.selection_samples = {self.selection_samples} leaves no calibration "
                                  f"for the analysis ({batches.shape[0]} samples): give more calibration or fewer")
            batches, select = batches[: -self.selection_samples], batches[-self.selection_samples :]
        if self.calib_samples is not None:
            return batches[: self.calib_samples], select
        return (batches if select is not None else None), select

    def _select(self, program, layers, analysis: MoEAnalysis, items: list[Item], samples: torch.Tensor):
        """One knapsack plan per trust-region penalty, each measured whole on `samples`; the lowest loss wins.

        The measured loss (next-token NLL for causal LMs) includes what the additive prediction leaves out:
        errors of different projections interacting, and how the text's own loss, not only the KL, moves.
        Ties go to the smaller penalty (the order of `trust_region`, sorted).
        """
        reference = None
        if not program.is_causal_lm:
            reference = [program.module(*program_inputs(program, b)) for b in samples.split(16)]
            reference = [(r[0] if isinstance(r, (tuple, list)) else r).detach() for r in reference]
        seen: dict[tuple, dict[str, Any]] = {}
        best = None
        for mu in sorted(set(self.trust_region)):
            plan = solve_allocation(trust_region_items(items, self.avg_bits, mu), self.avg_bits)
            key = tuple(sorted(plan.items()))
            if key not in seen:
                with planned_weights(program.module, layers, analysis.layers, self._bits_per_projection(analysis, plan)):
                    loss = program_loss(program, samples, reference)
                seen[key] = {"mu": [], "loss": loss, "predicted_error": sum(it.errors[plan[it.key]] for it in items),
                             "mean_abs_deviation": sum(it.numel * abs(plan[it.key] - self.avg_bits) for it in items)
                             / max(1, sum(it.numel for it in items))}
                if best is None or loss < best[0]:
                    best = (loss, plan, key)
            seen[key]["mu"].append(mu)
        for key, c in seen.items():
            c["chosen"] = key == best[2]  # exactly one, even when two plans measure the same loss
        return best[1], list(seen.values())

    def _bits_per_projection(self, analysis: MoEAnalysis, plan: dict[tuple, int]) -> dict[tuple[int, int, str], int]:
        out = {}
        for (layer, e, projs), b in plan.items():
            for p in projs.split("+"):
                out[(layer, e, p)] = b
        return out

    def _quantize(self, weight: torch.Tensor, bits: int, x: torch.Tensor | None, w: torch.Tensor | None):
        h = weighted_hessian(x, w) if self.method == "gptq" and x is not None else None
        return quantize_matrix(weight, bits, self.group_size, self.method, h)

    def _rewrite_layer(self, gm, layer: ExpertLayer, fns, data: LayerData, analysis: LayerAnalysis, bits) -> None:
        """Replace the layer's expert matmuls, reusing the matrices the analysis already quantized."""
        def quantized(e: int, use: LinearUse, weight: torch.Tensor):
            p = proj_name(use)
            b = bits[(layer.index, e, p)]
            if (e, p, b) in analysis.quantized:
                return analysis.quantized[(e, p, b)]
            x = w = None
            if self.method == "gptq":
                x, w, _ = calibration_rows(data, e, self.min_rows)
                x = fns[e].inner(x) if p == proj_name(fns[e].down) else x
            return self._quantize(weight, b, x, w)

        if layer.fused:
            for use in [*layer.up, layer.down]:
                p = proj_name(use)
                replace_grouped(gm, use, layer.offsets, [quantized(e, use, fns[e].weights[p])
                                                         for e in range(layer.num_experts)])
            return
        for e, ex in enumerate(layer.experts):
            for use in [*ex.up, ex.down]:
                replace_linear(gm, use, quantized(e, use, weight_matrix(gm, use)))

    def _shared_and_gates(self, gm, layers: list[ExpertLayer]) -> list[str]:
        warnings = []
        for layer in layers:
            warnings.append(f"layer {layer.index}: router {layer.router.name} kept in full precision (by design)")
            for g in layer.gates:
                warnings.append(f"layer {layer.index}: gate {g.name} kept in full precision (by design)")
            for use in layer.shared:
                if self.shared_bits is None:
                    warnings.append(f"layer {layer.index}: shared expert {use.name} kept in full precision (shared_bits=None)")
                elif use.kind in ("linear", "mm"):
                    replace_linear(gm, use, quantize_matrix(weight_matrix(gm, use), self.shared_bits, self.group_size))
                else:
                    warnings.append(f"layer {layer.index}: shared expert {use.name} ({use.kind}) left in full precision")
        return warnings

    def _summary(self, analysis: MoEAnalysis, items, plan, bits, layers) -> dict[str, Any]:
        hist: dict[str, int] = {}
        for it in items:
            hist[str(plan[it.key])] = hist.get(str(plan[it.key]), 0) + it.numel
        rows = []
        for a in analysis.layers:
            for e in range(a.num_experts):
                rows.append({"layer": a.layer, "expert": e, "rows": a.rows[e], "share": a.share[e],
                             "forced_rows": a.forced.get(e, 0), "bits": {p: bits[(a.layer, e, p)] for p in a.projections}})
        return {
            "trust_region": list(self.trust_region), "selection_samples": self.selection_samples,
            "allocation": self.allocation, "granularity": self.granularity, "method": self.method,
            "sensitivity": self.sensitivity if self.allocation == "moqa" else None,
            "avg_bits_target": self.avg_bits, "avg_bits": average_bits(items, plan),
            "group_size": self.group_size, "bit_choices": list(self.bit_choices),
            "predicted_error": sum(it.errors[plan[it.key]] for it in items),
            "bits_histogram": hist, "shared_bits": self.shared_bits, "router": "full precision",
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
