"""The per-block sparsity schedule search of `prune_tokens`: a genetic search on held-out KL under a FLOPs budget.

Per-block sparsity lies on a grid 0, 1/levels, ..., 1: 0 leaves a block alone and 1 drops it whole
(layer dropping is the limit case of token dropping: neither has a router), so ShortGPT's choice is
one of the seeds, next to uniform routing and the measured per-block drop sensitivity.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fxpress.passes.base import check_range
from fxpress.passes.prune_tokens.router import SPARSITY_SCALE

Schedule = tuple[int, ...]  # grid levels per block


@dataclass
class SearchSettings:
    """The schedule grid and how many held-out evaluations each search stage may spend."""

    levels: int = 8  # per-block sparsity grid 0, 1/levels, ..., 1
    max_block_sparsity: float = 1.0  # below 1.0 no block is dropped whole (pure token routing)
    sensitivity_probes: bool = True  # one held-out evaluation per block, dropped, to seed and steer the search
    search_evals: int = 40  # candidates scored by the search after its seeds (and the sensitivity probes)
    block_search_evals: int = 0  # > 0: first a whole-block-only search ({0, 1} per block) with this many
    # evaluations (the ablation "searched block pruning"); its best seeds the token search
    refine_evals: int = 8  # evaluations re-tuning the schedule after distillation
    heldout_fraction: float = 0.25  # last part of the calibration samples, used only to score schedules

    def validate(self, owner: str) -> None:
        check_range(owner, "search.levels", self.levels, 1, SPARSITY_SCALE)
        check_range(owner, "search.max_block_sparsity", self.max_block_sparsity, 0.01, 1.0)
        for name in ("search_evals", "block_search_evals", "refine_evals"):
            check_range(owner, f"search.{name}", getattr(self, name), 0, 100000)
        check_range(owner, "search.heldout_fraction", self.heldout_fraction, 0.0, 0.9)


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
    pool: dict[Schedule, float] = field(default_factory=dict)

    def fractions(self, sched: Schedule) -> list[float]:
        return [lv / self.levels for lv in sched]

    def feasible(self, sched) -> bool:
        return self.flops(self.fractions(sched)) <= self.allowed * (1 + 1e-9)

    def evaluate(self, sched: Schedule) -> float:
        """Held-out KL of a schedule; feasible ones join the pool the search breeds from."""
        if sched in self.pool:
            return self.pool[sched]
        kl = self.score(self.fractions(sched))
        if self.feasible(sched):
            self.pool[sched] = kl
        return kl

    def repair(self, sched) -> Schedule:
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

    def fill(self, order: list[int], level: int | None = None) -> Schedule:
        """Raise blocks in `order` to `level` (default their top) until the budget holds."""
        s = [0] * len(self.top)
        for i in order:
            if self.feasible(s):
                break
            s[i] = self.top[i] if level is None else min(level, self.top[i])
        return self.repair(s)

    def fill_mixed(self, order: list[int], drops: int, level: int) -> Schedule:
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

    def uniform(self) -> Schedule:
        for level in range(1, self.levels + 1):
            s = tuple(min(level, t) for t in self.top)
            if self.feasible(s):
                return self.repair(s)
        return self.repair(tuple(self.top))

    def child(self) -> Schedule:
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

    def run(self, seeds: list[Schedule], budget: int) -> tuple[Schedule, float]:
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

    def rescore_best(self, evals: int) -> tuple[Schedule, float]:
        """The scorer changed (a retrained router): re-score the four best schedules and search on from them."""
        ranked = sorted(self.pool, key=self.pool.__getitem__)[:4]
        self.pool = {}  # old scores are stale
        return self.run(ranked, len(ranked) + evals)


def block_influence(records) -> list[float]:
    """ShortGPT's Block Influence per block: 1 - mean cos(block input, block output) on calibration text."""
    return [float(1.0 - records[b]["cos"].mean()) for b in sorted(records)]


def _sensitivity_seeds(search: ScheduleSearch, stats: dict[str, Any]) -> tuple[dict[str, Schedule], list[int]]:
    """Drop each block alone to measure its held-out KL; seed drop orders by it and weight repair by its inverse."""
    n, levels = len(search.top), search.levels
    kl = []
    for b in range(n):
        probe = [0] * n
        probe[b] = search.top[b]
        kl.append(search.evaluate(tuple(probe)) if search.top[b] else math.inf)
    search.weights = [1.0 / max(k, 1e-6) if math.isfinite(k) else 0.0 for k in kl]
    order = sorted(range(n), key=kl.__getitem__)
    seeds = {"sensitivity": search.fill(order), "sensitivity_half": search.fill(order, max(1, levels // 2))}
    drops = sum(lv >= levels for lv in seeds["sensitivity"])
    for fewer in (1, 2, 3):  # fewer dropped blocks, the rest of the budget as light routing
        if drops - fewer >= 0:
            seeds[f"mixed_{drops - fewer}"] = search.fill_mixed(order, drops - fewer, max(1, levels // 4))
    stats["block_drop_kl"] = [round(k, 3) if math.isfinite(k) else None for k in kl]
    return seeds, order


def _block_only_seed(search: ScheduleSearch, orders: list[list[int]], evals: int, stats: dict[str, Any]) -> Schedule:
    """The best whole-block-only schedule (the searched-block-pruning ablation); its scores join the pool."""
    blocks_only = search.whole_blocks()
    drop_set, _ = blocks_only.run([blocks_only.fill(o) for o in orders], len(blocks_only.pool) + evals)
    search.pool.update({tuple(lv * search.levels for lv in s): v for s, v in blocks_only.pool.items()})
    stats["block_only_schedule"] = [float(lv) for lv in drop_set]
    stats["block_only_scored"] = len(blocks_only.pool)
    return tuple(lv * search.levels for lv in drop_set)


def search_schedule(search: ScheduleSearch, records, settings: SearchSettings, stats: dict[str, Any]) -> list[float]:
    """Seeds (uniform, ShortGPT, drop sensitivity, drops mixed with routing), optionally the best
    whole-block-only schedule, then the genetic search on held-out KL."""
    n = len(search.top)
    shortgpt_order = sorted(range(n), key=block_influence(records).__getitem__)
    seeds = {"uniform": search.uniform(), "shortgpt": search.fill(shortgpt_order)}
    orders = [shortgpt_order]
    if settings.sensitivity_probes:
        sensitivity, order = _sensitivity_seeds(search, stats)
        seeds.update(sensitivity)
        orders.append(order)
    if settings.block_search_evals and any(t >= search.levels for t in search.top):
        seeds["block_only"] = _block_only_seed(search, orders, settings.block_search_evals, stats)
    for name, s in seeds.items():
        stats[f"search_kl_{name}"] = search.evaluate(s)
    best, kl = search.run(list(seeds.values()), len(search.pool) + settings.search_evals)
    stats["search_kl_best"] = kl
    stats["search_scored"] = len(search.pool)
    return search.fractions(best)
