"""MoQa-style analysis of how calibration data meets a mixture of experts, in three stages.

1. Sparse data activation: per layer, the rows (token x top-k slots) and routing weight each expert
   receives, and how uneven that is (coefficient of variation, max/min, normalised entropy).
2. Data-parameter mapping: each expert's sensitivity, per projection and bit width: the squared
   error its quantization adds to the MoE output on the rows routed to it, weighted by the routing
   weight (sum_r w_r^2 ||f_q(x_r) - f(x_r)||^2), next to the data-free weight error; and what the
   model's output pays (`model_kl`): the mean KL of the model's next-token distributions on the
   calibration text when only that expert projection is quantized at that bit width, either to
   second order from sampled-Fisher gradients of each routed row (`record_fisher`, one forward and a
   few backwards per batch, in `routing`) or measured exactly by one forward per projection and bit width
   (`sensitivity.model_sensitivity`). Experts the calibration text barely reaches add the local error of
   `prior_rows` rows routed to them on purpose, converted to KL by the layer's measured KL per unit
   of local error.
3. Inter-expert correlation: how often experts fire together (co-firing lift) and how redundant
   their outputs are (cosine similarity of two experts' outputs on the same tokens).

Every expert is calibrated: an expert that receives fewer than `min_rows` routed rows also gets the
tokens its router scores highest for it ("routed on purpose"), so its statistics are never empty.
Everything is read from the graph (`fxpress.graph.expert_layers`) through one FX Interpreter run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fxpress.errors import ConfigError
from fxpress.graph import ExpertLayer, LinearUse, expert_layers, get_param, subgraph_function
from fxpress.passes.quantize.gptq import QuantizedWeight, WeightSpec, gptq, rtn
from fxpress.passes.quantize_experts.routing import LayerData, calibration_rows, fisher_kl, record_routing

if TYPE_CHECKING:
    from fxpress.program import Program


# --- experts as functions --------------------------------------------------------------------------
def proj_name(use: LinearUse) -> str:
    """A projection's short name from its parameter ('gate_up_proj', 'down_proj', 'up_proj', ...)."""
    parts = use.name.split(".")
    return parts[-2] if parts[-1] in ("weight",) and len(parts) > 1 else parts[-1]


def weight_matrix(gm: torch.nn.Module, use: LinearUse, expert: int | None = None,
                  param: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as [out, in] (one expert's slice of a fused 3-D parameter); `param`: the tensor, already read."""
    param = get_param(gm, use.weight).detach() if param is None else param
    if param.dim() == 3:
        param = param[use.expert if use.expert is not None else expert]
    return param if use.in_axis == -1 else param.T


@dataclass
class ExpertFn:
    """One expert as a function: up projections -> activation subgraph -> down projection."""

    up: list[LinearUse]
    down: LinearUse
    middle: torch.nn.Module
    weights: dict[str, torch.Tensor]  # projection name -> [out, in]
    biases: dict[str, torch.Tensor | None]

    @property
    def projections(self) -> list[str]:
        return [*(proj_name(u) for u in self.up), proj_name(self.down)]

    def __call__(self, x: torch.Tensor, replace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = {**self.weights, **(replace or {})}
        ups = [F.linear(x, w[proj_name(u)], self.biases[proj_name(u)]) for u in self.up]
        mid = self.middle(*ups)
        return F.linear(mid, w[proj_name(self.down)], self.biases[proj_name(self.down)])

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input for rows x (for its Hessian)."""
        return self.middle(*[F.linear(x, self.weights[proj_name(u)], self.biases[proj_name(u)]) for u in self.up])


def expert_functions(gm: torch.fx.GraphModule, layer: ExpertLayer) -> list[ExpertFn]:
    """Each routed expert of a layer as an ExpertFn (fused experts share one activation subgraph).

    Each parameter is read once (a store-backed fused [E, out, in] tensor is one read, not one per expert).
    """
    read: dict[str, torch.Tensor] = {}

    def param(node: torch.fx.Node) -> torch.Tensor:
        if str(node.target) not in read:
            read[str(node.target)] = get_param(gm, node).detach()
        return read[str(node.target)]

    def bias(use: LinearUse, e: int | None) -> torch.Tensor | None:
        if use.bias is None:
            return None
        b = param(use.bias)
        return b[e] if b.dim() == 2 and e is not None else b

    def fn(up: list[LinearUse], down: LinearUse, middle: torch.nn.Module, e: int | None) -> ExpertFn:
        uses = [*up, down]
        return ExpertFn(up, down, middle, {proj_name(u): weight_matrix(gm, u, e, param(u.weight)) for u in uses},
                        {proj_name(u): bias(u, e) for u in uses})

    if layer.fused:
        middle = subgraph_function(gm, [u.node for u in layer.up], layer.down.input)
        return [fn(layer.up, layer.down, middle, e) for e in range(layer.num_experts)]
    return [fn(ex.up, ex.down, subgraph_function(gm, [u.node for u in ex.up], ex.down.input), None)
            for ex in layer.experts]


# --- the three stages ------------------------------------------------------------------------------
@dataclass
class LayerAnalysis:
    """Stages 1-3 for one MoE layer."""

    layer: int
    num_experts: int
    rows: list[int]
    weight: list[float]
    share: list[float]
    cv: float
    max_over_min: float
    entropy: float  # normalised: 1 = perfectly even
    forced: dict[int, int]  # expert -> rows routed to it on purpose
    projections: list[str]
    numel: dict[str, int]  # projection -> parameters per expert
    sensitivity: dict[tuple[int, str], dict[int, float]]  # (expert, proj) -> bits -> routed output error
    weight_error: dict[tuple[int, str], dict[int, float]]  # data-free ||W - Q(W)||^2
    cofire_lift: list[list[float]] = field(default_factory=list)
    redundancy: list[list[float]] = field(default_factory=list)
    significance: float = 1.0  # end-to-end KL per unit of predicted output error (layer_significance)
    prior_rows: float = 2.0  # rows every expert is assumed to receive beyond the calibration's
    model_kl: dict[tuple[int, str], dict[int, float]] | None = None  # (expert, proj) -> bits -> model output KL
    quantized: dict[tuple[int, str, int], Any] = field(default_factory=dict, repr=False)  # reused by the rewrite

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "quantized"}
        for name in ("sensitivity", "weight_error", "model_kl"):
            if d[name] is not None:
                d[name] = {f"{e}.{p}": v for (e, p), v in d[name].items()}
        return d

    def prior_error(self, e: int, proj: str, bits: int) -> float:
        """The part of the local error that comes from the `prior_rows` assumed rows (the rest is routed)."""
        return self.sensitivity[(e, proj)][bits] * self.prior_rows / (self.rows[e] + self.prior_rows)


def _unevenness(share: torch.Tensor) -> tuple[float, float, float]:
    cv = float(share.std(unbiased=False) / share.mean()) if share.mean() > 0 else 0.0
    mom = float(share.max() / share.min()) if share.min() > 0 else math.inf
    p = share[share > 0]
    ent = float(-(p * p.log()).sum() / math.log(len(share))) if len(share) > 1 else 1.0
    return cv, mom, ent


def quantize_matrix(weight: torch.Tensor, bits: int, group_size: int, method: str = "rtn",
                    h: torch.Tensor | None = None) -> QuantizedWeight:
    """One expert matrix quantized; GPTQ uses the routing-weighted Hessian `h`."""
    spec = WeightSpec(bits=bits, group_size=group_size if group_size <= weight.shape[1] else -1)
    if method == "gptq" and h is not None:
        return gptq(weight, h, spec)
    return rtn(weight, spec)


def weighted_hessian(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """2/n sum_r w_r x_r x_r^T in float64 (MoEQuant: each row counts by its gate affinity)."""
    xd = x.double()
    return (xd.T * w.double()) @ xd * (2.0 / max(1, x.shape[0]))


def analyse_layer(
    fns: list[ExpertFn], data: LayerData, index: int, bit_choices: tuple[int, ...], group_size: int,
    min_rows: int = 32, prior_rows: float = 2.0, method: str = "rtn", redundancy_rows: int = 256,
    keep_quantized: bool = False,
) -> LayerAnalysis:
    """Stages 1-3 for one layer (see the module docstring); `keep_quantized` keeps every quantized matrix."""
    e_count = len(fns)
    counts = torch.tensor([r.shape[0] for r in data.rows], dtype=torch.float64)
    wsum = torch.tensor([float(w.sum()) for w in data.row_weights], dtype=torch.float64)
    share = counts / counts.sum().clamp_min(1)
    cv, mom, ent = _unevenness(share)
    projections = fns[0].projections
    sens: dict[tuple[int, str], dict[int, float]] = {}
    werr: dict[tuple[int, str], dict[int, float]] = {}
    forced: dict[int, int] = {}
    kept: dict[tuple[int, str, int], Any] = {}
    measured: dict[tuple[int, str], dict[int, float]] = {}
    for e, fn in enumerate(fns):
        x, w, n_forced = calibration_rows(data, e, min_rows)
        if n_forced:
            forced[e] = n_forced
        scale = (float(counts[e]) + prior_rows) / max(1, x.shape[0])  # expected routed rows per row used
        ref = fn(x)
        inner = fn.inner(x) if method == "gptq" else None
        for proj in projections:
            weight = fn.weights[proj]
            h = None
            if method == "gptq":
                h = weighted_hessian(inner if proj == proj_name(fn.down) else x, w)
            sens[(e, proj)], werr[(e, proj)], measured[(e, proj)] = {}, {}, {}
            for bits in bit_choices:
                qw = quantize_matrix(weight, bits, group_size, method, h)
                if keep_quantized:
                    kept[(e, proj, bits)] = qw
                q = qw.dequantize().to(weight.dtype)
                out = fn(x, {proj: q})
                # output error of the MoE, weighted by the routing weight
                sens[(e, proj)][bits] = float(((out - ref).square().sum(-1) * w.square()).sum()) * scale
                if data.row_fisher is not None:  # the model's KL, to second order
                    measured[(e, proj)][bits] = fisher_kl(data, e, out - ref)
                werr[(e, proj)][bits] = float((q - weight).double().square().sum())
    numel = {p: fns[0].weights[p].numel() for p in projections}
    analysis = LayerAnalysis(
        layer=index, num_experts=e_count, rows=counts.long().tolist(), weight=wsum.tolist(), share=share.tolist(),
        cv=cv, max_over_min=mom, entropy=ent, forced=forced, projections=projections, numel=numel,
        sensitivity=sens, weight_error=werr, prior_rows=prior_rows, quantized=kept,
    )
    if data.row_fisher is not None:
        with_prior(analysis, measured)
    analysis.cofire_lift = cofire_lift(data.chosen).tolist()
    analysis.redundancy = output_redundancy(fns, data.inputs[:redundancy_rows]).tolist()
    return analysis


def with_prior(a: LayerAnalysis, measured: dict[tuple[int, str], dict[int, float]]) -> None:
    """Set `a.model_kl` = measured model KL + the prior rows' local error converted to KL.

    The conversion factor is the layer's measured KL per unit of routed local error, so an expert
    the calibration text never reaches costs what `prior_rows` rows routed to it on purpose would.
    """
    routed = sum(v[b] - a.prior_error(e, p, b) for (e, p), v in a.sensitivity.items() for b in v)
    per_unit = max(0.0, sum(v for d in measured.values() for v in d.values()) / routed) if routed > 0 else 0.0
    a.model_kl = {key: {b: v + per_unit * a.prior_error(*key, b) for b, v in d.items()} for key, d in measured.items()}


def cofire_lift(chosen: torch.Tensor) -> torch.Tensor:
    """P(e1 and e2 both chosen) / (P(e1) P(e2)): > 1 means the pair fires together more than chance."""
    c = chosen.double()
    p = c.mean(0)
    joint = c.T @ c / max(1, c.shape[0])
    lift = joint / (p[:, None] * p[None, :]).clamp_min(1e-12)
    lift.fill_diagonal_(1.0)
    return lift


def output_redundancy(fns: list[ExpertFn], x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of two experts' outputs on the same tokens."""
    with torch.no_grad():
        outs = torch.stack([F.normalize(fn(x), dim=-1) for fn in fns])  # [E, n, H]
    return torch.einsum("anh,bnh->ab", outs, outs) / max(1, x.shape[0])


@dataclass
class MoEAnalysis:
    """The analysis of every MoE layer of a program."""

    layers: list[LayerAnalysis]
    bit_choices: tuple[int, ...]
    group_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"bit_choices": list(self.bit_choices), "group_size": self.group_size,
                "layers": [a.to_dict() for a in self.layers]}

    def table(self) -> str:
        """Stage 1 and 3 summary, one line per layer."""
        lines = ["layer  experts  cv    max/min  entropy  forced  top co-firing pair (lift)  most redundant pair (cos)"]
        for a in self.layers:
            lift = torch.tensor(a.cofire_lift)
            red = torch.tensor(a.redundancy)
            lift.fill_diagonal_(-1)
            red.fill_diagonal_(-2)
            i = int(lift.argmax())
            j = int(red.argmax())
            e = a.num_experts
            lines.append(f"{a.layer:5d}  {e:7d}  {a.cv:4.2f}  {a.max_over_min:7.1f}  {a.entropy:7.2f}  {len(a.forced):6d}  "
                         f"{i // e}+{i % e} ({float(lift.flatten()[i]):.2f}){'':14s}{j // e}+{j % e} ({float(red.flatten()[j]):.2f})")
        return "\n".join(lines)


def analyse_program(
    program: Program, bit_choices: tuple[int, ...] = (2, 3, 4), group_size: int = 64, min_rows: int = 32,
    method: str = "rtn", samples: torch.Tensor | None = None, layers: list[ExpertLayer] | None = None,
    fisher: bool = False, fisher_samples: int = 8,
) -> MoEAnalysis:
    """Run stages 1-3 on every MoE layer of `program` with its calibration data (or `samples`)."""
    layers = expert_layers(program.module) if layers is None else layers
    if not layers:
        raise ConfigError("no mixture-of-experts layer found in the graph: quantize_experts needs a router (topk) "
                          "feeding fused grouped_mm experts or per-expert linears")
    data = record_routing(program, layers, samples, fisher=fisher, fisher_samples=fisher_samples)
    result = []
    with torch.no_grad():
        for layer, d in zip(layers, data):
            fns = expert_functions(program.module, layer)
            result.append(analyse_layer(fns, d, layer.index, tuple(bit_choices), group_size, min_rows, method=method))
    return MoEAnalysis(result, tuple(bit_choices), group_size)
