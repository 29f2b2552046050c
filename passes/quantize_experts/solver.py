"""The bit allocation: an exact multiple-choice knapsack, a trust-region family of plans, and the measured choice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fxpress.calibration import program_inputs
from fxpress.errors import ConfigError
from fxpress.graph import ExpertLayer
from fxpress.passes.quantize_experts.analysis import MoEAnalysis
from fxpress.passes.quantize_experts.config import ExpertBudget
from fxpress.passes.quantize_experts.sensitivity import planned_weights, program_loss

if TYPE_CHECKING:
    from fxpress.program import Program


# --- allocation: exact multiple-choice knapsack ----------------------------------------------------
@dataclass
class Item:
    """One thing that gets a bit width: (layer, expert, projection); cost per bit and error per choice."""

    key: tuple
    numel: int
    errors: dict[int, float]


def solve_allocation(items: list[Item], avg_bits: float) -> dict[tuple, int]:
    """Bits per item minimising the summed error with sum(numel*bits) <= avg_bits * sum(numel). Exact.

    Multiple-choice knapsack by dynamic programming over the budget in units of gcd(numel), so
    every cost is an integer and the optimum is exact (ties go to the fewest bits used).
    """
    if not items:
        return {}
    unit = reduce(math.gcd, [it.numel for it in items])
    sizes = [it.numel // unit for it in items]
    capacity = int(math.floor(avg_bits * sum(sizes) + 1e-9))
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = np.full((len(items), capacity + 1), -1, dtype=np.int16)
    for i, (it, size) in enumerate(zip(items, sizes)):
        new = np.full(capacity + 1, np.inf)
        for bits in sorted(it.errors):
            cost = size * bits
            if cost > capacity:
                continue
            cand = best[: capacity + 1 - cost] + it.errors[bits]
            better = cand < new[cost:]
            new[cost:][better] = cand[better]
            picks[i, cost:][better] = bits
        best = new
    if not np.isfinite(best).any():
        low = min(min(it.errors) for it in items)
        raise ConfigError(f"an average of {avg_bits} bits is below the smallest bit choice ({low}): raise avg_bits")
    c = int(np.argmin(best))  # first minimum: the cheapest among equal errors
    plan: dict[tuple, int] = {}
    for i in range(len(items) - 1, -1, -1):
        bits = int(picks[i, c])
        plan[items[i].key] = bits
        c -= sizes[i] * bits
    return plan


def trust_region_items(items: list[Item], avg_bits: float, mu: float) -> list[Item]:
    """Items whose error also pays `mu` x (mean predicted error per parameter) per parameter and bit away from avg_bits.

    mu = 0 is the plain knapsack; a larger mu keeps the plan closer to uniform bits. The predicted
    (additive, second-order) error is most wrong for plans that move many weights far from the average,
    so a family over mu, each member measured, guards against trusting it too far.
    """
    if mu == 0:
        return items
    ref = min(items[0].errors, key=lambda b: (abs(b - avg_bits), b))
    scale = sum(it.errors[ref] for it in items) / max(1, sum(it.numel for it in items))
    return [Item(it.key, it.numel, {b: v + mu * scale * it.numel * abs(b - avg_bits) for b, v in it.errors.items()})
            for it in items]


def average_bits(items: list[Item], plan: dict[tuple, int]) -> float:
    total = sum(it.numel for it in items)
    return sum(it.numel * plan[it.key] for it in items) / max(1, total)


def allocation_items(analysis: MoEAnalysis, allocation: str, granularity: str) -> list[Item]:
    """Items and their predicted errors for one allocation rule (see the module docstring)."""
    items = []
    for a in analysis.layers:
        for e in range(a.num_experts):
            groups = [[p] for p in a.projections] if granularity == "projection" else [a.projections]
            for projs in groups:
                errors = {}
                for bits in analysis.bit_choices:
                    if allocation == "moqa" and a.model_kl is not None:
                        errors[bits] = sum(a.model_kl[(e, p)][bits] for p in projs)
                    elif allocation == "moqa":
                        errors[bits] = a.significance * sum(a.sensitivity[(e, p)][bits] for p in projs)
                    elif allocation == "frequency":
                        errors[bits] = a.share[e] * sum(a.weight_error[(e, p)][bits] for p in projs)
                    else:
                        errors[bits] = sum(a.weight_error[(e, p)][bits] for p in projs)
                key = (a.layer, e, "+".join(projs))
                items.append(Item(key, sum(a.numel[p] for p in projs), errors))
    return items


def bits_per_projection(plan: dict[tuple, int]) -> dict[tuple[int, int, str], int]:
    """A plan's items ((layer, expert, "gate_proj+up_proj"), ...) spread to one entry per projection."""
    out = {}
    for (layer, e, projs), b in plan.items():
        for p in projs.split("+"):
            out[(layer, e, p)] = b
    return out


def select_plan(program: Program, layers: list[ExpertLayer], analysis: MoEAnalysis, items: list[Item],
                budget: ExpertBudget, samples: torch.Tensor) -> tuple[dict[tuple, int], list[dict[str, Any]]]:
    """One knapsack plan per trust-region penalty, each measured whole on `samples`; the lowest loss wins.

    The measured loss (next-token NLL for causal LMs) includes what the additive prediction leaves out:
    errors of different projections interacting, and how the text's own loss, not only the KL, moves.
    Ties go to the smaller penalty (the order of `trust_region`, sorted).
    """
    reference = None
    if not program.is_causal_lm:
        reference = [program.run(*program_inputs(program, b)) for b in samples.split(16)]
        reference = [(r[0] if isinstance(r, (tuple, list)) else r).detach() for r in reference]
    seen: dict[tuple, dict[str, Any]] = {}
    best = None
    for mu in sorted(set(budget.trust_region)):
        plan = solve_allocation(trust_region_items(items, budget.avg_bits, mu), budget.avg_bits)
        key = tuple(sorted(plan.items()))
        if key not in seen:
            with planned_weights(program.module, layers, analysis.layers, bits_per_projection(plan)):
                loss = program_loss(program, samples, reference)
            seen[key] = {"mu": [], "loss": loss, "predicted_error": sum(it.errors[plan[it.key]] for it in items),
                         "mean_abs_deviation": sum(it.numel * abs(plan[it.key] - budget.avg_bits) for it in items)
                         / max(1, sum(it.numel for it in items))}
            if best is None or loss < best[0]:
                best = (loss, plan, key)
        seen[key]["mu"].append(mu)
    for key, c in seen.items():
        c["chosen"] = key == best[2]  # exactly one, even when two plans measure the same loss
    return best[1], list(seen.values())
