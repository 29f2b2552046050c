"""MoQa-style analysis of how calibration data meets a mixture of experts, in three stages.

1. Sparse data activation: per layer, the rows (token x top-k slots) and routing weight each expert
   receives, and how uneven that is (coefficient of variation, max/min, normalised entropy).
2. Data-parameter mapping: each expert's sensitivity, per projection and bit width: the squared
   error its quantization adds to the MoE output on the rows routed to it, weighted by the routing
   weight (sum_r w_r^2 ||f_q(x_r) - f(x_r)||^2), next to the data-free weight error.
3. Inter-expert correlation: how often experts fire together (co-firing lift) and how redundant
   their outputs are (cosine similarity of two experts' outputs on the same tokens).

Every expert is calibrated: an expert that receives fewer than `min_rows` routed rows also gets the
tokens its router scores highest for it ("routed on purpose"), so its statistics are never empty.
Everything is read from the graph (`fxpress.graph.expert_layers`) through one FX Interpreter run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fxpress.calibration import for_each_activation, program_inputs
from fxpress.errors import ConfigError
from fxpress.gptq import WeightSpec, gptq, rtn
from fxpress.graph import ExpertLayer, LinearUse, expert_layers, get_param, set_param, subgraph_function


# --- experts as functions --------------------------------------------------------------------------
def proj_name(use: LinearUse) -> str:
    """A projection's short name from its parameter ('gate_up_proj', 'down_proj', 'up_proj', ...)."""
    parts = use.name.split(".")
    return parts[-2] if parts[-1] in ("weight",) and len(parts) > 1 else parts[-1]


def weight_matrix(gm: torch.nn.Module, use: LinearUse, expert: int | None = None) -> torch.Tensor:
    """The weight as [out, in] (one expert's slice of a fused 3-D parameter)."""
    param = get_param(gm, use.weight).detach()
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
    """Each routed expert of a layer as an ExpertFn (fused experts share one activation subgraph)."""
    def bias(use: LinearUse, e: int | None) -> torch.Tensor | None:
        if use.bias is None:
            return None
        b = get_param(gm, use.bias).detach()
        return b[e] if b.dim() == 2 and e is not None else b

    fns = []
    if layer.fused:
        middle = subgraph_function(gm, [u.node for u in layer.up], layer.down.input)
        for e in range(layer.num_experts):
            uses = [*layer.up, layer.down]
            fns.append(ExpertFn(layer.up, layer.down, middle,
                                {proj_name(u): weight_matrix(gm, u, e) for u in uses},
                                {proj_name(u): bias(u, e) for u in uses}))
        return fns
    for ex in layer.experts:
        middle = subgraph_function(gm, [u.node for u in ex.up], ex.down.input)
        uses = [*ex.up, ex.down]
        fns.append(ExpertFn(ex.up, ex.down, middle, {proj_name(u): weight_matrix(gm, u) for u in uses},
                            {proj_name(u): bias(u, None) for u in uses}))
    return fns


# --- recording routing data ------------------------------------------------------------------------
@dataclass
class LayerData:
    """What calibration recorded for one layer: inputs, router logits, each expert's rows and weights."""

    inputs: torch.Tensor  # [T, H]
    logits: torch.Tensor  # [T, E]
    chosen: torch.Tensor  # [T, E] bool: expert e among token t's top-k
    rows: list[torch.Tensor]  # per expert [n_e, H]
    row_weights: list[torch.Tensor]  # per expert [n_e]
    row_fisher: list[torch.Tensor] | None = None  # per expert [n_e, H]: (d loss / d expert output)^2


def _wanted(layer: ExpertLayer) -> dict[str, Any]:
    names = {"input": layer.input.name, "logits": layer.router.node.name}
    if layer.fused:
        names.update(rows=layer.up[0].input.name, offsets=layer.offsets.name, row_weights=layer.row_weights.name,
                     expert_ids=layer.expert_ids.name)
    else:
        names["weights"] = [ex.weight.name for ex in layer.experts]
    return names


class _GradRecorder(torch.fx.Interpreter):
    """Runs the graph with the wanted nodes' outputs as leaves that require grad, to read d loss / d node."""

    def __init__(self, module: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(module)
        self.wanted = wanted
        self.leaves: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if n.name in self.wanted and isinstance(result, torch.Tensor):
            result = result.detach().requires_grad_(True)
            self.leaves[n.name] = result
        return result


def _grad_nodes(layer: ExpertLayer) -> list[str]:
    return [layer.down.node.name] if layer.fused else [ex.down.node.name for ex in layer.experts]


def record_fisher(program, layers: list[ExpertLayer], batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Squared gradients of the next-token loss w.r.t. each expert's output rows (empirical Fisher).

    The gradient already carries the routing weight (the expert output is scaled by it before it
    reaches the loss), so sum_h F_h * delta_h^2 is the loss increase a change delta of one expert's
    output causes, to second order.
    """
    wanted = {name for layer in layers for name in _grad_nodes(layer)}
    store: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    for batch in batches:
        recorder = _GradRecorder(program.module, wanted)
        with torch.enable_grad():
            out = recorder.run(*program_inputs(program, batch))
            logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            leaves = [recorder.leaves[n] for n in wanted]
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for name, leaf, grad in zip(wanted, leaves, grads):
            g = torch.zeros_like(leaf) if grad is None else grad
            store[name].append(g.detach().reshape(-1, g.shape[-1]).float().square())
    return store


def record_routing(program, layers: list[ExpertLayer], samples: torch.Tensor | None = None,
                   fisher: bool = False) -> list[LayerData]:
    """Run the calibration data once and split each layer's routed rows by expert.

    With `fisher` (causal LMs), also record each routed row's empirical Fisher (see `record_fisher`).
    """
    wanted = [_wanted(layer) for layer in layers]
    store: dict[str, list[torch.Tensor]] = {}
    names = set()
    for w in wanted:
        for v in w.values():
            names.update(v if isinstance(v, list) else [v])
    for name in names:
        store[name] = []
    if samples is None:
        if program.calibration is None:
            raise ConfigError("the MoE analysis needs calibration data: pass calibration=... to fxpress.compile")
        batches = list(program.calibration.chunks())
    else:
        batches = list(samples.split(4))
    for_each_activation(program, names, lambda n, t: store[n].append(t), batches)
    grads = record_fisher(program, layers, batches) if fisher and program.is_causal_lm else None
    data = []
    for layer, w in zip(layers, wanted):
        d = _layer_data(layer, w, store)
        if grads is not None:
            d.row_fisher = _split_fisher(layer, w, store, grads)
        data.append(d)
    return data


def _split_fisher(layer: ExpertLayer, w: dict[str, Any], store, grads) -> list[torch.Tensor]:
    """Per expert, the Fisher rows aligned with `LayerData.rows`."""
    out: list[list[torch.Tensor]] = [[] for _ in range(layer.num_experts)]
    if layer.fused:
        for g, offs in zip(grads[layer.down.node.name], store[w["offsets"]]):
            start = 0
            for e, end in enumerate(offs.to(torch.int64).tolist()):
                out[e].append(g[start:end])
                start = end
    else:
        for e, (ex, name) in enumerate(zip(layer.experts, w["weights"])):
            col = torch.cat([t.reshape(-1) for t in store[name]])
            out[e].append(torch.cat(grads[ex.down.node.name])[col != 0])
    return [torch.cat(o) for o in out]


def _layer_data(layer: ExpertLayer, w: dict[str, Any], store: dict[str, list[torch.Tensor]]) -> LayerData:
    e_count = layer.num_experts
    inputs = torch.cat([t.reshape(-1, t.shape[-1]) for t in store[w["input"]]]).float()
    logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in store[w["logits"]]]).float()
    rows: list[list[torch.Tensor]] = [[] for _ in range(e_count)]
    weights: list[list[torch.Tensor]] = [[] for _ in range(e_count)]
    if layer.fused:
        chosen = []
        for x, offs, rw, ids in zip(store[w["rows"]], store[w["offsets"]], store[w["row_weights"]], store[w["expert_ids"]]):
            mask = F.one_hot(ids.reshape(-1).long().clamp(0, e_count - 1), e_count).bool()
            rw = rw.reshape(-1)
            start = 0
            for e, end in enumerate(offs.to(torch.int64).tolist()):
                rows[e].append(x[start:end].float())
                weights[e].append(rw[start:end].float())
                start = end
            chosen.append(mask)
        flat = torch.cat(chosen)
        k = max(1, flat.shape[0] // inputs.shape[0])
        chosen_t = flat.reshape(inputs.shape[0], k, e_count).any(1)
    else:
        dense = []
        for e, name in enumerate(w["weights"]):
            col = torch.cat([t.reshape(-1) for t in store[name]]).float()
            keep = col != 0
            rows[e].append(inputs[keep])
            weights[e].append(col[keep])
            dense.append(keep)
        chosen_t = torch.stack(dense, 1)
    return LayerData(inputs, logits, chosen_t, [torch.cat(r) for r in rows], [torch.cat(r) for r in weights])


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

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["sensitivity"] = {f"{e}.{p}": v for (e, p), v in self.sensitivity.items()}
        d["weight_error"] = {f"{e}.{p}": v for (e, p), v in self.weight_error.items()}
        return d


def _unevenness(share: torch.Tensor) -> tuple[float, float, float]:
    cv = float(share.std(unbiased=False) / share.mean()) if share.mean() > 0 else 0.0
    mom = float(share.max() / share.min()) if share.min() > 0 else math.inf
    p = share[share > 0]
    ent = float(-(p * p.log()).sum() / math.log(len(share))) if len(share) > 1 else 1.0
    return cv, mom, ent


def calibration_rows(data: LayerData, e: int, min_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Expert e's rows and weights; when it has fewer than min_rows, add the tokens its router likes most."""
    x, w = data.rows[e], data.row_weights[e]
    missing = min_rows - x.shape[0]
    if missing <= 0:
        return x, w, 0
    scores = data.logits[:, e].masked_fill(data.chosen[:, e], -math.inf)
    take = scores.topk(min(missing, int((~data.chosen[:, e]).sum()))).indices
    all_w = torch.cat(data.row_weights)
    fill = float(all_w.mean()) if all_w.numel() else 1.0 / max(1, data.chosen.sum(1).float().mean().item())
    return torch.cat([x, data.inputs[take]]), torch.cat([w, torch.full((len(take),), fill)]), len(take)


def fisher_rows(data: LayerData, e: int, n_forced: int) -> torch.Tensor | None:
    """Expert e's Fisher rows; rows routed on purpose get the layer's mean Fisher (they have no gradient)."""
    if data.row_fisher is None:
        return None
    f = data.row_fisher[e]
    if n_forced:
        mean = torch.cat(data.row_fisher).mean(0, keepdim=True)
        f = torch.cat([f, mean.expand(n_forced, -1)])
    return f


def quantize_matrix(weight: torch.Tensor, bits: int, group_size: int, method: str = "rtn",
                    h: torch.Tensor | None = None):
    """One expert matrix quantized (QuantizedWeight); GPTQ uses the routing-weighted Hessian `h`."""
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
) -> LayerAnalysis:
    """Stages 1-3 for one layer (see the module docstring)."""
    e_count = len(fns)
    counts = torch.tensor([r.shape[0] for r in data.rows], dtype=torch.float64)
    wsum = torch.tensor([float(w.sum()) for w in data.row_weights], dtype=torch.float64)
    share = counts / counts.sum().clamp_min(1)
    cv, mom, ent = _unevenness(share)
    projections = fns[0].projections
    sens: dict[tuple[int, str], dict[int, float]] = {}
    werr: dict[tuple[int, str], dict[int, float]] = {}
    forced: dict[int, int] = {}
    for e, fn in enumerate(fns):
        x, w, n_forced = calibration_rows(data, e, min_rows)
        if n_forced:
            forced[e] = n_forced
        scale = (float(counts[e]) + prior_rows) / max(1, x.shape[0])  # expected routed rows per row used
        ref = fn(x)
        fisher = fisher_rows(data, e, n_forced)
        inner = fn.inner(x) if method == "gptq" else None
        for proj in projections:
            weight = fn.weights[proj]
            h = None
            if method == "gptq":
                h = weighted_hessian(inner if proj == proj_name(fn.down) else x, w)
            sens[(e, proj)], werr[(e, proj)] = {}, {}
            for bits in bit_choices:
                q = quantize_matrix(weight, bits, group_size, method, h).dequantize().to(weight.dtype)
                out = fn(x, {proj: q})
                if fisher is not None:  # loss increase to second order (routing weight is in the gradient)
                    err = float(((out - ref).square() * fisher).sum()) * scale
                else:  # output error of the MoE, weighted by the routing weight
                    err = float(((out - ref).square().sum(-1) * w.square()).sum()) * scale
                sens[(e, proj)][bits] = err
                werr[(e, proj)][bits] = float((q - weight).double().square().sum())
    numel = {p: fns[0].weights[p].numel() for p in projections}
    analysis = LayerAnalysis(
        layer=index, num_experts=e_count, rows=counts.long().tolist(), weight=wsum.tolist(), share=share.tolist(),
        cv=cv, max_over_min=mom, entropy=ent, forced=forced, projections=projections, numel=numel,
        sensitivity=sens, weight_error=werr,
    )
    analysis.cofire_lift = cofire_lift(data.chosen).tolist()
    analysis.redundancy = output_redundancy(fns, data.inputs[:redundancy_rows]).tolist()
    return analysis


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
    program, bit_choices: tuple[int, ...] = (2, 3, 4), group_size: int = 64, min_rows: int = 32,
    method: str = "rtn", samples: torch.Tensor | None = None, layers: list[ExpertLayer] | None = None,
    fisher: bool = False,
) -> MoEAnalysis:
    """Run stages 1-3 on every MoE layer of `program` with its calibration data (or `samples`)."""
    layers = expert_layers(program.module) if layers is None else layers
    if not layers:
        raise ConfigError("no mixture-of-experts layer found in the graph: quantize_experts needs a router (topk) "
                          "feeding fused grouped_mm experts or per-expert linears")
    data = record_routing(program, layers, samples, fisher=fisher)
    result = []
    with torch.no_grad():
        for layer, d in zip(layers, data):
            fns = expert_functions(program.module, layer)
            result.append(analyse_layer(fns, d, layer.index, tuple(bit_choices), group_size, min_rows, method=method))
    return MoEAnalysis(result, tuple(bit_choices), group_size)


# --- from layer output error to model output error --------------------------------------------------
def _logits(program, batch: torch.Tensor) -> torch.Tensor:
    out = program.module(*program_inputs(program, batch))
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p = F.log_softmax(ref.reshape(-1, ref.shape[-1]), -1)
    q = F.log_softmax(test.reshape(-1, test.shape[-1]), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _fake_quantize_layer(gm, layer: ExpertLayer, fns: list[ExpertFn], bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Overwrite every routed expert weight of `layer` with its RTN version; returns the originals."""
    saved: dict[str, torch.Tensor] = {}
    pairs = [(u, e) for u in [*layer.up, layer.down] for e in range(layer.num_experts)] if layer.fused else \
        [(u, e) for e, ex in enumerate(layer.experts) for u in (*ex.up, ex.down)]
    for use, e in pairs:
        target = str(use.weight.target)
        if target not in saved:
            saved[target] = get_param(gm, use.weight).detach().clone()
        param = get_param(gm, use.weight).detach().clone()
        q = quantize_matrix(fns[e].weights[proj_name(use)], bits, group_size).dequantize().to(param.dtype)
        q = q if use.in_axis == -1 else q.T
        index = use.expert if use.expert is not None else (e if param.dim() == 3 else None)
        if index is None:
            param = q
        else:
            param[index] = q
        set_param(gm, use.weight, param)
    return saved


def layer_significance(program, layers: list[ExpertLayer], fns: list[list[ExpertFn]], analyses: list[LayerAnalysis],
                       samples: torch.Tensor, bits: int, group_size: int) -> list[float]:
    """Per layer: the model's output KL when all its experts drop to `bits`, per unit of predicted error.

    Stage 2 measures errors at each layer's MoE output; how much such an error costs at the model
    output differs by depth. One forward per layer calibrates that, so errors of different layers
    can be added in one budget. Sets `analysis.significance` and returns the factors.
    """
    gm = program.module
    with torch.no_grad():
        ref = [_logits(program, b) for b in samples.split(4)]
        factors = []
        for layer, f, a in zip(layers, fns, analyses):
            saved = _fake_quantize_layer(gm, layer, f, bits, group_size)
            try:
                kl = sum(_kl(r, _logits(program, b)) for r, b in zip(ref, samples.split(4))) / len(ref)
            finally:
                for target, value in saved.items():
                    set_param(gm, target, value)
            predicted = sum(v[bits] for v in a.sensitivity.values())
            a.significance = kl / predicted if predicted > 0 else 1.0
            factors.append(a.significance)
    return factors
