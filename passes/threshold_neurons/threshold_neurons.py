"""ThresholdNeurons: replace chosen linear(+ReLU) layers by multiplication-free threshold neurons.

Find the pattern -> initialise from the trained weights -> rewrite the graph -> fine-tune -> report.

A chosen `linear(x, W, b)` (+ `relu`) becomes, in the graph (see `fxpress.runtime.threshold`):

    q = clamp(round(x / input_scale), qmin, qmax)       # only for the first layer of a chain
    t = fxpress::threshold_linear(q, conn, threshold, relu)
    y = t * output_scale                                  # back to the model's units for the next layer

Initialisation: on input codes the weights are `Ws = W * input_scale`; each neuron keeps its
`density` fraction of strongest weights as connections, excitatory (+1) where the weight is positive,
inhibitory (-1) where negative; `alpha = mean |Ws|` over kept connections (one per layer) so that
`W x + b ~ alpha * (conn q + b / alpha)`, hence `threshold = round(-b / alpha)`, `output_scale = alpha`.
A chosen layer that reads another chosen layer takes its integer output directly (input_scale is the
producer's output_scale), so chains stay integer end to end, as the FPGA netlist needs.

Fine-tuning ("multiplication injection": layers not chosen stay conventional and are trained too):
latent float weights `L` (units of alpha) and latent thresholds are trained with straight-through
estimators: the forward pass uses exactly the deployed {-1,0,1} connections (top `density` of |L| per
neuron) and rounded thresholds, the backward pass treats both as identity (clipped at |L| > 2). Data
come from `program.metadata["train_data"]`: `(inputs, targets)` (class ids -> cross-entropy, float ->
MSE, plus `distill` x the KL/MSE to the original model's outputs), or inputs alone, or a callable
returning either; without targets the pass only distils the original model's outputs.
`program.calibration` (inputs) is used when no train_data is given. Defaults (density 0.5, 1000 steps,
batch 128, lr 3e-3) kept a 64-32-10 digits MLP within 0.9 points of its accuracy over 8 seeds.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from fxpress.calibration import collect_activations
from fxpress.errors import ConfigError, FxpressError
from fxpress.graph import add_param, get_param, is_op
from fxpress.passes.base import PLAIN_NEURONS, Pass, check_range, register_pass
from fxpress.program import Program
from fxpress.runtime.threshold import FLOAT32_EXACT, output_bounds

aten = torch.ops.aten
DATA_KEY = "train_data"
EVAL_KEY = "eval_data"
STATE_KEY = "threshold_neurons"
QUANT_TAG = "fxpress_threshold_quant"


# ---- find the pattern ------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One linear layer of the graph, its optional ReLU, and its name (the weight's owner)."""

    name: str
    linear: Node
    relu: Node | None

    @property
    def out(self) -> Node:
        return self.relu if self.relu is not None else self.linear


def find_linears(gm: GraphModule) -> list[Candidate]:
    """Every `aten.linear` with a 2-D get_attr weight, in graph order, with its sole-user ReLU."""
    found = []
    for node in gm.graph.nodes:
        if not is_op(node, aten.linear.default) or node.args[1].op != "get_attr":
            continue
        weight = node.args[1]
        if get_param(gm, weight).dim() != 2:
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None and (not isinstance(bias, Node) or bias.op != "get_attr"):
            continue
        users = list(node.users)
        relu = users[0] if len(users) == 1 and is_op(users[0], aten.relu.default) else None
        found.append(Candidate(str(weight.target).rsplit(".", 1)[0], node, relu))
    return found


def ternarize(w: torch.Tensor, density: float) -> torch.Tensor:
    """{-1,0,1} per row: the sign of the `density` fraction of largest-magnitude entries."""
    k = max(1, int(round(density * w.shape[1])))
    keep = torch.zeros_like(w).scatter_(1, w.abs().topk(k, dim=1).indices, 1.0)  # exactly k, ties broken by topk
    return torch.sign(w) * keep


# ---- straight-through estimators (training only; the graph keeps the real op) ----------------------
class _TernarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latent: torch.Tensor, density: float) -> torch.Tensor:
        ctx.save_for_backward(latent)
        return ternarize(latent, density)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (latent,) = ctx.saved_tensors
        return grad * (latent.abs() <= 2).to(grad.dtype), None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _train_threshold(x, latent, theta_latent, relu, density, theta_unit):
    """What `fxpress::threshold_linear` computes, written so gradients pass straight through."""
    conn = _TernarySTE.apply(latent, density)
    out = x @ conn.t() - _RoundSTE.apply(theta_latent * theta_unit)
    return torch.relu(out) if relu else out


def _train_round(x):
    return _RoundSTE.apply(x)


# ---- per-layer plan --------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything decided for one replaced layer before the graph changes."""

    cand: Candidate
    conn: torch.Tensor
    threshold: torch.Tensor
    input_scale: float
    output_scale: float
    in_lo: int
    in_hi: int
    out_lo: int
    out_hi: int
    head: bool  # first of a chain: quantizes its float input
    latent: torch.Tensor
    theta_unit: float = 1.0
    node: Node | None = None


@register_pass
@dataclass
class ThresholdNeurons(Pass):
    """Threshold-neuron layers in place of chosen linear(+ReLU) layers, fine-tuned with an STE."""

    name = "threshold_neurons"
    version = 1
    preserves_function = False
    invalidates = frozenset({PLAIN_NEURONS})

    layers: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns on layer names ("0", "fc1")
    keep: list[str] = field(default_factory=list)  # multiplication injection: layers kept conventional
    keep_last: bool = True  # keep the final linear (the classifier) conventional
    density: float = 0.5  # fraction of each neuron's strongest weights kept as connections
    input_bits: int = 8  # fixed-point bits of a chain's input codes
    steps: int = 1000  # fine-tuning steps (0: initialise only)
    lr: float = 3e-3  # Adam rate for latent connections and thresholds
    kept_lr: float = 1e-3  # Adam rate for the conventional layers trained alongside
    distill: float = 1.0  # weight of matching the original model's outputs, next to the task loss
    batch_size: int = 128  # samples per step (small batches help the STE; the graph takes at most 1024)
    seed: int = 0

    def validate(self) -> None:
        n = self.name
        check_range(n, "density", self.density, 1e-3, 1.0)
        check_range(n, "input_bits", self.input_bits, 2, 16)
        check_range(n, "steps", self.steps, 0, 10**6)
        check_range(n, "lr", self.lr, 0.0, 10.0)
        check_range(n, "kept_lr", self.kept_lr, 0.0, 10.0)
        check_range(n, "distill", self.distill, 0.0, 100.0)
        check_range(n, "batch_size", self.batch_size, 1, 1024)
        for fname in ("layers", "keep"):
            value = getattr(self, fname)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{n}.{fname} must be a list of layer-name patterns (e.g. ['0', 'fc*']), got {value!r}")

    # -- run -------------------------------------------------------------------------------------------
    def run(self, program: Program) -> dict[str, Any]:
        gm = program.module
        inputs, targets = _training_data(program)
        if self.steps > 0 and inputs is None:
            raise ConfigError(
                f"threshold_neurons fine-tunes for {self.steps} steps but has no data: set "
                f"program.metadata['{DATA_KEY}'] = (inputs, targets) (or pass calibration=inputs), or steps=0"
            )
        candidates = find_linears(gm)
        chosen = self._choose(candidates)
        if not chosen:
            names = ", ".join(c.name for c in candidates) or "none"
            return {"modified": False, "layers": [], "warnings": [f"no linear layer matched {self.layers} (layers: {names})"]}
        samples = inputs if inputs is not None else program.example_inputs[0]
        torch.manual_seed(self.seed)
        before = _accuracy(program, EVAL_KEY)
        teacher = _teacher_outputs(program, samples) if self.steps > 0 else None
        plans = self._plan(program, chosen, samples)
        for plan in plans:
            _rewrite(gm, plan)
        _drop_dead(gm)
        train_stats = self._fine_tune(program, plans, samples, targets, teacher) if self.steps > 0 else {}
        after = _accuracy(program, EVAL_KEY)
        program.metadata[STATE_KEY] = {"layers": [p.cand.name for p in plans], "density": self.density}
        rows = [_row(p) for p in plans]
        stats: dict[str, Any] = {
            "layers": rows,
            "kept": [c.name for c in candidates if c not in chosen],
            "multiplications_removed": sum(r["multiplications_removed"] for r in rows),
            **train_stats,
        }
        if before is not None:
            stats["eval_accuracy_before"], stats["eval_accuracy_after"] = before, after
        return stats

    def _choose(self, candidates: list[Candidate]) -> list[Candidate]:
        last = candidates[-1] if candidates else None
        chosen = []
        for c in candidates:
            if not any(fnmatch.fnmatchcase(c.name, p) for p in self.layers):
                continue
            if any(fnmatch.fnmatchcase(c.name, p) for p in self.keep) or (self.keep_last and c is last):
                continue
            chosen.append(c)
        return chosen

    def _plan(self, program, chosen: list[Candidate], samples: torch.Tensor) -> list[Plan]:
        gm = program.module
        acts = _activations(program, [c.linear.args[0].name for c in chosen], samples)
        plans: list[Plan] = []
        by_out = {}
        for c in chosen:
            x_node = c.linear.args[0]
            w = get_param(gm, c.linear.args[1]).detach().double()
            b = get_param(gm, c.linear.args[2]).detach().double() if len(c.linear.args) > 2 and c.linear.args[2] is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            producer = by_out.get(x_node)
            if producer is not None:
                scale, lo, hi, head = producer.output_scale, producer.out_lo, producer.out_hi, False
            else:
                scale, lo, hi = _input_format(acts[x_node.name], self.input_bits, c.name)
                head = True
            ws = w * scale
            conn = ternarize(ws, self.density)
            kept = conn != 0
            alpha = float(ws.abs()[kept].mean()) if kept.any() else 1.0
            threshold = torch.round(-b / alpha)
            out_lo, out_hi = output_bounds(conn, threshold, lo, hi, c.relu is not None)
            widest = max(int(out_hi.abs().max()), int(out_lo.abs().max()), int(((conn == 1).sum(1) * max(abs(lo), abs(hi))).max()) * 2)
            if widest >= FLOAT32_EXACT:
                raise FxpressError(
                    f"threshold layer '{c.name}' can reach {widest}, beyond float32's exact integers (2^24): "
                    f"lower input_bits ({self.input_bits}) or density ({self.density})"
                )
            plan = Plan(c, conn.to(torch.int8), threshold.float(), float(scale), alpha, int(lo), int(hi),
                        int(out_lo.min()), int(out_hi.max()), head, (ws / alpha).float())
            plans.append(plan)
            by_out[c.out] = plan
        return plans

    # -- fine-tune -------------------------------------------------------------------------------------
    def _fine_tune(self, program, plans: list[Plan], inputs: torch.Tensor, targets: torch.Tensor | None,
                   teacher: torch.Tensor) -> dict[str, Any]:
        """Train latents (and kept layers) through the STE copy on the targets and/or the original outputs."""
        gm = program.module
        with torch.no_grad():
            for plan in plans:  # threshold unit: spread of the layer's pre-activation on the data
                pre = _pre_activation(program, plan, inputs)
                plan.theta_unit = float(pre.std().clamp_min(1.0))
        train_gm, latents, thetas = _training_copy(gm, plans, self.density)
        kept = [p for n, p in train_gm.named_parameters() if not n.startswith("_tn_")]
        for p in kept:
            p.requires_grad_(True)
        groups = [{"params": latents + thetas, "lr": self.lr}]
        if kept and self.kept_lr > 0:
            groups.append({"params": kept, "lr": self.kept_lr})
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        gen = torch.Generator().manual_seed(self.seed)
        n = inputs.shape[0]
        first = last = None
        for _ in range(self.steps):
            idx = torch.randperm(n, generator=gen)[: self.batch_size] if self.batch_size < n else slice(None)
            out = train_gm(inputs[idx])
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = _loss(out, None if targets is None else targets[idx], teacher[idx], self.distill)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            last = loss.item()
            first = last if first is None else first
        _write_back(gm, train_gm, plans, self.density)
        return {"fine_tune_steps": self.steps, "loss_first": first, "loss_last": last}


# ---- helpers ---------------------------------------------------------------------------------------
def _training_data(program) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    data = program.metadata.get(DATA_KEY)
    if callable(data):
        data = data()
    if data is None and program.calibration is not None:
        data = getattr(program.calibration, "batches", program.calibration)
    if data is None:
        return None, None
    if isinstance(data, torch.Tensor):
        return data.float(), None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"{DATA_KEY}: inputs have {x.shape[0]} samples but targets {y.shape[0]}")
        return x.float(), y
    raise ConfigError(f"program.metadata['{DATA_KEY}'] must be inputs, (inputs, targets) or a callable returning them")


def _input_format(x: torch.Tensor, bits: int, name: str) -> tuple[float, int, int]:
    """(input_scale, qmin, qmax): scale 1 and the narrowest width when the data are already small
    integers (digits' 0..16 -> 5-bit codes), else max-abs scaling to `bits` bits."""
    lo, hi = float(x.min()), float(x.max())
    unsigned = lo >= 0
    qmin, qmax = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if bool(torch.all(x == torch.round(x))) and qmin <= lo and hi <= qmax:
        width = _bits(int(lo), int(hi))
        return 1.0, (0 if unsigned else -(2 ** (width - 1))), (2**width - 1 if unsigned else 2 ** (width - 1) - 1)
    peak = max(abs(lo), abs(hi))
    if peak == 0:
        raise FxpressError(f"the input of layer '{name}' is all zeros on the data: nothing to quantize")
    return peak / qmax, qmin, qmax


def _rewrite(gm: GraphModule, plan: Plan) -> None:
    """Put quantize -> threshold_linear -> scale where linear(+relu) was."""
    c = plan.cand
    graph = gm.graph
    x = c.linear.args[0]
    with graph.inserting_before(c.linear):
        if plan.head:
            d = graph.call_function(aten.div.Tensor, (x, plan.input_scale))
            r = graph.call_function(aten.round.default, (d,))
            q = graph.call_function(aten.clamp.default, (r, plan.in_lo, plan.in_hi))
            for node in (d, r, q):
                node.meta[QUANT_TAG] = True
                if "val" in x.meta:
                    node.meta["val"] = x.meta["val"]
        else:
            q = x.meta["fxpress_threshold_int"]
    conn = add_param(gm, f"{c.name}.conn", plan.conn, before=c.linear, buffer=True)
    thr = add_param(gm, f"{c.name}.threshold", plan.threshold, before=c.linear, buffer=True)
    with graph.inserting_before(c.linear):
        t = graph.call_function(torch.ops.fxpress.threshold_linear.default, (q, conn, thr, c.relu is not None))
        y = graph.call_function(aten.mul.Tensor, (t, plan.output_scale))
    for node in (t, y):
        if "val" in c.out.meta:
            node.meta["val"] = c.out.meta["val"]
    y.meta["fxpress_threshold_int"] = t
    c.out.replace_all_uses_with(y)
    if c.relu is not None:
        graph.erase_node(c.relu)
    weight_nodes = [a for a in c.linear.args[1:] if isinstance(a, Node)]
    graph.erase_node(c.linear)
    for node in weight_nodes:
        if not node.users:
            target = str(node.target)
            graph.erase_node(node)
            owner, _, attr = target.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if hasattr(module, attr):
                delattr(module, attr)
    plan.node = t


def _drop_dead(gm: GraphModule) -> None:
    """Remove the scale nodes a chained layer bypassed (they have no users left)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and not node.users and is_op(node, aten.mul.Tensor):
            gm.graph.erase_node(node)
    gm.recompile()


def _pre_activation(program, plan: Plan, inputs: torch.Tensor) -> torch.Tensor:
    """conn q - theta on the data (q: the layer's integer input), for the threshold's training unit."""
    q = plan.node.args[0]
    return _activations(program, [q.name], inputs)[q.name] @ plan.conn.float().t() - plan.threshold


def _training_copy(gm: GraphModule, plans: list[Plan], density: float):
    """A deep copy whose threshold nodes call the STE function on trainable latent parameters."""
    train_gm = copy.deepcopy(gm)
    by_name = {p.node.name: p for p in plans}
    latents, thetas = [], []
    for node in list(train_gm.graph.nodes):
        if node.meta.get(QUANT_TAG) and is_op(node, aten.round.default):
            node.target = _train_round
        plan = by_name.get(node.name)
        if plan is None:
            continue
        k = len(latents)
        latent = torch.nn.Parameter(plan.latent.clone())
        theta = torch.nn.Parameter(plan.threshold.clone() / plan.theta_unit)
        train_gm.register_parameter(f"_tn_latent_{k}", latent)
        train_gm.register_parameter(f"_tn_theta_{k}", theta)
        latents.append(latent)
        thetas.append(theta)
        with train_gm.graph.inserting_before(node):
            ln = train_gm.graph.get_attr(f"_tn_latent_{k}")
            tn = train_gm.graph.get_attr(f"_tn_theta_{k}")
        x, _, _, relu = node.args
        node.target = _train_threshold
        node.args = (x, ln, tn, relu, density, plan.theta_unit)
    train_gm.graph.eliminate_dead_code()
    train_gm.recompile()
    train_gm.train()
    return train_gm, latents, thetas


def _write_back(gm: GraphModule, train_gm: GraphModule, plans: list[Plan], density: float) -> None:
    """Deployed connections/thresholds from the latents, and the fine-tuned conventional weights."""
    with torch.no_grad():
        for k, plan in enumerate(plans):
            latent = getattr(train_gm, f"_tn_latent_{k}")
            theta = getattr(train_gm, f"_tn_theta_{k}")
            plan.conn = ternarize(latent, density).to(torch.int8)
            plan.threshold = torch.round(theta * plan.theta_unit).float()
            conn_node, thr_node = plan.node.args[1], plan.node.args[2]
            setattr(gm, conn_node.target, plan.conn.clone())
            setattr(gm, thr_node.target, plan.threshold.clone())
            lo, hi = output_bounds(plan.conn, plan.threshold, plan.in_lo, plan.in_hi, plan.cand.relu is not None)
            plan.out_lo, plan.out_hi = int(lo.min()), int(hi.max())
        trained = dict(train_gm.named_parameters())
        for name, param in gm.named_parameters():
            if name in trained:
                param.data.copy_(trained[name].detach())
                param.requires_grad_(False)


CHUNK = 512  # the captured graph guards batch <= 1024


def _activations(program, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    acts = collect_activations(program, names, list(inputs.split(CHUNK)))
    return {k: torch.cat(v) for k, v in acts.items()}


def _outputs(program, inputs: torch.Tensor) -> torch.Tensor:
    outs = []
    for chunk in inputs.split(CHUNK):
        out = program.run(chunk)
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return torch.cat(outs)


def _teacher_outputs(program, inputs: torch.Tensor) -> torch.Tensor:
    return _outputs(program, inputs)


def _loss(out: torch.Tensor, target: torch.Tensor | None, teacher: torch.Tensor, distill: float) -> torch.Tensor:
    """Cross-entropy on class ids (MSE on float targets), plus `distill` x the match to the original model:
    KL between softmaxes for classifiers, MSE otherwise. Without targets, only the match."""
    classifier = out.dim() == 2 and (target is None or target.dtype in (torch.int64, torch.int32))
    if classifier:
        match = F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    else:
        match = F.mse_loss(out, teacher)
    if target is None:
        return match
    task = F.cross_entropy(out, target.long()) if classifier else F.mse_loss(out, target.to(out.dtype))
    return task + distill * match


def _accuracy(program, key: str) -> float | None:
    """Top-1 accuracy on `program.metadata[key] = (inputs, class ids)`, when given."""
    data = program.metadata.get(key)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return None
    x, y = data
    out = _outputs(program, x.float())
    return float((out.argmax(-1) == y).float().mean())


def _row(p: Plan) -> dict[str, Any]:
    conn = p.conn
    exc, inh = int((conn == 1).sum()), int((conn == -1).sum())
    out_f, in_f = conn.shape
    return {
        "layer": p.cand.name,
        "in_features": in_f,
        "out_features": out_f,
        "relu": p.cand.relu is not None,
        "excitatory": exc,
        "inhibitory": inh,
        "multiplications_removed": in_f * out_f,
        "additions": max(exc + inh - out_f, 0) + out_f,
        "input_scale": p.input_scale,
        "output_scale": p.output_scale,
        "input_range": [p.in_lo, p.in_hi],
        "output_range": [p.out_lo, p.out_hi],
        "output_bits": _bits(p.out_lo, p.out_hi),
        "threshold_range": [int(p.threshold.min()), int(p.threshold.max())],
    }


def _bits(lo: int, hi: int) -> int:
    """Two's-complement (or unsigned when lo >= 0) width that holds [lo, hi]."""
    if lo >= 0:
        return max(1, math.ceil(math.log2(hi + 1)))
    return max(math.ceil(math.log2(hi + 1)) + 1, math.ceil(math.log2(-lo)) + 1)
