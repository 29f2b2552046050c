"""PruneTokens: a learned router lets the least important tokens skip decoder blocks (FTP, arXiv 2412.11494).

Reads top to bottom as the pass runs:
1. find the decoder blocks in the graph (`fxpress.passes.prune_tokens.router.find_blocks`);
2. build a training copy of the graph where skipped tokens are masked (same function as the
   final gather/scatter graph, but differentiable and with the schedule in a buffer);
3. guide: fit the router to an oracle ranking (the size of each token's block
   update) on calibration text, for random required sparsities (FTP's guide loss);
4. schedule: a genetic search over per-block sparsity on a grid 0, 1/levels, ..., 1 under a FLOPs
   budget (the cost of skipping `sparsity` of all token-block visits). 0 leaves a block alone and
   1 drops it whole (layer dropping is the limit case of token dropping: neither has a router),
   so ShortGPT's choice is one of the seeds (with uniform and measured drop sensitivity), and
   every candidate is scored by KL divergence to the unpruned model on held-out calibration text;
5. distill (when some block is routed, 0 < s < 1): end-to-end steps with the model frozen: KL to the unpruned logits, a
   sparsity-constraint loss on the soft gates and the guide loss;
6. refine the schedule with the trained router, then rewrite the real graph in gather mode
   (score -> top-k -> gather -> block -> scatter) and re-export it to plain ATen.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxpress.errors import CaptureError, ConfigError
from fxpress.passes.base import ALL_TOKENS, Pass, check_range, register_pass
from fxpress.passes.prune_tokens.router import (
    FEATURES,
    SPARSITY_SCALE,
    MaskGate,
    TokenRouter,
    block_costs,
    find_blocks,
    keep_count,
    route_blocks,
)
from fxpress.program import Program

SPARSITY_COLUMN = FEATURES.index("sparsity")


@register_pass
@dataclass
class PruneTokens(Pass):
    """Token-wise pruning with a learned router and a searched per-block sparsity schedule."""

    name: ClassVar[str] = "prune_tokens"
    version: ClassVar[int] = 3  # 3: learned hidden-state direction in the router, block-only search
    needs_calibration: ClassVar[bool] = True
    invalidates: ClassVar[frozenset[str]] = frozenset({ALL_TOKENS})

    sparsity: float = 0.3  # global token sparsity: the FLOPs of skipping this fraction of all token-block visits
    schedule: list[float] | None = None  # fixed per-block sparsity (skips the search); 1.0 drops a block
    levels: int = 8  # per-block sparsity grid 0, 1/levels, ..., 1
    max_block_sparsity: float = 1.0  # below 1.0 no block is dropped whole (pure token routing)
    protect_first: int = 1  # blocks at the start that never skip tokens
    protect_last: int = 0
    router_hidden: int = 64
    router_projection: bool = True  # a learned per-block direction on the hidden state as one more factor
    probes: int = 16  # last queries whose attention gives the "attention received" factor
    guide_steps: int = 300
    train_steps: int = 16  # end-to-end distillation steps (model frozen)
    train_batch: int = 2
    lr: float = 3e-3
    sensitivity_probes: bool = True  # one held-out evaluation per block, dropped, to seed and steer the search
    search_evals: int = 40  # candidates scored by the search after its seeds (and the sensitivity probes)
    block_search_evals: int = 0  # > 0: first a whole-block-only search ({0, 1} per block) with this many
    # evaluations (the ablation "searched block pruning"); its best seeds the token search
    refine_evals: int = 8  # evaluations re-tuning the schedule after distillation
    heldout_fraction: float = 0.25  # last part of the calibration samples, used only to score schedules
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        n = self.name
        check_range(n, "sparsity", self.sparsity, 0.0, 0.95)
        check_range(n, "max_block_sparsity", self.max_block_sparsity, 0.01, 1.0)
        if self.sparsity > self.max_block_sparsity:
            raise ConfigError(f"{n}.sparsity = {self.sparsity} exceeds max_block_sparsity = {self.max_block_sparsity}: "
                              "raise max_block_sparsity or lower sparsity")
        for field_name in ("protect_first", "protect_last", "guide_steps", "train_steps", "search_evals", "refine_evals",
                           "block_search_evals"):
            check_range(n, field_name, getattr(self, field_name), 0, 100000)
        check_range(n, "levels", self.levels, 1, SPARSITY_SCALE)
        check_range(n, "router_hidden", self.router_hidden, 1, 4096)
        check_range(n, "probes", self.probes, 1, 1024)
        check_range(n, "train_batch", self.train_batch, 1, 1024)
        check_range(n, "lr", self.lr, 1e-7, 1.0)
        check_range(n, "heldout_fraction", self.heldout_fraction, 0.0, 0.9)
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise ConfigError(f"{n}.schedule must be a list of per-block sparsities, got {self.schedule!r}")
            for value in self.schedule:
                check_range(n, "schedule[i]", value, 0.0, 1.0)

    # -- the pass -------------------------------------------------------------------------------
    def run(self, program: Program) -> dict[str, Any]:
        if not program.is_causal_lm:
            raise ConfigError("prune_tokens works on causal language models (captured with a KV-cache signature)")
        if program.calibration is None:
            raise ConfigError("prune_tokens needs calibration text: pass calibration=token windows to fxpress.compile")
        ensure_meta(program)
        blocks = find_blocks(program.module)
        seq = int(program.calibration.batches.shape[1])
        width = (program.info.hidden_size or 0) if self.router_projection else 0
        meta = {"probes": self.probes, "blocks": [block_costs(b) for b in blocks],
                "head_macs": (program.info.vocab_size or 0) * (program.info.hidden_size or 0),
                "router_macs": self.router_hidden * (len(FEATURES) + 1) + width + 400}  # + 400: features, top-k
        top = self._top_levels(len(blocks))
        allowed = flops_budget(meta, seq, self.sparsity)
        if self.schedule is None and prune_flops(meta, seq, [t / self.levels for t in top])["pruned"] > allowed * (1 + 1e-9):
            raise ConfigError(
                f"prune_tokens cannot reach a token sparsity of {self.sparsity} over {len(blocks)} blocks with "
                f"{self.protect_first}+{self.protect_last} protected blocks and max_block_sparsity "
                f"{self.max_block_sparsity}: protect fewer blocks or raise max_block_sparsity"
            )
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        train, held = self._split(program.calibration.batches)
        router = TokenRouter(len(blocks), self.router_hidden, self.seed, width)
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
            stats["guide_loss"] = fit_guide(router, records, top, self.levels, self.guide_steps, self.seed)
            timings["guide"] = time.perf_counter() - start

            start = time.perf_counter()
            score = self._scorer(masked, router, program, held, teacher)
            search = ScheduleSearch(score, lambda s: prune_flops(meta, seq, s)["pruned"], allowed, top, self.levels, rng)
            if self.schedule is not None:
                schedule = self._fixed_schedule(len(blocks))
            else:
                schedule = self._search(search, records, stats)
            timings["search"] = time.perf_counter() - start

            start = time.perf_counter()
            partial = any(0 < s < 1 for s in schedule)
            losses = []
            if not partial:
                warnings.append("the schedule drops whole blocks only: no router runs, distillation skipped")
            elif self.train_steps and not differentiable(program.module):
                warnings.append("end-to-end distillation skipped: the graph holds fxpress ops without gradients "
                                "(e.g. quantized linears); the router keeps its guide-loss fit. List prune_tokens "
                                "before quantize to distill it.")
            else:
                guided = {k: v.clone() for k, v in router.state_dict().items()}
                before = score(schedule)
                losses = distill(masked, router, program, train, teacher, schedule, self)
                schedule = self._refine(search, score, schedule, before, guided, router, stats)
            stats["distill_loss_first"] = losses[0] if losses else None
            stats["distill_loss_last"] = losses[-1] if losses else None
            timings["distill"] = time.perf_counter() - start
        finally:
            for name, p in program.module.named_parameters():
                p.requires_grad_(frozen.get(name, False))
            router.trace = None

        router.sparsity.copy_(torch.tensor(schedule))
        route_blocks(program.module, router, "gather", schedule, self.probes)
        retrace(program)
        meta["schedule"] = list(schedule)
        program.metadata["prune_tokens"] = meta
        flops = prune_flops(meta, seq)
        stats.update({
            "blocks": len(blocks),
            "block_sparsity": [round(s, 3) for s in schedule],
            "dropped_blocks": [i for i, s in enumerate(schedule) if s >= 1.0],
            "routed_blocks": [i for i, s in enumerate(schedule) if 0 < s < 1.0],
            "mean_sparsity": sum(schedule) / len(schedule),
            f"flops_ratio@{seq}": flops["ratio"],
            f"flops_budget@{seq}": allowed / flops["dense"],
            "block_flops_saved": [round(x, 3) for x in flops["block_saved"]],
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "warnings": warnings,
        })
        return stats

    # -- helpers ------------------------------------------------------------------------------------
    def _top_levels(self, num_blocks: int) -> list[int]:
        """Highest grid level per block: protected blocks 0, others floor(max_block_sparsity * levels)."""
        top = [int(math.floor(self.max_block_sparsity * self.levels + 1e-9))] * num_blocks
        for i in range(min(self.protect_first, num_blocks)):
            top[i] = 0
        for i in range(max(num_blocks - self.protect_last, 0), num_blocks):
            top[i] = 0
        return top

    def _search(self, search: ScheduleSearch, records, stats: dict[str, Any]) -> list[float]:
        """Seeds (uniform, ShortGPT, drop sensitivity, drops mixed with routing), optionally the best
        whole-block-only schedule, then the genetic search on held-out KL."""
        n = len(search.top)
        bi = block_influence(records)
        seeds = {"uniform": search.uniform(), "shortgpt": search.fill(sorted(range(n), key=bi.__getitem__))}
        if self.sensitivity_probes:
            kl = []
            for b in range(n):
                probe = [0] * n
                probe[b] = search.top[b]
                kl.append(search.evaluate(tuple(probe)) if search.top[b] else math.inf)
            search.weights = [1.0 / max(k, 1e-6) if math.isfinite(k) else 0.0 for k in kl]
            order = sorted(range(n), key=kl.__getitem__)
            seeds["sensitivity"] = search.fill(order)
            seeds["sensitivity_half"] = search.fill(order, max(1, self.levels // 2))
            drops = sum(lv >= self.levels for lv in seeds["sensitivity"])
            for fewer in (1, 2, 3):  # fewer dropped blocks, the rest of the budget as light routing
                if drops - fewer >= 0:
                    seeds[f"mixed_{drops - fewer}"] = search.fill_mixed(order, drops - fewer, max(1, self.levels // 4))
            stats["block_drop_kl"] = [round(k, 3) if math.isfinite(k) else None for k in kl]
        if self.block_search_evals and any(t >= self.levels for t in search.top):
            blocks_only = search.whole_blocks()
            orders = [sorted(range(n), key=bi.__getitem__)] + ([order] if self.sensitivity_probes else [])
            drop_set, _ = blocks_only.run([blocks_only.fill(o) for o in orders],
                                          len(blocks_only.pool) + self.block_search_evals)
            search.pool.update({tuple(lv * self.levels for lv in s): v for s, v in blocks_only.pool.items()})
            seeds["block_only"] = tuple(lv * self.levels for lv in drop_set)
            stats["block_only_schedule"] = [float(lv) for lv in drop_set]
            stats["block_only_scored"] = len(blocks_only.pool)
        for name, s in seeds.items():
            stats[f"search_kl_{name}"] = search.evaluate(s)
        best, kl = search.run(list(seeds.values()), len(search.pool) + self.search_evals)
        stats["search_kl_best"] = kl
        stats["search_scored"] = len(search.pool)
        return search.fractions(best)

    def _refine(self, search: ScheduleSearch, score, schedule: list[float], before: float, guided: dict,
                router: TokenRouter, stats: dict[str, Any]) -> list[float]:
        """Re-tune the schedule with the distilled router; keep distillation only if held-out KL improved."""
        after = score(schedule)
        best, kl = tuple(round(s * self.levels) for s in schedule), after
        if self.schedule is None and self.refine_evals:
            ranked = sorted(search.pool, key=search.pool.__getitem__)[:4]
            search.pool = {}  # the router changed: old scores are stale
            best, kl = search.run(ranked, len(ranked) + self.refine_evals)
            stats["refine_kl_best"] = kl
        stats["distill_kl_before"], stats["distill_kl_after"] = before, after
        stats["distill_kept"] = kl <= before
        if kl > before:  # distillation did not pay on held-out text: back to the guide-fitted router
            router.load_state_dict(guided)
            return schedule
        return search.fractions(best) if self.schedule is None else schedule

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
        score = router.score_features(x)
        if hidden is not None:
            score = score + torch.einsum("nsw,nw->ns", hidden, router.proj[owner])
        loss = F.binary_cross_entropy_with_logits(score, keep_labels(imp, s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() if loss is not None else None


# --- schedule search ----------------------------------------------------------------------------------

@dataclass
class ScheduleSearch:
    """Per-block sparsity on a grid (level / levels; the top level 1.0 drops the block) under a FLOPs budget.

    A steady-state genetic search: seeds (uniform, ShortGPT's Block-Influence drop order, the measured
    per-block drop sensitivity), then children of the best schedules by swaps, level moves and
    crossover, each repaired to the budget (raise blocks, sensitivity-weighted, while over it; lower
    blocks while slack allows).
    Every candidate is scored by held-out KL to the unpruned model; duplicates are not re-scored.
    """

    score: Callable[[list[float]], float]
    flops: Callable[[list[float]], float]
    allowed: float  # pruned multiply-adds allowed
    top: list[int]  # highest level per block (0 = protected)
    levels: int
    rng: random.Random
    weights: list[float] = field(default_factory=list)  # how readily repair raises each block
    pool: dict[tuple[int, ...], float] = field(default_factory=dict)

    def fractions(self, sched: tuple[int, ...]) -> list[float]:
        return [lv / self.levels for lv in sched]

    def feasible(self, sched) -> bool:
        return self.flops(self.fractions(sched)) <= self.allowed * (1 + 1e-9)

    def evaluate(self, sched: tuple[int, ...]) -> float:
        """Held-out KL of a schedule; feasible ones join the pool the search breeds from."""
        if sched in self.pool:
            return self.pool[sched]
        kl = self.score(self.fractions(sched))
        if self.feasible(sched):
            self.pool[sched] = kl
        return kl

    def repair(self, sched) -> tuple[int, ...]:
        s = [min(max(lv, 0), t) for lv, t in zip(sched, self.top)]
        while not self.feasible(s):
            free = [i for i in range(len(s)) if s[i] < self.top[i]]
            if not free:
                break
            i = self.rng.choices(free, [self.weights[j] if self.weights else 1.0 for j in free])[0]
            s[i] += 1
        order = [i for i in range(len(s)) if s[i] > 0]
        self.rng.shuffle(order)
        for i in order:  # use the slack: lower blocks while the budget still holds
            while s[i] > 0:
                s[i] -= 1
                if not self.feasible(s):
                    s[i] += 1
                    break
        return tuple(s)

    def fill(self, order: list[int], level: int | None = None) -> tuple[int, ...]:
        """Raise blocks in `order` to `level` (default their top) until the budget holds."""
        s = [0] * len(self.top)
        for i in order:
            if self.feasible(s):
                break
            s[i] = self.top[i] if level is None else min(level, self.top[i])
        return self.repair(s)

    def fill_mixed(self, order: list[int], drops: int, level: int) -> tuple[int, ...]:
        """Drop the first `drops` blocks of `order`, then route the next ones at `level` until the budget holds."""
        s = [0] * len(self.top)
        for i in order[:drops]:
            s[i] = self.top[i]
        for i in order[drops:]:
            if self.feasible(s):
                break
            s[i] = min(level, self.top[i])
        return self.repair(s)

    def whole_blocks(self) -> ScheduleSearch:
        """The same search restricted to {0, 1} per block (block pruning), sharing scores already taken:
        the ablation that shows what routing adds over the search itself."""
        top = [1 if t >= self.levels else 0 for t in self.top]
        twin = ScheduleSearch(self.score, self.flops, self.allowed, top, 1, self.rng, list(self.weights))
        twin.pool = {tuple(lv // self.levels for lv in s): kl for s, kl in self.pool.items()
                     if all(lv in (0, self.levels) for lv in s)}
        return twin

    def uniform(self) -> tuple[int, ...]:
        for level in range(1, self.levels + 1):
            s = tuple(min(level, t) for t in self.top)
            if self.feasible(s):
                return self.repair(s)
        return self.repair(tuple(self.top))

    def child(self) -> tuple[int, ...]:
        """A neighbour of the best (or of an elite) schedule: swap two blocks' levels (a dropped block for
        a kept one costs the same FLOPs), move some levels from one block to another, or cross two elites."""
        ranked = sorted(self.pool, key=self.pool.__getitem__)
        elite = ranked[: max(2, min(6, len(ranked)))]
        a = list(ranked[0] if self.rng.random() < 0.6 else self.rng.choice(elite))
        free = [i for i in range(len(a)) if self.top[i] > 0]
        pruned = [i for i in free if a[i] > 0]
        move = self.rng.random()
        if move < 0.15 and len(elite) > 1:  # uniform crossover
            b = self.rng.choice(elite)
            a = [x if self.rng.random() < 0.5 else y for x, y in zip(a, b)]
        elif pruned and move < 0.65:  # swap a pruned block with a less pruned one
            i = self.rng.choice(pruned)
            lower = [j for j in free if a[j] < a[i]]
            if lower:
                j = self.rng.choice(lower)
                a[i], a[j] = min(a[j], self.top[i]), min(a[i], self.top[j])
        elif pruned:  # move d levels from block i to block j
            i = self.rng.choice(pruned)
            room = [j for j in free if j != i and a[j] < self.top[j]]
            if room:
                j = self.rng.choice(room)
                d = self.rng.randint(1, min(a[i], self.top[j] - a[j]))
                a[i], a[j] = a[i] - d, a[j] + d
        return self.repair(a)

    def run(self, seeds: list[tuple[int, ...]], budget: int) -> tuple[tuple[int, ...], float]:
        for s in seeds:
            self.evaluate(s)
        tries = 0
        while len(self.pool) < budget and tries < 20 * budget:
            tries += 1
            c = self.child()
            if c not in self.pool and self.feasible(c):
                self.evaluate(c)
        best = min(self.pool, key=self.pool.__getitem__)
        return best, self.pool[best]


def block_influence(records) -> list[float]:
    """ShortGPT's Block Influence per block: 1 - mean cos(block input, block output) on calibration text."""
    return [float(1.0 - records[b]["cos"].mean()) for b in sorted(records)]


# --- distillation ---------------------------------------------------------------------------------------

def distill(masked, router: TokenRouter, program, samples: torch.Tensor, teacher, schedule, cfg) -> list[float]:
    """End-to-end router training, model frozen: KL + sparsity-constraint + guide losses."""
    if not cfg.train_steps:
        return []
    router.sparsity.copy_(torch.tensor(schedule))
    opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)  # settle at the end of a short run
    batches = samples.split(cfg.train_batch)
    losses = []
    for step in tqdm(range(cfg.train_steps), desc="prune_tokens: distill", disable=not cfg.progress, leave=False):
        ids = batches[step % len(batches)]
        router.trace = {}
        kl = kl_divergence(teacher(ids), run_logits(masked, program, ids))
        sparse, guide = [], []
        for block, rec in router.trace.items():
            s = float(router.sparsity[block])
            if not 0 < s < 1 or "soft" not in rec:  # untouched or dropped blocks have no router
                continue
            sparse.append((rec["soft"].mean() - (1.0 - s)) ** 2)
            labels = keep_labels(rec["importance"], torch.full(rec["importance"].shape[:1], s))
            guide.append(F.binary_cross_entropy_with_logits(rec["score"], labels))
        loss = kl + 0.1 * torch.stack(sparse).mean() + 0.1 * torch.stack(guide).mean() if sparse else kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
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
        if permille >= SPARSITY_SCALE:  # dropped: only the k/v projections still run (they fill the cache)
            pruned = seq * cost["every_macs"]
        elif permille > 0:
            k = keep_count(seq, permille)
            router = probes * (cost["query_macs"] + attn) + seq * meta.get("router_macs", 1000)
            pruned = k * (cost["kept_macs"] + attn) + seq * cost["every_macs"] + router
        else:
            pruned = dense
        dense_total += dense
        pruned_total += pruned
        saved.append(1.0 - pruned / dense)
    head = seq * meta.get("head_macs", 0)
    return {"dense": dense_total + head, "pruned": pruned_total + head,
            "ratio": (pruned_total + head) / (dense_total + head), "block_saved": saved}


def flops_budget(meta: dict[str, Any], seq: int, sparsity: float) -> float:
    """Multiply-adds allowed for a token sparsity: the dense count less `sparsity` of what every
    token-block visit could save (its query-side matmuls and attention), with no router cost.
    At 0.3 on equal blocks this is the cost of dropping 30% of the blocks."""
    dense = prune_flops(meta, seq, [0.0] * len(meta["blocks"]))["dense"]
    savable = sum(seq * (c["kept_macs"] + 2 * c["heads"] * c["head_dim"] * seq) for c in meta["blocks"])
    return dense - sparsity * savable
