"""PruneTokens: a learned router lets the least important tokens skip decoder blocks (FTP, arXiv 2412.11494).

Reads top to bottom as the pass runs:
1. find the decoder blocks in the graph (`fxpress.token_router.find_blocks`);
2. build a training copy of the graph where skipped tokens are masked (same function as the
   final gather/scatter graph, but differentiable and with the schedule in a buffer);
3. guide: fit the shared router MLP to an oracle ranking (relative size of each token's block
   update) on calibration text, for random required sparsities (FTP's guide loss);
4. schedule: a genetic search over per-block sparsity with mean = `sparsity`, seeded with the
   uniform schedule and a greedy allocation from the oracle costs, scored by KL divergence to
   the unpruned model on the held-out part of the calibration text;
5. distill: a few end-to-end steps with the model frozen: KL to the unpruned logits, a
   sparsity-constraint loss on the soft gates and the guide loss;
6. refine the schedule with the trained router, then rewrite the real graph in gather mode
   (score -> top-k -> gather -> block -> scatter) and re-export it to plain ATen.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxpress.errors import CaptureError, ConfigError
from fxpress.passes.base import Pass, check_range, register_pass
from fxpress.token_router import (
    FEATURES,
    SPARSITY_SCALE,
    MaskGate,
    TokenRouter,
    block_costs,
    find_blocks,
    keep_count,
    route_blocks,
)

SPARSITY_COLUMN = FEATURES.index("sparsity")


@register_pass
@dataclass
class PruneTokens(Pass):
    """Token-wise pruning with a learned router and a searched per-block sparsity schedule."""

    name: ClassVar[str] = "prune_tokens"
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = True

    sparsity: float = 0.3  # mean fraction of tokens that skip a block, over all blocks
    schedule: list[float] | None = None  # fixed per-block sparsity (skips the search)
    max_block_sparsity: float = 0.9
    protect_first: int = 1  # blocks at the start that never skip tokens
    protect_last: int = 0
    router_hidden: int = 64
    probes: int = 16  # last queries whose attention gives the "attention received" factor
    guide_steps: int = 300
    train_steps: int = 8  # end-to-end distillation steps (model frozen)
    train_batch: int = 2
    lr: float = 3e-3
    sensitivity_probes: bool = True  # measure each block's held-out KL at 50% sparsity to seed the search
    search_evals: int = 12  # held-out evaluations in the genetic schedule search
    refine_evals: int = 4  # evaluations re-tuning the schedule after distillation
    heldout_fraction: float = 0.25  # last part of the calibration samples, used only to score schedules
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        n = self.name
        check_range(n, "sparsity", self.sparsity, 0.0, 0.9)
        check_range(n, "max_block_sparsity", self.max_block_sparsity, 0.01, 0.95)
        if self.sparsity > self.max_block_sparsity:
            raise ConfigError(f"{n}.sparsity = {self.sparsity} exceeds max_block_sparsity = {self.max_block_sparsity}: "
                              "raise max_block_sparsity or lower sparsity")
        for field_name in ("protect_first", "protect_last", "guide_steps", "train_steps", "search_evals", "refine_evals"):
            check_range(n, field_name, getattr(self, field_name), 0, 100000)
        check_range(n, "router_hidden", self.router_hidden, 1, 4096)
        check_range(n, "probes", self.probes, 1, 1024)
        check_range(n, "train_batch", self.train_batch, 1, 1024)
        check_range(n, "lr", self.lr, 1e-7, 1.0)
        check_range(n, "heldout_fraction", self.heldout_fraction, 0.0, 0.9)
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise ConfigError(f"{n}.schedule must be a list of per-block sparsities, got {self.schedule!r}")
            for value in self.schedule:
                check_range(n, "schedule[i]", value, 0.0, 0.95)

    # -- the pass -------------------------------------------------------------------------------
    def run(self, program) -> dict[str, Any]:
        if not program.is_causal_lm:
            raise ConfigError("prune_tokens works on causal language models (captured with a KV-cache signature)")
        if program.calibration is None:
            raise ConfigError("prune_tokens needs calibration text: pass calibration=token windows to fxpress.compile")
        ensure_meta(program)
        blocks = find_blocks(program.module)
        lo, hi = self._bounds(len(blocks))
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        train, held = self._split(program.calibration.batches)
        router = TokenRouter(len(blocks), self.router_hidden, self.seed)
        masked = masked_module(program, router, self.probes)
        frozen = {name: p.requires_grad for name, p in program.module.named_parameters()}
        for p in program.module.parameters():
            p.requires_grad_(False)
        timings: dict[str, float] = {}
        teacher = TeacherCache(program)
        stats: dict[str, Any] = {}
        warnings: list[str] = []
        try:
            start = time.perf_counter()
            records = collect(masked, router, program, train)
            stats["guide_loss"] = fit_guide(router, records, hi, self.guide_steps, self.seed)
            timings["guide"] = time.perf_counter() - start

            start = time.perf_counter()
            score = self._scorer(masked, router, program, held, teacher)
            if self.schedule is not None:
                schedule = self._fixed_schedule(len(blocks))
            else:
                seeds = initial_schedules(router, collect(masked, router, program, held), lo, hi, self.sparsity)
                if self.sensitivity_probes:
                    seeds.insert(1, sensitivity_schedule(score, lo, hi, self.sparsity))
                schedule, searched = genetic_search(score, seeds, lo, hi, self.sparsity, self.search_evals, rng)
                stats["search_kl_uniform"] = searched[0][0]
                stats["search_kl_best"] = min(s for s, _ in searched)
            timings["search"] = time.perf_counter() - start

            start = time.perf_counter()
            losses = []
            if self.train_steps and not differentiable(program.module):
                warnings.append("end-to-end distillation skipped: the graph holds fxpress ops without gradients "
                                "(e.g. quantized linears); the router keeps its guide-loss fit. List prune_tokens "
                                "before quantize to distill it.")
            else:
                losses = distill(masked, router, program, train, teacher, schedule, self)
            stats["distill_loss_first"] = losses[0] if losses else None
            stats["distill_loss_last"] = losses[-1] if losses else None
            if self.schedule is None and self.refine_evals:
                schedule, refined = genetic_search(score, [schedule], lo, hi, self.sparsity, self.refine_evals + 1, rng)
                stats["refine_kl_best"] = min(s for s, _ in refined)
            timings["distill"] = time.perf_counter() - start
        finally:
            for name, p in program.module.named_parameters():
                p.requires_grad_(frozen.get(name, False))
            router.trace = None

        router.sparsity.copy_(torch.tensor(schedule))
        costs = [block_costs(b) for b in blocks]
        route_blocks(program.module, router, "gather", schedule, self.probes)
        retrace(program)
        seq = int(program.calibration.batches.shape[1])
        meta = {"schedule": list(schedule), "probes": self.probes, "blocks": costs,
                "head_macs": (program.info.vocab_size or 0) * (program.info.hidden_size or 0)}
        program.metadata["prune_tokens"] = meta
        flops = prune_flops(meta, seq)
        stats.update({
            "blocks": len(blocks),
            "block_sparsity": [round(s, 3) for s in schedule],
            "mean_sparsity": sum(schedule) / len(schedule),
            f"flops_ratio@{seq}": flops["ratio"],
            "block_flops_saved": [round(x, 3) for x in flops["block_saved"]],
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "warnings": warnings,
        })
        return stats

    # -- helpers ------------------------------------------------------------------------------------
    def _bounds(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.zeros(num_blocks)
        hi = torch.full((num_blocks,), self.max_block_sparsity)
        hi[: self.protect_first] = 0.0
        if self.protect_last:
            hi[num_blocks - self.protect_last:] = 0.0
        if self.schedule is None and float(hi.sum()) + 1e-9 < self.sparsity * num_blocks:
            raise ConfigError(
                f"prune_tokens cannot reach a mean sparsity of {self.sparsity} over {num_blocks} blocks with "
                f"{self.protect_first}+{self.protect_last} protected blocks and max_block_sparsity "
                f"{self.max_block_sparsity}: protect fewer blocks or raise max_block_sparsity"
            )
        return lo, hi

    def _fixed_schedule(self, num_blocks: int) -> list[float]:
        if len(self.schedule) != num_blocks:
            raise ConfigError(f"prune_tokens.schedule has {len(self.schedule)} entries; the model has {num_blocks} blocks")
        return [round(float(s) * SPARSITY_SCALE) / SPARSITY_SCALE for s in self.schedule]

    def _split(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = samples.shape[0]
        held = min(n - 1, max(1, round(n * self.heldout_fraction))) if n > 1 else 0
        if held == 0:
            return samples, samples
        return samples[: n - held], samples[n - held:]

    def _scorer(self, masked, router, program, held, teacher) -> Callable[[list[float]], float]:
        def score(schedule: list[float]) -> float:
            router.sparsity.copy_(torch.tensor(schedule))
            with torch.no_grad():
                return sum(kl_divergence(teacher(b), run_logits(masked, program, b)).item() for b in held.split(2)) / len(
                    held.split(2))

        return score


# --- graph copies and re-export ----------------------------------------------------------------------

def masked_module(program, router: TokenRouter, probes: int) -> torch.fx.GraphModule:
    """A copy of the graph (sharing the weights) where every block is gated by the router, mask form."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(program.module.graph, {}))
    gm = torch.fx.GraphModule(program.module, graph)
    route_blocks(gm, router, "mask", [1.0] * router.num_blocks, probes, MaskGate(router))
    return gm


def export_inputs(program) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Example inputs and dynamic shapes for re-exporting a causal-LM graph (sizes > 1: no specialisation)."""
    from torch.export import Dim

    from fxpress.capture import EXPORT_BATCH, EXPORT_PAST, EXPORT_SEQ, MAX_BATCH, MAX_SEQ

    info = program.info
    ids = torch.randint(0, info.vocab_size or 2, (EXPORT_BATCH, EXPORT_SEQ), generator=torch.Generator().manual_seed(0))
    keys = torch.zeros(info.num_layers, EXPORT_BATCH, info.key_shape[0], EXPORT_PAST, info.key_shape[1])
    values = torch.zeros(info.num_layers, EXPORT_BATCH, info.value_shape[0], EXPORT_PAST, info.value_shape[1])
    batch, seq, past = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=MAX_SEQ), Dim("past", min=0, max=MAX_SEQ)
    names = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    shapes = {names[0]: {0: batch, 1: seq}, names[1]: {1: batch, 3: past}, names[2]: {1: batch, 3: past}}
    return (ids, keys, values), shapes


def retrace(program) -> None:
    """Re-export the rewritten module so it is plain ATen again, with shapes on every node."""
    args, shapes = export_inputs(program)
    try:
        exported = torch.export.export(program.module, args, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # export raises many error types
        raise CaptureError(f"prune_tokens: the pruned graph no longer exports: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from err
    program.module = exported.module()


def ensure_meta(program) -> None:
    """Shapes are read from node metadata; re-export first if an earlier pass left nodes without it."""
    skip = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}
    missing = [n for n in program.graph.nodes if n.op == "call_function" and n.target not in skip and "val" not in n.meta]
    if missing:
        retrace(program)


def differentiable(gm: torch.fx.GraphModule) -> bool:
    """False when the graph holds fxpress custom ops (their reference kernels define no backward)."""
    return not any(n.op == "call_function" and str(n.target).startswith("fxpress.") for n in gm.graph.nodes)


def run_logits(gm: torch.fx.GraphModule, program, ids: torch.Tensor) -> torch.Tensor:
    keys, values = program.empty_cache(ids.shape[0])
    return gm(ids, keys, values)[0]


class TeacherCache:
    """Unpruned logits per calibration batch, computed once (the distillation target)."""

    def __init__(self, program):
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


# --- guide: fit the router to the oracle ranking ------------------------------------------------------

def collect(masked, router: TokenRouter, program, samples: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Router features and each token's relative block update, with nothing skipped."""
    router.sparsity.zero_()
    out: dict[int, dict[str, list]] = {}
    with torch.no_grad():
        for batch in samples.split(2):
            router.trace = {}
            run_logits(masked, program, batch)
            for block, rec in router.trace.items():
                slot = out.setdefault(block, {"features": [], "importance": []})
                slot["features"].append(rec["features"])
                slot["importance"].append(rec["importance"])
    router.trace = None
    return {b: {k: torch.cat(v) for k, v in rec.items()} for b, rec in out.items()}


def keep_labels(importance: torch.Tensor, sparsity: torch.Tensor) -> torch.Tensor:
    """1 for the tokens an oracle keeps at each row's sparsity (top 1 - s by importance)."""
    seq = importance.shape[-1]
    rank = importance.argsort(-1, descending=True).argsort(-1)
    keep = seq - torch.floor(seq * sparsity + 1e-6)
    return (rank < keep.unsqueeze(-1)).float()


def fit_guide(router: TokenRouter, records, hi: torch.Tensor, steps: int, seed: int) -> float | None:
    """FTP's guide loss: BCE between router logits and oracle keep labels at random required sparsities."""
    blocks = [b for b in sorted(records) if hi[b] > 0]
    if not blocks:
        return None
    feats = torch.cat([records[b]["features"] for b in blocks])
    imp = torch.cat([records[b]["importance"] for b in blocks])
    limit = torch.cat([hi[b].expand(records[b]["features"].shape[0]) for b in blocks])
    flat = feats.reshape(-1, feats.shape[-1])
    router.shift.copy_(flat.mean(0))
    router.scale.copy_(flat.std(0).clamp_min(1e-3))
    router.shift[SPARSITY_COLUMN], router.scale[SPARSITY_COLUMN] = 0.3, 0.2
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    loss = None
    for _ in range(steps):
        s = torch.rand(limit.shape, generator=gen) * limit
        x = feats.clone()
        x[..., SPARSITY_COLUMN] = s.unsqueeze(-1)
        loss = F.binary_cross_entropy_with_logits(router.score_features(x), keep_labels(imp, s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() if loss is not None else None


# --- schedule search ----------------------------------------------------------------------------------

def project(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, target: float) -> torch.Tensor:
    """The nearest schedule within [lo, hi] whose mean is `target`, on the permille grid."""
    s = s.clamp(lo, hi)
    for _ in range(100):
        gap = target * len(s) - float(s.sum())
        if abs(gap) < 1e-6:
            break
        free = (s < hi - 1e-9) if gap > 0 else (s > lo + 1e-9)
        if not bool(free.any()):
            break
        s = (s + gap / int(free.sum()) * free).clamp(lo, hi)
    return (s * SPARSITY_SCALE).round() / SPARSITY_SCALE


def initial_schedules(router: TokenRouter, records, lo, hi, target: float) -> list[list[float]]:
    """Seeds for the search: uniform, and a greedy allocation by oracle cost of the router's choices."""
    uniform = project(torch.full_like(hi, target), lo, hi, target)
    costs = []
    with torch.no_grad():
        for b in sorted(records):
            x = records[b]["features"].clone()
            x[..., SPARSITY_COLUMN] = target
            score, imp = router.score_features(x), records[b]["importance"].pow(2)
            order = score.argsort(-1)  # lowest first: skipped first
            ranked = imp.gather(-1, order).cumsum(-1).mean(0) / imp.shape[-1]
            costs.append(torch.cat([torch.zeros(1), ranked]))

    def marginal(b: int, a: float, c: float) -> float:
        seq = costs[b].shape[0] - 1
        return float(costs[b][min(int(c * seq), seq)] - costs[b][int(a * seq)])

    greedy = greedy_allocation(marginal, lo, hi, target)
    return [uniform.tolist(), greedy.tolist()]


def greedy_allocation(marginal: Callable[[int, float, float], float], lo, hi, target: float,
                      step: float = 0.05) -> torch.Tensor:
    """Water-filling: raise the block whose next step of sparsity costs least until the mean is reached."""
    s = lo.clone()
    while float(s.mean()) < target - 1e-9:
        options = [(marginal(b, float(s[b]), float(s[b]) + step), b) for b in range(len(s)) if s[b] + step <= hi[b] + 1e-9]
        if not options:
            break
        s[min(options)[1]] += step
    return project(s, lo, hi, target)


def sensitivity_schedule(score: Callable[[list[float]], float], lo, hi, target: float, level: float = 0.5,
                         power: float = 2.0) -> list[float]:
    """Seed from measured sensitivity: held-out KL with one block at `level`, cost modelled as (s/level)^power."""
    level = min(level, float(hi.max()))
    kl = []
    for b in range(len(hi)):
        if hi[b] <= lo[b]:
            kl.append(math.inf)
            continue
        probe = [0.0] * len(hi)
        probe[b] = min(level, float(hi[b]))
        kl.append(max(score(probe), 1e-9))
    return greedy_allocation(lambda b, a, c: kl[b] * ((c / level) ** power - (a / level) ** power), lo, hi, target).tolist()


def genetic_search(score: Callable[[list[float]], float], seeds: list[list[float]], lo, hi, target: float,
                   budget: int, rng: random.Random) -> tuple[list[float], list[tuple[float, list[float]]]]:
    """A steady-state genetic search: tournament parents, uniform crossover, mass-preserving mutation."""
    pool: list[tuple[float, list[float]]] = []
    budget = max(budget, 1)
    for s in seeds[:budget]:
        pool.append((score(s), s))
    free = [i for i in range(len(hi)) if hi[i] > lo[i]]
    while len(pool) < budget and len(free) >= 2:
        a, b = (min(rng.sample(pool, min(2, len(pool))))[1] for _ in range(2))
        child = torch.tensor([x if rng.random() < 0.5 else y for x, y in zip(a, b)])
        for _ in range(rng.randint(1, 3)):
            i, j = rng.sample(free, 2)
            delta = rng.choice([0.025, 0.05, 0.1])
            child[i] += delta
            child[j] -= delta
        child = project(child, lo, hi, target).tolist()
        pool.append((score(child), child))
    return min(pool)[1], pool


# --- distillation ---------------------------------------------------------------------------------------

def distill(masked, router: TokenRouter, program, samples: torch.Tensor, teacher, schedule, cfg) -> list[float]:
    """End-to-end router training, model frozen: KL + sparsity-constraint + guide losses."""
    if not cfg.train_steps:
        return []
    router.sparsity.copy_(torch.tensor(schedule))
    opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
    batches = samples.split(cfg.train_batch)
    losses = []
    for step in tqdm(range(cfg.train_steps), desc="prune_tokens: distill", disable=not cfg.progress, leave=False):
        ids = batches[step % len(batches)]
        router.trace = {}
        kl = kl_divergence(teacher(ids), run_logits(masked, program, ids))
        sparse, guide = [], []
        for block, rec in router.trace.items():
            s = float(router.sparsity[block])
            if s <= 0 or "soft" not in rec:
                continue
            sparse.append((rec["soft"].mean() - (1.0 - s)) ** 2)
            labels = keep_labels(rec["importance"], torch.full(rec["importance"].shape[:1], s))
            guide.append(F.binary_cross_entropy_with_logits(rec["score"], labels))
        loss = kl + 0.1 * torch.stack(sparse).mean() + 0.1 * torch.stack(guide).mean() if sparse else kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    router.trace = None
    return losses


# --- accounting -------------------------------------------------------------------------------------------

def prune_flops(meta: dict[str, Any], seq: int, schedule: list[float] | None = None) -> dict[str, Any]:
    """Multiply-adds of one prefill of `seq` tokens, dense vs pruned (router and probes included)."""
    schedule = schedule if schedule is not None else meta["schedule"]
    probes = meta.get("probes", 16)
    dense_total, pruned_total, saved = 0.0, 0.0, []
    for cost, s in zip(meta["blocks"], schedule):
        attn = 2 * cost["heads"] * cost["head_dim"] * seq  # per query, over every key
        dense = seq * (cost["kept_macs"] + cost["every_macs"] + attn)
        permille = int(round(s * SPARSITY_SCALE))
        if permille > 0:
            k = keep_count(seq, permille)
            router = probes * (cost["query_macs"] + attn) + seq * 1000
            pruned = k * (cost["kept_macs"] + attn) + seq * cost["every_macs"] + router
        else:
            pruned = dense
        dense_total += dense
        pruned_total += pruned
        saved.append(1.0 - pruned / dense)
    head = seq * meta.get("head_macs", 0)
    return {"dense": dense_total + head, "pruned": pruned_total + head,
            "ratio": (pruned_total + head) / (dense_total + head), "block_saved": saved}
