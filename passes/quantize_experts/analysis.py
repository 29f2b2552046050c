"""MoQa-style analysis of how calibration data meets a mixture of experts, in three stages.

1. Sparse data activation: per layer, the rows (token x top-k slots) and routing weight each expert
   receives, and how uneven that is (coefficient of variation, max/min, normalised entropy).
2. Data-parameter mapping: each expert's sensitivity, per projection and bit width: the squared
   error its quantization adds to the MoE output on the rows routed to it, weighted by the routing
   weight (sum_r w_r^2 ||f_q(x_r) - f(x_r)||^2), next to the data-free weight error; and what the
   model's output pays (`model_kl`): the mean KL of the model's next-token distributions on the
   calibration text when only that expert projection is quantized at that bit width, either to
   second order from sampled-Fisher gradients of each routed row (`record_fisher`, one forward and a
   few backwards per batch) or measured exactly by one forward per projection and bit width
   (`model_sensitivity`). Experts the calibration text barely reaches add the local error of
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fxpress.calibration import for_each_activation, program_inputs
from fxpress.errors import ConfigError
from fxpress.graph import ExpertLayer, LinearUse, expert_layers, get_param, set_param, subgraph_function
from fxpress.passes.quantize.gptq import WeightSpec, gptq, rtn


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
    row_fisher: list[torch.Tensor] | None = None  # per expert [n_e, S, H]: d log p(y_s) / d expert output row
    positions: int = 0  # output positions the Fisher rows were measured on
    row_text_grad: list[torch.Tensor] | None = None  # per expert [n_e, H]: d log p(next text token) / d row


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


def record_fisher(program, layers: list[ExpertLayer], batches: list[torch.Tensor], samples: int = 8,
                  seed: int = 0, text_gradient: bool = False) -> dict[str, list[torch.Tensor]]:
    """Per expert output row, `samples` gradients g_s = d log p(y_s) / d row with y_s drawn from the model.

    E_s[g_s g_s^T] is the Fisher of the model's next-token distributions w.r.t. that row, so a change
    delta of the row costs KL = 1/2 E_s[(g_s . delta)^2] to second order: the downstream layers, the
    LM head and the routing weight (the row is scaled by it before it reaches the output) are all in g.
    Labels are sampled, not the text's next tokens: the KL, not the loss on one text, is measured.
    With `text_gradient`, one more slot holds d log p(next token of the text) / d row (first-order
    term of the calibration loss). Stored as [rows, (samples + text_gradient) * hidden] per batch.
    """
    wanted = sorted({name for layer in layers for name in _grad_nodes(layer)})
    store: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        recorder = _GradRecorder(program.module, set(wanted))
        with torch.enable_grad():
            out = recorder.run(*program_inputs(program, batch))
            logp = F.log_softmax((out[0] if isinstance(out, (tuple, list)) else out).float(), -1)
            flat = logp.reshape(-1, logp.shape[-1])
            labels = torch.multinomial(flat.detach().exp(), samples, replacement=True, generator=gen)  # [P, S]
            if text_gradient:
                nxt = torch.cat([batch[:, 1:], batch[:, :1]], 1).reshape(-1, 1)  # last position: masked below
                keep = torch.ones_like(batch, dtype=flat.dtype)
                keep[:, -1] = 0
                labels = torch.cat([labels, nxt], 1)
            leaves = [recorder.leaves[n] for n in wanted]
            per_sample = []
            slots = labels.shape[1]
            for s in range(slots):
                picked = flat.gather(1, labels[:, s : s + 1]).squeeze(1)
                if text_gradient and s == samples:
                    picked = picked * keep.reshape(-1)
                grads = torch.autograd.grad(picked.sum(), leaves, retain_graph=s + 1 < slots, allow_unused=True)
                per_sample.append([torch.zeros_like(leaf) if g is None else g.detach() for leaf, g in zip(leaves, grads)])
        for i, name in enumerate(wanted):
            g = torch.stack([ps[i].reshape(-1, ps[i].shape[-1]) for ps in per_sample], 1)  # [rows, S, H]
            store[name].append(g.reshape(g.shape[0], -1).float())
    return store


def record_routing(program, layers: list[ExpertLayer], samples: torch.Tensor | None = None,
                   fisher: bool = False, fisher_samples: int = 8, text_gradient: bool = False) -> list[LayerData]:
    """Run the calibration data once and split each layer's routed rows by expert.

    With `fisher` (causal LMs), also record each routed row's sampled Fisher gradients (see `record_fisher`).
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
    grads = None
    if fisher and program.is_causal_lm:
        grads = record_fisher(program, layers, batches, fisher_samples, text_gradient=text_gradient)
    data = []
    for layer, w in zip(layers, wanted):
        d = _layer_data(layer, w, store)
        if grads is not None:
            slots = fisher_samples + int(text_gradient)
            split = [f.reshape(f.shape[0], slots, f.shape[1] // slots) for f in _split_fisher(layer, w, store, grads)]
            d.row_fisher = [f[:, :fisher_samples] for f in split]
            d.row_text_grad = [f[:, fisher_samples] for f in split] if text_gradient else None
            d.positions = sum(int(b.numel()) for b in batches)
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


def fisher_kl(data: LayerData, e: int, delta: torch.Tensor) -> float:
    """1/2 E_s[(g_s . delta_r)^2] summed over expert e's routed rows, per output position: the model's
    mean KL to second order when those rows change by `delta` (its first rows; extra rows routed
    on purpose do not reach the model and are ignored)."""
    g = data.row_fisher[e]
    proj = torch.einsum("rsh,rh->rs", g.double(), delta[: g.shape[0]].double())
    kl = 0.5 * float(proj.square().mean(1).sum()) / max(1, data.positions)
    if data.row_text_grad is None:
        return kl
    # calibration loss change to second order: -g_text . delta + the KL term (the Gauss-Newton part)
    first = -float((data.row_text_grad[e].double() * delta[: g.shape[0]].double()).sum()) / max(1, data.positions)
    return first + kl


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
    program, bit_choices: tuple[int, ...] = (2, 3, 4), group_size: int = 64, min_rows: int = 32,
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


# --- stage 2, end to end: what quantizing one expert projection costs at the model output -----------
@contextmanager
def swapped_weight(gm: torch.fx.GraphModule, layer: ExpertLayer, e: int, proj: str, weight: torch.Tensor):
    """Expert `e`'s projection `proj` holds `weight` ([out, in]) in the graph while the block runs."""
    uses = [*layer.up, layer.down] if layer.fused else [*layer.experts[e].up, layer.experts[e].down]
    saved = []
    with torch.no_grad():
        for use in uses:
            if proj_name(use) != proj:
                continue
            param = get_param(gm, use.weight)
            index = use.expert if use.expert is not None else (e if param.dim() == 3 else None)
            view = param.data if index is None else param.data[index]
            saved.append((view, view.clone()))
            view.copy_((weight if use.in_axis == -1 else weight.T).to(view.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for view, old in saved:
                view.copy_(old)


def _divergence(causal_lm: bool, ref: torch.Tensor, out: torch.Tensor) -> float:
    """Summed per-position KL(ref || out) of next-token distributions (LMs), else summed squared error."""
    if causal_lm:
        p = F.log_softmax(ref.double(), -1)
        q = F.log_softmax(out.double(), -1)
        return float((p.exp() * (p - q)).sum())
    return float((out.double() - ref.double()).square().sum())


def model_sensitivity(program, layers: list[ExpertLayer], analyses: list[LayerAnalysis], samples: torch.Tensor,
                      batch_size: int = 8) -> None:
    """Stage 2 end to end: per (expert, projection, bits), the model's mean output KL on `samples`
    when only that projection is quantized (with the matrices `analyse_layer(keep_quantized=True)` kept).

    The knapsack adds these up: to second order, independent quantization errors of different
    projections add in the KL. Quantizing an expert changes the model only on the tokens routed to
    it, so this already weighs each expert by how often and how strongly the text uses it. An expert
    the calibration text hardly reaches would measure ~0 and fall to the lowest bits; it also pays
    `prior_rows` rows of local error measured on tokens routed to it on purpose
    (`LayerAnalysis.prior_error`), converted to KL by the layer's measured KL per unit of local error.
    Sets `analysis.model_kl`.
    """
    gm = program.module
    chunks = list(samples.split(batch_size))
    positions = max(1, samples.shape[0] * (samples.shape[1] if samples.dim() > 1 else 1))
    causal = bool(program.is_causal_lm)
    with torch.no_grad():
        ref = [_logits(program, b) for b in chunks]
        for layer, a in zip(layers, analyses):
            measured: dict[tuple[int, str], dict[int, float]] = {}
            for (e, proj), errors in a.sensitivity.items():
                measured[(e, proj)] = {}
                for bits in errors:
                    qw = a.quantized.get((e, proj, bits))
                    if qw is None:
                        raise ConfigError("model_sensitivity needs the quantized matrices: run analyse_layer with "
                                          "keep_quantized=True")
                    with swapped_weight(gm, layer, e, proj, qw.dequantize()):
                        total = sum(_divergence(causal, r, _logits(program, b)) for r, b in zip(ref, chunks))
                    measured[(e, proj)][bits] = total / positions
            with_prior(a, measured)


# --- measured plans: the whole allocation applied at once ------------------------------------------
@contextmanager
def planned_weights(gm: torch.fx.GraphModule, layers: list[ExpertLayer], analyses: list[LayerAnalysis],
                    bits: dict[tuple[int, str, str], int] | dict):
    """Every routed expert projection holds its quantized matrix at `bits[(layer, expert, proj)]` while the block runs.

    Uses the matrices `analyse_layer(keep_quantized=True)` kept (RTN or GPTQ), so a whole plan is measured
    with all its errors together, without rewriting the graph.
    """
    with ExitStack() as stack:
        for layer, a in zip(layers, analyses):
            for e, proj in a.sensitivity:
                qw = a.quantized.get((e, proj, bits[(a.layer, e, proj)]))
                if qw is None:
                    raise ConfigError("planned_weights needs the quantized matrices: run analyse_layer with keep_quantized=True")
                stack.enter_context(swapped_weight(gm, layer, e, proj, qw.dequantize()))
        yield


def program_loss(program, samples: torch.Tensor, reference: list[torch.Tensor] | None = None,
                 batch_size: int = 16) -> float:
    """Causal LMs: the mean next-token NLL of `samples` (what perplexity reads); other programs: the mean
    squared error of the output against `reference` (one tensor per batch of `batch_size`)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(samples.split(batch_size)):
            out = _logits(program, batch).double()
            if program.is_causal_lm:
                logp = F.log_softmax(out[:, :-1], -1)
                total += float(-logp.gather(-1, batch[:, 1:, None].long()).sum())
                count += batch[:, 1:].numel()
            else:
                total += float((out - reference[i].double()).square().sum())
                count += out.numel()
    return total / max(1, count)
