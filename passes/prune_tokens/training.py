"""Router training for `prune_tokens`: the masked training copy, the guide fit and end-to-end distillation.

The guide loss (FTP) fits the router to an oracle ranking, the size of each token's block update,
at random required sparsities; distillation then trains it end to end with the model frozen: KL to
the unpruned logits, a sparsity-constraint loss on the soft gates and the guide loss again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxpress.passes.base import check_range
from fxpress.passes.prune_tokens.router import FEATURES, MaskGate, TokenRouter, route_blocks

if TYPE_CHECKING:
    from fxpress.program import Program

SPARSITY_COLUMN = FEATURES.index("sparsity")


@dataclass
class RouterTraining:
    """The router's size and how it is fitted: guide steps on the oracle ranking, then distillation."""

    hidden: int = 64
    projection: bool = True  # a learned per-block direction on the hidden state as one more factor
    probes: int = 16  # last queries whose attention gives the "attention received" factor
    guide_steps: int = 300
    train_steps: int = 16  # end-to-end distillation steps (model frozen)
    train_batch: int = 2
    lr: float = 3e-3

    def validate(self, owner: str) -> None:
        check_range(owner, "router.hidden", self.hidden, 1, 4096)
        check_range(owner, "router.probes", self.probes, 1, 1024)
        check_range(owner, "router.guide_steps", self.guide_steps, 0, 100000)
        check_range(owner, "router.train_steps", self.train_steps, 0, 100000)
        check_range(owner, "router.train_batch", self.train_batch, 1, 1024)
        check_range(owner, "router.lr", self.lr, 1e-7, 1.0)


def run_logits(gm: torch.fx.GraphModule, program: Program, ids: torch.Tensor) -> torch.Tensor:
    keys, values = program.empty_cache(ids.shape[0])
    return gm(ids, keys, values)[0]


class TeacherCache:
    """Unpruned logits per calibration batch, computed once (the distillation target)."""

    def __init__(self, program: Program):
        self.program = program
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        key = (ids.data_ptr(), tuple(ids.shape))
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = run_logits(self.program.module, self.program, ids)
        return self.cache[key]


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student)."""
    t = F.log_softmax(teacher.float(), -1)
    s = F.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def masked_module(program: Program, router: TokenRouter, probes: int) -> torch.fx.GraphModule:
    """A copy of the graph (sharing the weights) where every block is gated by the router, mask form:
    the same function as the final gather/scatter graph, but differentiable, with the schedule in a buffer."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(program.module.graph, {}))
    gm = torch.fx.GraphModule(program.module, graph)
    route_blocks(gm, router, "mask", [1.0] * router.num_blocks, probes, MaskGate(router))
    return gm


def differentiable(gm: torch.fx.GraphModule) -> bool:
    """False when the graph holds fxpress custom ops (their reference kernels define no backward)."""
    return not any(n.op == "call_function" and str(n.target).startswith("fxpress.") for n in gm.graph.nodes)


@contextmanager
def frozen_model(program: Program, router: TokenRouter) -> Iterator[None]:
    """Only the router trains: the model's weights are frozen meanwhile and restored, and the trace cleared."""
    trainable = {name: p.requires_grad for name, p in program.module.named_parameters()}
    for p in program.module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in program.module.named_parameters():
            p.requires_grad_(trainable.get(name, False))
        router.trace = None


def split_heldout(samples: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): the last `fraction` of the samples only scores schedules (all of them when too few)."""
    n = samples.shape[0]
    held = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    if held == 0:
        return samples, samples
    return samples[: n - held], samples[n - held:]


def held_out_scorer(masked: torch.fx.GraphModule, router: TokenRouter, program: Program, held: torch.Tensor,
                    teacher: TeacherCache) -> Callable[[list[float]], float]:
    """A schedule's mean KL to the unpruned model on the held-out text, through the masked copy."""
    batches = held.split(2)

    def score(schedule: list[float]) -> float:
        router.sparsity.copy_(torch.tensor(schedule))
        with torch.no_grad():
            return sum(kl_divergence(teacher(b), run_logits(masked, program, b)).item() for b in batches) / len(batches)

    return score


# --- guide: fit the router to the oracle ranking ------------------------------------------------------

def collect(masked: torch.fx.GraphModule, router: TokenRouter, program: Program,
            samples: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Router features and the size of each token's block update, with nothing skipped."""
    router.sparsity.zero_()
    out: dict[int, dict[str, list]] = {}
    with torch.no_grad():
        for batch in samples.split(2):
            router.trace = {}
            run_logits(masked, program, batch)
            for block, rec in router.trace.items():
                slot = out.setdefault(block, {k: [] for k in ("features", "importance", "cos", "hidden") if k in rec})
                for key in slot:
                    slot[key].append(rec[key])
    router.trace = None
    return {b: {k: torch.cat(v) for k, v in rec.items()} for b, rec in out.items()}


def keep_labels(importance: torch.Tensor, sparsity: torch.Tensor) -> torch.Tensor:
    """1 for the tokens an oracle keeps at each row's sparsity (top 1 - s by importance)."""
    seq = importance.shape[-1]
    rank = importance.argsort(-1, descending=True).argsort(-1)
    keep = seq - torch.floor(seq * sparsity + 1e-6)
    return (rank < keep.unsqueeze(-1)).float()


def _normalise_features(router: TokenRouter, feats: torch.Tensor) -> None:
    """Centre and scale the router's inputs on the calibration features; the sparsity column on its known range."""
    flat = feats.reshape(-1, feats.shape[-1])
    router.shift.copy_(flat.mean(0))
    router.scale.copy_(flat.std(0).clamp_min(1e-3))
    router.shift[SPARSITY_COLUMN], router.scale[SPARSITY_COLUMN] = 0.3, 0.2


def fit_guide(router: TokenRouter, records, top: list[int], levels: int, steps: int, seed: int) -> float | None:
    """FTP's guide loss: BCE between router logits and oracle keep labels at random required sparsities."""
    blocks = [b for b in sorted(records) if top[b] > 0]
    if not blocks:
        return None
    feats = torch.cat([records[b]["features"] for b in blocks])
    imp = torch.cat([records[b]["importance"] for b in blocks])
    hidden = torch.cat([records[b]["hidden"] for b in blocks]) if router.proj is not None else None
    owner = torch.cat([torch.full(records[b]["features"].shape[:1], b) for b in blocks])
    limit = torch.cat([torch.tensor(min(top[b] / levels, 0.95)).expand(records[b]["features"].shape[0]) for b in blocks])
    _normalise_features(router, feats)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    loss = None
    for _ in range(steps):
        s = torch.rand(limit.shape, generator=gen) * limit
        x = feats.clone()
        x[..., SPARSITY_COLUMN] = s.unsqueeze(-1)
        score = router.score_features(x)
        if hidden is not None:
            score = score + torch.einsum("nsw,nw->ns", hidden, router.proj[owner])
        loss = F.binary_cross_entropy_with_logits(score, keep_labels(imp, s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() if loss is not None else None


# --- distillation ---------------------------------------------------------------------------------------

def _router_losses(router: TokenRouter) -> list[torch.Tensor]:
    """Sparsity-constraint and guide losses over the routed blocks of the last forward pass (none: none routed)."""
    sparse, guide = [], []
    for block, rec in router.trace.items():
        s = float(router.sparsity[block])
        if not 0 < s < 1 or "soft" not in rec:  # untouched or dropped blocks have no router
            continue
        sparse.append((rec["soft"].mean() - (1.0 - s)) ** 2)
        labels = keep_labels(rec["importance"], torch.full(rec["importance"].shape[:1], s))
        guide.append(F.binary_cross_entropy_with_logits(rec["score"], labels))
    if not sparse:
        return []
    return [0.1 * torch.stack(sparse).mean(), 0.1 * torch.stack(guide).mean()]


def distill(masked: torch.fx.GraphModule, router: TokenRouter, program: Program, samples: torch.Tensor,
            teacher: TeacherCache, schedule: list[float], cfg: RouterTraining, progress: bool = True) -> list[float]:
    """End-to-end router training, model frozen: KL + sparsity-constraint + guide losses."""
    if not cfg.train_steps:
        return []
    router.sparsity.copy_(torch.tensor(schedule))
    opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)  # settle at the end of a short run
    batches = samples.split(cfg.train_batch)
    losses = []
    for step in tqdm(range(cfg.train_steps), desc="prune_tokens: distill", disable=not progress, leave=False):
        ids = batches[step % len(batches)]
        router.trace = {}
        loss = kl_divergence(teacher(ids), run_logits(masked, program, ids))
        for term in _router_losses(router):
            loss = loss + term
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
    router.trace = None
    return losses
