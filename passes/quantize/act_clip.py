"""The activation clip search: per `quantize_act`, the clip ratio that minimises its linears' output error."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from fxpress import distributed
from fxpress.calibration import program_inputs
from fxpress.execute import ChunkInputs, Executor
from fxpress.runtime import quant  # noqa: F401  (defines fxpress::quantize_act)

if TYPE_CHECKING:
    from fxpress.program import Program

QUANTIZE_ACT = torch.ops.fxpress.quantize_act.default
SEARCH_ROWS = 1024  # token rows per quantizer that score the clip ratios (the cost is rows x K^2 per ratio)


def search_act_clips(program: Program, clips: ClipChooser) -> dict[str, float]:
    """Per activation quantizer of `clips`, the clip ratio (from its top down to 0.5) that minimises the output
    error of the linears reading it, on the calibration set (this rank's chunks, errors summed over all ranks),
    earlier quantizers already at their choice, in a calibration run of its own. (With GPTQ the search rides on
    GPTQ's run instead: `gptq_runner.gptq_weights(..., clips=clips)`.)"""
    _ActClipSearch(program, clips).run(calibration_inputs(program), until=list(clips.nodes))
    return clips.apply(program)


def calibration_inputs(program: Program) -> list[tuple]:
    """This rank's calibration chunks as the graph's inputs."""
    calibration = program.calibration
    assert calibration is not None
    return [program_inputs(program, chunk) for chunk in distributed.shard(list(calibration.chunks()))]


def clip_grid(top: float) -> list[float]:
    """Candidate clip ratios: `top`, then down in steps of 0.05 to 0.5 (or just `top` when it is lower)."""
    return [top] + [r / 100 for r in range(95, 45, -5) if r / 100 < top - 1e-9]


def unimodal_argmin(size: int, errors: Callable[[list[int]], dict[int, float]]) -> int:
    """The index of the smallest error on a grid of `size` points whose error falls, then rises (clipping trades
    rounding error against clipping error): a golden-section search, then the last few points. 5-6 evaluations on
    the default 11-point grid (every other point then the best one's neighbours took 8); on SmolLM2's 120
    quantizers every curve was unimodal and both searches picked the exhaustive argmin. Ties go to the first index."""
    scored: dict[int, float] = {}

    def error(i: int) -> float:
        if i not in scored:
            scored.update(errors([i]))
        return scored[i]

    low, high = 0, size - 1
    while high - low > 2:
        step = round((high - low) * 0.382)
        left, right = low + step, max(high - step, low + step + 1)
        if error(left) > error(right):
            low = left + 1
        else:  # the minimum is left of `right`, or between the two when they tie
            high = right - 1 if error(left) < error(right) else right
    for i in range(low, high + 1):
        error(i)
    return min(sorted(scored), key=scored.__getitem__)


class ClipChooser:
    """The search's state, hooked into any calibration run (its own, or GPTQ's): at each searched quantize_act
    it adds up, from every chunk's input and per candidate clip ratio, the output error tr(E M E^T) of the
    linears reading it (E = quantized - x, M = sum of W^T W), sums the errors over ranks and keeps the best
    ratio; every chunk is then quantized with it, so later quantizers see earlier ones' choices."""

    def __init__(self, program: Program, act_nodes: list[Node], top: float):
        calibration = program.calibration
        assert calibration is not None
        self.nodes = set(act_nodes)
        self.grid = clip_grid(top)
        self.max_rows = -(-SEARCH_ROWS // sum(1 for _ in calibration.chunks()))
        self.chosen: dict[Node, float] = {}
        self.seconds = 0.0
        self.evaluations = 0  # clip ratios scored, over all quantizers

    def choose(self, node: Node, inputs: ChunkInputs, fetch: Callable[[Node], Any]) -> None:
        """Score the grid on every chunk's rows at once (one GEMM per ratio) and keep the best ratio."""
        start = time.perf_counter()
        # its readers are still aten.linear here: weights are quantized after (or, in GPTQ's run, right after) it
        output_error = _output_error([fetch(u.args[1]).detach().float() for u in node.users])
        bits, symmetric = node.args[1], node.args[3]
        sampled = [self._sampled(args[0]) for args, _ in inputs]
        rows = torch.cat(sampled) if sampled else None

        def errors(indices: list[int]) -> dict[int, float]:
            """The output error at these grid points, summed over ranks (every rank asks for the same points)."""
            if not indices:
                return {}
            self.evaluations += len(indices)
            local = torch.zeros(len(indices), dtype=torch.float64)
            if rows is not None:
                for j, i in enumerate(indices):
                    local[j] = output_error(QUANTIZE_ACT(rows, bits, self.grid[i], symmetric) - rows)
            return dict(zip(indices, distributed.all_reduce_sum(local).tolist()))

        self.chosen[node] = self.grid[unimodal_argmin(len(self.grid), errors)]
        self.seconds += time.perf_counter() - start

    def _sampled(self, x: torch.Tensor) -> torch.Tensor:
        """A chunk's token rows, evenly subsampled to `max_rows`: keeps the cost per chunk bounded."""
        rows = x.detach().float().reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_rows:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, self.max_rows, device=rows.device).long()]
        return rows

    def quantize(self, node: Node, args: tuple) -> torch.Tensor:
        """One chunk through the quantizer at its chosen ratio."""
        x, bits, _, symmetric = args
        return QUANTIZE_ACT(x, bits, self.chosen[node], symmetric)

    def apply(self, program: Program) -> dict[str, float]:
        """Write the chosen ratios into the graph; returns them by node name."""
        for node, best in self.chosen.items():
            node.args = (node.args[0], node.args[1], best, node.args[3])
        program.module.recompile()
        return {node.name: best for node, best in self.chosen.items()}


class _ActClipSearch(Executor):
    """A calibration run of its own for the search (weights not quantized with GPTQ): takes over the quantizers."""

    def __init__(self, program: Program, clips: ClipChooser):
        super().__init__(program.module, device=program.device, activation_budget=program.activation_budget)
        self.clips = clips
        self.hooked = clips.nodes

    def prepare(self, node: Node, inputs: ChunkInputs) -> None:
        self.clips.choose(node, inputs, self.fetch)

    def call(self, node: Node, index: int, args: tuple, kwargs: dict) -> Any:
        return self.clips.quantize(node, args)


def _output_error(weights: list[torch.Tensor]) -> Callable[[torch.Tensor], float]:
    """e -> sum over the readers W of ||e W^T||^2 = tr(e M e^T) with M = sum W^T W, by the cheaper product:
    through M (K x K) when the readers' outputs are more than K (q/k/v, gate/up), else through the weights
    (down_proj: 576 outputs for K = 1536, 2.7x fewer flops)."""
    if sum(w.shape[0] for w in weights) >= weights[0].shape[1]:
        mat = sum(w.T @ w for w in weights)
        return lambda e: float(((e @ mat) * e).sum(dtype=torch.float64))
    return lambda e: sum(float((e @ w.T).square().sum(dtype=torch.float64)) for w in weights)
