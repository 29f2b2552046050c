"""Mixed-precision activations: under an average-bits budget, the quantizers whose low-bit error costs the model's
loss most go to more bits.

At 4 bits a few activation quantizers (on SmolLM2 the gate/up inputs above all) carry most of the loss. A
quantizer's own output error does not say how much the loss feels it (an error in o_proj's input costs less than
the same relative error in gate_proj's), so the cost is measured in the loss's units: one forward and backward
pass of the low-bit graph (straight-through rounding) on a few calibration windows gives the loss's gradient g at
each quantizer's input, and the expected loss increase of an error e is estimated by the empirical Fisher, 1/2 sum
over tokens (g . e)^2 (HAWQ-style). The quantizers with the most loss saved per extra bit-element go up until the budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.fx import Interpreter, Node

from fxpress import distributed
from fxpress.calibration import program_inputs
from fxpress.errors import ConfigError
from fxpress.passes.quantize.act_clip import QUANTIZE_ACT, clip_grid
from fxpress.passes.quantize.config import ActQuant
from fxpress.runtime.quant import QuantSpec, fake_quant_ste

if TYPE_CHECKING:
    from fxpress.program import Program

SENSITIVITY_WINDOWS = 16  # calibration windows (spread over the set) whose gradients score the quantizers
WINDOWS_PER_PASS = 4  # windows per forward/backward pass: bounds the memory autograd keeps


@dataclass
class Sensitivity:
    """One quantizer's estimated loss increase at the low and the high bits, and its width (elements per token)."""

    low_error: float
    high_error: float
    width: int

    def gain_per_bit(self, extra_bits: int) -> float:
        """Loss saved per extra bit and element: the greedy allocation's order."""
        return (self.low_error - self.high_error) / (extra_bits * self.width)


def check_mixed_precision(program: Program) -> None:
    """The measurement differentiates the graph: it needs a causal LM with its weights in memory."""
    if program.weights is not None:
        raise ConfigError("quantize.activations.avg_bits measures each quantizer with a backward pass through the graph "
                          "and needs the weights in memory; this program's weights are store-backed: set avg_bits=None")
    if not program.is_causal_lm:
        raise ConfigError("quantize.activations.avg_bits scores quantizers by the next-token loss: it needs a causal LM; "
                          "set avg_bits=None for this model")


def allocate_act_bits(program: Program, act_nodes: list[Node], acts: ActQuant) -> dict[str, Any]:
    """Score every quantizer, raise the most sensitive ones from `acts.bits` to `acts.high_bits` while the
    width-weighted average stays within `acts.avg_bits`, and write the bits into the graph."""
    low, high = acts.bits, acts.high_bits
    assert low is not None and acts.avg_bits is not None
    ratios = clip_grid(acts.clip_ratio) if acts.clip_search else [acts.clip_ratio]
    sensitivity = measure_sensitivity(program, act_nodes, low, high, ratios)
    raised = choose_raised(sensitivity, low, high, acts.avg_bits)
    for node in raised:
        node.args = (node.args[0], high, *node.args[2:])
    program.module.recompile()
    widths = {node: s.width for node, s in sensitivity.items()}
    average = sum((high if n in raised else low) * w for n, w in widths.items()) / max(sum(widths.values()), 1)
    return {"raised": sorted(n.name for n in raised), "average_bits": round(average, 4),
            "loss_increase_low": {n.name: float(f"{s.low_error:.4g}") for n, s in sensitivity.items()}}


def choose_raised(sensitivity: dict[Node, Sensitivity], low: int, high: int, avg_bits: float) -> set[Node]:
    """Greedy knapsack: by loss saved per extra bit-element, the quantizers that still fit in the budget."""
    total_width = sum(s.width for s in sensitivity.values())
    spare = (avg_bits - low) * total_width + 1e-9  # extra bit-elements the budget allows
    raised: set[Node] = set()
    ranked = sorted(sensitivity, key=lambda n: sensitivity[n].gain_per_bit(high - low), reverse=True)
    for node in ranked:
        cost = (high - low) * sensitivity[node].width
        if cost <= spare and sensitivity[node].low_error > sensitivity[node].high_error:
            raised.add(node)
            spare -= cost
    return raised


def measure_sensitivity(program: Program, act_nodes: list[Node], low: int, high: int,
                        ratios: list[float]) -> dict[Node, Sensitivity]:
    """Per quantizer, 1/2 sum over tokens of (g . e)^2 for its error e at `low` bits (at the best of `ratios`) and at
    `high` bits (at the first ratio), g the gradient of the low-bit graph's summed next-token loss at its input; on
    this rank's share of SENSITIVITY_WINDOWS calibration windows, summed over ranks."""
    calibration = program.calibration
    assert calibration is not None
    count = min(SENSITIVITY_WINDOWS, calibration.batches.shape[0])
    spread = calibration.batches[torch.linspace(0, calibration.batches.shape[0] - 1, count).long()]
    # per quantizer: the Fisher score at each low-bit ratio, then at the high bits
    scores = torch.zeros(len(act_nodes), len(ratios) + 1, dtype=torch.float64)
    index = {node: i for i, node in enumerate(act_nodes)}
    for windows in distributed.shard(list(spread.split(WINDOWS_PER_PASS))):
        for node, x, grad in _input_gradients(program, windows, set(act_nodes), low):
            for j, bits_ratio in enumerate([(low, r) for r in ratios] + [(high, ratios[0])]):
                error = QUANTIZE_ACT(x, *bits_ratio, node.args[3]) - x
                scores[index[node], j] += 0.5 * float((grad * error).sum(-1).square().sum(dtype=torch.float64))
    scores = distributed.all_reduce_sum(scores)
    return {node: Sensitivity(float(scores[i, :-1].min()), float(scores[i, -1]), _width(node))
            for node, i in index.items()}


def _width(node: Node) -> int:
    return int(node.args[0].meta["val"].shape[-1])


def _input_gradients(program: Program, windows: torch.Tensor, nodes: set[Node], low: int) -> list[tuple[Node, torch.Tensor, torch.Tensor]]:
    """(node, input, gradient of the summed next-token loss at that input) for each quantizer in `nodes`, from one
    forward and backward pass of the graph with every quantize_act at its bits (`nodes` at `low`), rounding
    straight-through; it runs where the module's weights are."""
    tap = _GradientTap(program.module, nodes, low)
    codegen = program.module.graph._codegen
    inputs = codegen.process_inputs(*program_inputs(program, windows))
    frozen = [p for p in program.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = codegen.process_outputs(tap.run(*inputs))[0]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1),
                                   reduction="sum")
            loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return [(node, x, probe.grad.reshape(-1, x.shape[-1])) for node, (x, probe) in tap.taps.items()]


class _GradientTap(Interpreter):
    """Runs the graph with straight-through fake quantizers; each of `nodes` adds a zero leaf to its output, whose
    gradient is the loss's gradient there, and keeps its input (detached, one row per token)."""

    def __init__(self, module: torch.nn.Module, nodes: set[Node], low: int):
        super().__init__(module)
        self.nodes, self.low = nodes, low
        self.taps: dict[Node, tuple[torch.Tensor, torch.Tensor]] = {}

    def run_node(self, n: Node) -> Any:
        if n.op != "call_function" or n.target is not QUANTIZE_ACT:
            return super().run_node(n)
        x = self.env[n.args[0]]
        bits, ratio, symmetric = n.args[1:4]
        quantized = fake_quant_ste(x, QuantSpec(self.low if n in self.nodes else bits, ratio, symmetric))
        if n not in self.nodes:
            return quantized
        probe = torch.zeros_like(x, requires_grad=True)
        self.taps[n] = (x.detach().reshape(-1, x.shape[-1]), probe)
        return quantized + probe
