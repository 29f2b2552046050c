"""From a layer's output error to the model's: what quantizing one expert projection, one whole layer, or a
whole plan costs at the model output, measured by running the program with the quantized matrices swapped in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fxpress.calibration import program_inputs
from fxpress.errors import ConfigError
from fxpress.graph import ExpertLayer
from fxpress.passes.quantize_experts.analysis import (
    LayerAnalysis,
    expert_functions,
    proj_name,
    quantize_matrix,
    with_prior,
)
from fxpress.passes.quantize_experts.stored import expert_uses, replaced_experts, swapped_params

if TYPE_CHECKING:
    from fxpress.program import Program


# --- from layer output error to model output error --------------------------------------------------
def _logits(program: Program, batch: torch.Tensor) -> torch.Tensor:
    out = program.run(*program_inputs(program, batch))
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p = F.log_softmax(ref.reshape(-1, ref.shape[-1]), -1)
    q = F.log_softmax(test.reshape(-1, test.shape[-1]), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _quantized_layer(gm: torch.fx.GraphModule, layer: ExpertLayer, bits: int, group_size: int
                     ) -> dict[str, torch.Tensor]:
    """Every routed expert weight of `layer` replaced by its RTN version (new tensors by attribute target)."""
    fns = expert_functions(gm, layer)
    changes = {(e, proj_name(use)): quantize_matrix(fns[e].weights[proj_name(use)], bits, group_size).dequantize()
               for e, use in expert_uses(layer)}
    return replaced_experts(gm, layer, changes, proj_name)


def layer_significance(program: Program, layers: list[ExpertLayer], analyses: list[LayerAnalysis],
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
        for layer, a in zip(layers, analyses):
            with swapped_params(gm, _quantized_layer(gm, layer, bits, group_size)):
                kl = sum(_kl(r, _logits(program, b)) for r, b in zip(ref, samples.split(4))) / len(ref)
            predicted = sum(v[bits] for v in a.sensitivity.values())
            a.significance = kl / predicted if predicted > 0 else 1.0
            factors.append(a.significance)
    return factors


# --- stage 2, end to end: what quantizing one expert projection costs at the model output -----------
def swapped_weight(gm: torch.fx.GraphModule, layer: ExpertLayer, e: int, proj: str, weight: torch.Tensor
                   ) -> AbstractContextManager[None]:
    """Expert `e`'s projection `proj` holds `weight` ([out, in]) in the graph while the block runs."""
    return swapped_params(gm, replaced_experts(gm, layer, {(e, proj): weight}, proj_name))


def _divergence(causal_lm: bool, ref: torch.Tensor, out: torch.Tensor) -> float:
    """Summed per-position KL(ref || out) of next-token distributions (LMs), else summed squared error."""
    if causal_lm:
        p = F.log_softmax(ref.double(), -1)
        q = F.log_softmax(out.double(), -1)
        return float((p.exp() * (p - q)).sum())
    return float((out.double() - ref.double()).square().sum())


def model_sensitivity(program: Program, layers: list[ExpertLayer], analyses: list[LayerAnalysis], samples: torch.Tensor,
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
    def values() -> Iterator[tuple[str, torch.Tensor]]:  # one layer's tensors at a time
        for layer, a in zip(layers, analyses):
            changes = {}
            for e, proj in a.sensitivity:
                qw = a.quantized.get((e, proj, bits[(a.layer, e, proj)]))
                if qw is None:
                    raise ConfigError("planned_weights needs the quantized matrices: run analyse_layer with "
                                      "keep_quantized=True")
                changes[(e, proj)] = qw.dequantize()
            yield from replaced_experts(gm, layer, changes, proj_name).items()

    with swapped_params(gm, values()):
        yield


def program_loss(program: Program, samples: torch.Tensor, reference: list[torch.Tensor] | None = None,
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
