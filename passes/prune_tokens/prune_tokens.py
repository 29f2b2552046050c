"""PruneTokens: a learned router lets the least important tokens skip decoder blocks (FTP, arXiv 2412.11494).

Reads top to bottom as the pass runs:
1. find the decoder blocks in the graph (`fxpress.passes.prune_tokens.router.find_blocks`);
2. build a training copy of the graph where skipped tokens are masked (`training.masked_module`);
3. guide: fit the router to an oracle ranking (the size of each token's block update) on
   calibration text, for random required sparsities (FTP's guide loss, `training.fit_guide`);
4. schedule: a genetic search over per-block sparsity under a FLOPs budget, every candidate scored
   by KL divergence to the unpruned model on held-out calibration text (`search.search_schedule`);
5. distill (when some block is routed, 0 < s < 1): end-to-end steps with the model frozen
   (`training.distill`), then refine the schedule with the trained router;
6. rewrite the real graph in gather mode (score -> top-k -> gather -> block -> scatter), re-export it
   to plain ATen (`export.retrace`) and report.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fxpress.errors import ConfigError, RecipeError
from fxpress.passes.base import ALL_TOKENS, Pass, check_range, register_pass
from fxpress.passes.prune_tokens.export import ensure_meta, retrace
from fxpress.passes.prune_tokens.flops import flops_budget, prune_flops
from fxpress.passes.prune_tokens.router import (
    FEATURES,
    SPARSITY_SCALE,
    TokenRouter,
    block_costs,
    find_blocks,
    route_blocks,
)
from fxpress.passes.prune_tokens.search import ScheduleSearch, SearchSettings, search_schedule
from fxpress.passes.prune_tokens.training import (
    RouterTraining,
    TeacherCache,
    collect,
    differentiable,
    distill,
    fit_guide,
    frozen_model,
    held_out_scorer,
    masked_module,
    split_heldout,
)

if TYPE_CHECKING:
    from fxpress.program import Program

# version 3's flat fields -> (group, field) of version 4
V3_GROUPED_FIELDS = {
    "router_hidden": ("router", "hidden"), "router_projection": ("router", "projection"),
    "probes": ("router", "probes"), "guide_steps": ("router", "guide_steps"),
    "train_steps": ("router", "train_steps"), "train_batch": ("router", "train_batch"), "lr": ("router", "lr"),
    "levels": ("search", "levels"), "max_block_sparsity": ("search", "max_block_sparsity"),
    "sensitivity_probes": ("search", "sensitivity_probes"), "search_evals": ("search", "search_evals"),
    "block_search_evals": ("search", "block_search_evals"), "refine_evals": ("search", "refine_evals"),
    "heldout_fraction": ("search", "heldout_fraction"),
}


@dataclass
class Stopwatch:
    """Seconds per stage, for the report."""

    seconds: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.start, 1)
        self.start = now


@dataclass
class RouterFit:
    """What the router stages share: the masked training copy, the split calibration text and the teacher."""

    program: Program
    router: TokenRouter
    masked: torch.fx.GraphModule
    train: torch.Tensor
    held: torch.Tensor
    teacher: TeacherCache


@register_pass
@dataclass
class PruneTokens(Pass):
    """Token-wise pruning with a learned router and a searched per-block sparsity schedule."""

    name: ClassVar[str] = "prune_tokens"
    version: ClassVar[int] = 4  # 4: router and search settings in groups; 3: hidden-state direction, block search
    needs_calibration: ClassVar[bool] = True
    invalidates: ClassVar[frozenset[str]] = frozenset({ALL_TOKENS})

    sparsity: float = 0.3  # global token sparsity: the FLOPs of skipping this fraction of all token-block visits
    schedule: list[float] | None = None  # fixed per-block sparsity (skips the search); 1.0 drops a block
    protect_first: int = 1  # blocks at the start that never skip tokens
    protect_last: int = 0
    router: RouterTraining = field(default_factory=RouterTraining)
    search: SearchSettings = field(default_factory=SearchSettings)
    seed: int = 0
    progress: bool = True

    @classmethod
    def upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Version 3 kept the router and search settings flat: move them into their groups."""
        if version != 3:  # older recipes predate the version history this pass keeps
            raise RecipeError(f"pass '{cls.name}' reads recipes from version 3 on; this one is version {version}")
        upgraded: dict[str, Any] = {"router": {}, "search": {}}
        for key, value in fields.items():
            group, name = V3_GROUPED_FIELDS.get(key, (None, key))
            (upgraded[group] if group else upgraded)[name] = value
        return upgraded

    def validate(self) -> None:
        n = self.name
        check_range(n, "sparsity", self.sparsity, 0.0, 0.95)
        check_range(n, "protect_first", self.protect_first, 0, 100000)
        check_range(n, "protect_last", self.protect_last, 0, 100000)
        self.router.validate(n)
        self.search.validate(n)
        if self.sparsity > self.search.max_block_sparsity:
            raise ConfigError(f"{n}.sparsity = {self.sparsity} exceeds search.max_block_sparsity = "
                              f"{self.search.max_block_sparsity}: raise max_block_sparsity or lower sparsity")
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise ConfigError(f"{n}.schedule must be a list of per-block sparsities, got {self.schedule!r}")
            for value in self.schedule:
                check_range(n, "schedule[i]", value, 0.0, 1.0)

    # -- the pass -------------------------------------------------------------------------------
    def run(self, program: Program) -> dict[str, Any]:
        self._check_program(program)
        ensure_meta(program)
        blocks = find_blocks(program.module)
        seq = int(program.calibration.batches.shape[1])
        meta = self._cost_table(program, blocks)
        top = self._top_levels(len(blocks))
        allowed = flops_budget(meta, seq, self.sparsity)
        self._check_reachable(meta, seq, top, allowed)
        torch.manual_seed(self.seed)
        width = (program.info.hidden_size or 0) if self.router.projection else 0
        router = TokenRouter(len(blocks), self.router.hidden, self.seed, width)
        stats: dict[str, Any] = {"warnings": []}
        with frozen_model(program, router):
            schedule = self._fit_router_and_schedule(program, router, meta, seq, top, allowed, stats)
        router.sparsity.copy_(torch.tensor(schedule))
        route_blocks(program.module, router, "gather", schedule, self.router.probes)
        retrace(program)
        meta["schedule"] = list(schedule)
        program.metadata["prune_tokens"] = meta
        stats.update(self._schedule_report(meta, seq, schedule, allowed))
        return stats

    def _check_program(self, program: Program) -> None:
        if not program.is_causal_lm:
            raise ConfigError("prune_tokens works on causal language models (captured with a KV-cache signature)")
        if program.calibration is None:
            raise ConfigError("prune_tokens needs calibration text: pass calibration=token windows to fxpress.compile")
        if program.weights is not None:
            raise ConfigError(
                "prune_tokens trains its token router by back-propagating through the whole model, which a "
                "store-backed program (compiled with max_memory) cannot do within its budget: compile it without "
                "max_memory, or score blocks with the streamed ShortGPT baseline "
                "(fxpress.passes.prune_tokens.baselines.influence / drop)")

    def _cost_table(self, program: Program, blocks: list) -> dict[str, Any]:
        """Per-block multiply-adds and the router's own cost: what `prune_flops` prices a schedule with."""
        info = program.info
        width = (info.hidden_size or 0) if self.router.projection else 0
        return {"probes": self.router.probes, "blocks": [block_costs(b) for b in blocks],
                "head_macs": (info.vocab_size or 0) * (info.hidden_size or 0),
                "router_macs": self.router.hidden * (len(FEATURES) + 1) + width + 400}  # + 400: features, top-k

    def _top_levels(self, num_blocks: int) -> list[int]:
        """Highest grid level per block: protected blocks 0, others floor(max_block_sparsity * levels)."""
        top = [int(math.floor(self.search.max_block_sparsity * self.search.levels + 1e-9))] * num_blocks
        for i in range(min(self.protect_first, num_blocks)):
            top[i] = 0
        for i in range(max(num_blocks - self.protect_last, 0), num_blocks):
            top[i] = 0
        return top

    def _check_reachable(self, meta: dict[str, Any], seq: int, top: list[int], allowed: float) -> None:
        """Fail before any training when even the most pruned schedule the grid allows misses the budget."""
        most_pruned = [t / self.search.levels for t in top]
        if self.schedule is None and prune_flops(meta, seq, most_pruned)["pruned"] > allowed * (1 + 1e-9):
            raise ConfigError(
                f"prune_tokens cannot reach a token sparsity of {self.sparsity} over {len(top)} blocks with "
                f"{self.protect_first}+{self.protect_last} protected blocks and max_block_sparsity "
                f"{self.search.max_block_sparsity}: protect fewer blocks or raise max_block_sparsity"
            )

    def _fit_router_and_schedule(self, program: Program, router: TokenRouter, meta: dict[str, Any], seq: int,
                                 top: list[int], allowed: float, stats: dict[str, Any]) -> list[float]:
        """Guide-fit the router, search the schedule on held-out KL, then distill and refine when a block is routed."""
        clock = Stopwatch()
        train, held = split_heldout(program.calibration.batches, self.search.heldout_fraction)
        ctx = RouterFit(program, router, masked_module(program, router, self.router.probes), train, held,
                        TeacherCache(program))
        records = collect(ctx.masked, router, program, train)
        stats["guide_loss"] = fit_guide(router, records, top, self.search.levels, self.router.guide_steps, self.seed)
        clock.lap("guide")

        score = held_out_scorer(ctx.masked, router, program, held, ctx.teacher)
        search = ScheduleSearch(score, lambda s: prune_flops(meta, seq, s)["pruned"], allowed, top,
                                self.search.levels, random.Random(self.seed))
        if self.schedule is not None:
            schedule = self._fixed_schedule(len(top))
        else:
            schedule = search_schedule(search, records, self.search, stats)
        clock.lap("search")

        schedule = self._distill_stage(ctx, search, schedule, stats)
        clock.lap("distill")
        stats["stage_seconds"] = clock.seconds
        return schedule

    def _fixed_schedule(self, num_blocks: int) -> list[float]:
        if len(self.schedule) != num_blocks:
            raise ConfigError(f"prune_tokens.schedule has {len(self.schedule)} entries; the model has {num_blocks} blocks")
        return [round(float(s) * SPARSITY_SCALE) / SPARSITY_SCALE for s in self.schedule]

    def _distill_stage(self, ctx: RouterFit, search: ScheduleSearch, schedule: list[float],
                       stats: dict[str, Any]) -> list[float]:
        """Distill the router end to end when some block is routed and the graph has gradients; else say why not."""
        losses: list[float] = []
        if not any(0 < s < 1 for s in schedule):
            stats["warnings"].append("the schedule drops whole blocks only: no router runs, distillation skipped")
        elif self.router.train_steps and not differentiable(ctx.program.module):
            stats["warnings"].append(
                "end-to-end distillation skipped: the graph holds fxpress ops without gradients (e.g. quantized "
                "linears); the router keeps its guide-loss fit. List prune_tokens before quantize to distill it.")
        else:
            guided = {k: v.clone() for k, v in ctx.router.state_dict().items()}
            before = search.score(schedule)
            losses = distill(ctx.masked, ctx.router, ctx.program, ctx.train, ctx.teacher, schedule, self.router,
                             self.progress)
            schedule = self._refine(search, schedule, before, guided, ctx.router, stats)
        stats["distill_loss_first"] = losses[0] if losses else None
        stats["distill_loss_last"] = losses[-1] if losses else None
        return schedule

    def _refine(self, search: ScheduleSearch, schedule: list[float], before: float, guided: dict,
                router: TokenRouter, stats: dict[str, Any]) -> list[float]:
        """Re-tune the schedule with the distilled router; keep distillation only if held-out KL improved."""
        after = search.score(schedule)
        refined, kl = schedule, after
        if self.schedule is None and self.search.refine_evals:
            best, kl = search.rescore_best(self.search.refine_evals)
            refined = search.fractions(best)
            stats["refine_kl_best"] = kl
        stats["distill_kl_before"], stats["distill_kl_after"] = before, after
        stats["distill_kept"] = kl <= before
        if kl > before:  # distillation did not pay on held-out text: back to the guide-fitted router
            router.load_state_dict(guided)
            return schedule
        return refined

    def _schedule_report(self, meta: dict[str, Any], seq: int, schedule: list[float], allowed: float) -> dict[str, Any]:
        flops = prune_flops(meta, seq)
        return {
            "blocks": len(schedule),
            "block_sparsity": [round(s, 3) for s in schedule],
            "dropped_blocks": [i for i, s in enumerate(schedule) if s >= 1.0],
            "routed_blocks": [i for i, s in enumerate(schedule) if 0 < s < 1.0],
            "mean_sparsity": sum(schedule) / len(schedule),
            f"flops_ratio@{seq}": flops["ratio"],
            f"flops_budget@{seq}": allowed / flops["dense"],
            "block_flops_saved": [round(x, 3) for x in flops["block_saved"]],
        }
