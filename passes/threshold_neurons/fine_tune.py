"""Fine-tuning for `threshold_neurons` ("multiplication injection": layers not chosen stay conventional
and are trained too).

Latent float weights `L` (units of alpha) and latent thresholds are trained with straight-through
estimators: the forward pass uses exactly the deployed {-1,0,1} connections (top `density` of |L| per
neuron) and rounded thresholds, the backward pass treats both as identity (clipped at |L| > 2).
The loss is the task loss on the targets (class ids -> cross-entropy, float -> MSE) plus `distill` x
the match to the original model's outputs, or the match alone without targets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from fxpress.graph import is_op
from fxpress.passes.base import check_range
from fxpress.passes.threshold_neurons.data import activations
from fxpress.passes.threshold_neurons.plan import Plan, ternarize
from fxpress.passes.threshold_neurons.rewrite import QUANT_TAG
from fxpress.runtime.threshold import output_bounds

if TYPE_CHECKING:
    from fxpress.program import Program

aten = torch.ops.aten
LATENT_PREFIX = "_tn_"  # parameters of the training copy that hold latent connections and thresholds


@dataclass
class FineTuning:
    """How the replaced layers (and the conventional ones beside them) are trained after the rewrite."""

    steps: int = 1000  # fine-tuning steps (0: initialise only)
    lr: float = 3e-3  # Adam rate for latent connections and thresholds
    kept_lr: float = 1e-3  # Adam rate for the conventional layers trained alongside
    distill: float = 1.0  # weight of matching the original model's outputs, next to the task loss
    batch_size: int = 128  # samples per step (small batches help the STE; the graph takes at most 1024)

    def validate(self, owner: str) -> None:
        check_range(owner, "fine_tune.steps", self.steps, 0, 10**6)
        check_range(owner, "fine_tune.lr", self.lr, 0.0, 10.0)
        check_range(owner, "fine_tune.kept_lr", self.kept_lr, 0.0, 10.0)
        check_range(owner, "fine_tune.distill", self.distill, 0.0, 100.0)
        check_range(owner, "fine_tune.batch_size", self.batch_size, 1, 1024)


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


# ---- the training copy -------------------------------------------------------------------------------
def _set_threshold_units(program: Program, plans: list[Plan], inputs: torch.Tensor) -> None:
    """Threshold unit per layer: the spread of its pre-activation `conn q - theta` on the data."""
    with torch.no_grad():
        for plan in plans:
            q = plan.node.args[0]
            pre = activations(program, [q.name], inputs)[q.name] @ plan.conn.float().t() - plan.threshold
            plan.theta_unit = float(pre.std().clamp_min(1.0))


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
        train_gm.register_parameter(f"{LATENT_PREFIX}latent_{k}", latent)
        train_gm.register_parameter(f"{LATENT_PREFIX}theta_{k}", theta)
        latents.append(latent)
        thetas.append(theta)
        with train_gm.graph.inserting_before(node):
            ln = train_gm.graph.get_attr(f"{LATENT_PREFIX}latent_{k}")
            tn = train_gm.graph.get_attr(f"{LATENT_PREFIX}theta_{k}")
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
            latent = getattr(train_gm, f"{LATENT_PREFIX}latent_{k}")
            theta = getattr(train_gm, f"{LATENT_PREFIX}theta_{k}")
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


# ---- the loop ------------------------------------------------------------------------------------------
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


def _optimizer(train_gm: GraphModule, latents: list, thetas: list, cfg: FineTuning) -> torch.optim.Adam:
    """Adam over the latents at `lr` and, when `kept_lr` > 0, the conventional layers at `kept_lr`."""
    kept = [p for n, p in train_gm.named_parameters() if not n.startswith(LATENT_PREFIX)]
    for p in kept:
        p.requires_grad_(True)
    groups = [{"params": latents + thetas, "lr": cfg.lr}]
    if kept and cfg.kept_lr > 0:
        groups.append({"params": kept, "lr": cfg.kept_lr})
    return torch.optim.Adam(groups)


def fine_tune(program: Program, plans: list[Plan], inputs: torch.Tensor, targets: torch.Tensor | None,
              teacher: torch.Tensor, cfg: FineTuning, density: float, seed: int) -> dict[str, Any]:
    """Train latents (and kept layers) through the STE copy on the targets and/or the original outputs."""
    gm = program.module
    _set_threshold_units(program, plans, inputs)
    train_gm, latents, thetas = _training_copy(gm, plans, density)
    opt = _optimizer(train_gm, latents, thetas, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    first = last = None
    for _ in range(cfg.steps):
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size] if cfg.batch_size < n else slice(None)
        out = train_gm(inputs[idx])
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = _loss(out, None if targets is None else targets[idx], teacher[idx], cfg.distill)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        last = loss.item()
        first = last if first is None else first
    _write_back(gm, train_gm, plans, density)
    return {"fine_tune_steps": cfg.steps, "loss_first": first, "loss_last": last}
