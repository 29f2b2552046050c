"""QuantizeExperts' configuration: the bit budget and how it is spent, the stored weights, the analysis."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxpress.errors import ConfigError
from fxpress.passes.base import check_choice, check_range

NAME = "quantize_experts"


@dataclass
class ExpertBudget:
    """`avg_bits` over the routed experts' weights, spent on `bit_choices` by the `allocation` rule.

    `allocation`: "moqa" (the analysis' sensitivity), "frequency" (activation frequency x weight error) or
    "uniform"; `granularity`: "projection" (gate/up and down get their own bits) or "expert" (one width per
    expert); `trust_region`: penalties mu, one knapsack plan each, for bits away from `avg_bits`;
    `selection_samples`: the last that many calibration samples are held out and each candidate plan is
    measured whole on them (0: measured on the analysis' own samples).
    """

    avg_bits: float = 3.0
    bit_choices: tuple[int, ...] = (2, 3, 4)
    allocation: str = "moqa"
    granularity: str = "projection"
    trust_region: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    selection_samples: int = 0

    def validate(self) -> None:
        choices = tuple(self.bit_choices)
        if not choices or any(not isinstance(b, int) or not 1 <= b <= 8 for b in choices) or len(set(choices)) != len(choices):
            raise ConfigError(f"{NAME}.budget.bit_choices = {self.bit_choices!r}: give distinct integers in 1..8, e.g. (2, 3, 4)")
        check_range(NAME, "budget.avg_bits", self.avg_bits, min(choices), max(choices))
        check_choice(NAME, "budget.allocation", self.allocation, ("moqa", "frequency", "uniform"))
        check_choice(NAME, "budget.granularity", self.granularity, ("projection", "expert"))
        mus = tuple(self.trust_region)
        if not mus or any(not isinstance(m, (int, float)) or m < 0 or not math.isfinite(m) for m in mus):
            raise ConfigError(f"{NAME}.budget.trust_region = {self.trust_region!r}: give one or more finite "
                              "penalties >= 0, e.g. (0.0, 0.5, 1.0); (0.0,) is the plain knapsack")
        check_range(NAME, "budget.selection_samples", self.selection_samples, 0, 1 << 20)


@dataclass
class ExpertWeights:
    """How expert matrices are stored: `group_size` columns per scale, "rtn" or "gptq" (each expert's
    routing-weighted Hessian); shared experts get `shared_bits` (None: full precision)."""

    group_size: int = 64
    method: str = "rtn"
    shared_bits: int | None = 8

    def validate(self) -> None:
        gs = self.group_size
        if not (gs == -1 or (isinstance(gs, int) and gs >= 8 and gs % 8 == 0)):
            raise ConfigError(f"{NAME}.weights.group_size = {gs!r}: use -1 (per channel) or a multiple of 8 (e.g. 64)")
        check_choice(NAME, "weights.method", self.method, ("rtn", "gptq"))
        if self.shared_bits is not None:
            check_range(NAME, "weights.shared_bits", self.shared_bits, 2, 8)


@dataclass
class ExpertAnalysis:
    """How each expert projection's sensitivity is measured on the calibration set.

    `sensitivity`: "fisher" (the model's output KL to second order from `fisher_samples` sampled-label
    gradients per routed row), "loss" (the same plus the text's own first-order term), "kl" (measured
    exactly, one forward per projection and bit width: slow) or "output" (routed MoE output error);
    `layer_calibration` rescales each layer's errors by a measured end-to-end KL; experts with fewer than
    `min_rows` routed rows get tokens routed to them on purpose, and every expert is assumed to see
    `prior_rows` more; `calib_samples` limits the samples analysed (None: all).
    """

    sensitivity: str = "fisher"
    fisher_samples: int = 8
    layer_calibration: bool = False
    min_rows: int = 32
    prior_rows: float = 2.0
    calib_samples: int | None = None

    def validate(self) -> None:
        check_choice(NAME, "analysis.sensitivity", self.sensitivity, ("fisher", "loss", "kl", "output"))
        check_range(NAME, "analysis.fisher_samples", self.fisher_samples, 1, 256)
        check_range(NAME, "analysis.min_rows", self.min_rows, 1, 1 << 20)


# Version 3 recipes held 16 fields flat; version 4 groups them (each keeps its name). Old name -> (group, name).
V3_FIELDS: dict[str, tuple[str, str]] = {
    name: (group, name)
    for group, names in (
        ("budget", ("avg_bits", "bit_choices", "allocation", "granularity", "trust_region", "selection_samples")),
        ("weights", ("group_size", "method", "shared_bits")),
        ("analysis", ("sensitivity", "fisher_samples", "layer_calibration", "min_rows", "prior_rows", "calib_samples")),
    )
    for name in names
}
