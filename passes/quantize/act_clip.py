"""The activation clip search: per `quantize_act`, the clip ratio that minimises its linears' output error."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from fxpress import graph as G
from fxpress.calibration import program_inputs
from fxpress.runtime import quant  # noqa: F401  (defines fxpress::quantize_act)

if TYPE_CHECKING:
    from fxpress.program import Program

QUANTIZE_ACT = torch.ops.fxpress.quantize_act.default
SEARCH_ROWS = 1024  # token rows per quantizer that score the clip ratios (the cost is rows x K^2 per ratio)


def search_act_clips(program: Program, act_nodes: list[Node], top: float) -> dict[str, float]:
    """Per activation quantizer, the clip ratio (from `top` down to 0.5) that minimises the output error of
    the linears reading it, on the calibration set, earlier quantizers already at their choice."""
    gm = program.module
    mats: dict[Node, torch.Tensor] = {}
    for node in act_nodes:  # its readers are still aten.linear here: weights are quantized after the search
        weights = [G.get_param(gm, u.args[1]).detach().float() for u in node.users]
        mats[node] = sum(w.T @ w for w in weights)
    grid = clip_grid(top)
    batches = program.calibration.batches.split(16)
    searcher = _ActClipSearch(gm, mats, grid, max_rows=-(-SEARCH_ROWS // len(batches)))
    with torch.no_grad():
        for batch in batches:
            searcher.run(*program_inputs(program, batch))
    chosen = {}
    for node, errors in searcher.errors.items():
        best = grid[int(torch.tensor(errors).argmin())]
        node.args = (node.args[0], node.args[1], best, node.args[3])
        chosen[node.name] = best
    gm.recompile()
    return chosen


def clip_grid(top: float) -> list[float]:
    """Candidate clip ratios: `top`, then down in steps of 0.05 to 0.5 (or just `top` when it is lower)."""
    return [top] + [r / 100 for r in range(95, 45, -5) if r / 100 < top - 1e-9]


class _ActClipSearch(torch.fx.Interpreter):
    """Runs calibration batches; at each searched quantize_act it adds up, per candidate clip ratio, the
    output error tr(E M E^T) of the linears reading it (E = quantized - x, M = sum of W^T W), then
    continues with the best ratio so far, so later quantizers see earlier ones' choices."""

    def __init__(self, gm: GraphModule, mats: dict[Node, torch.Tensor], grid: list[float], max_rows: int = SEARCH_ROWS):
        super().__init__(gm)
        self.mats, self.grid, self.max_rows = mats, grid, max_rows
        self.errors: dict[Node, list[float]] = {node: [0.0] * len(grid) for node in mats}

    def run_node(self, n: Node) -> Any:
        if n not in self.mats:
            return super().run_node(n)
        x, bits, _, symmetric = self.fetch_args_kwargs_from_env(n)[0]
        rows = x.detach().float().reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_rows:  # an even subsample keeps the cost per batch bounded
            rows = rows[torch.linspace(0, rows.shape[0] - 1, self.max_rows).long()]
        errors = self.errors[n]
        for i, ratio in enumerate(self.grid):
            e = QUANTIZE_ACT(rows, bits, ratio, symmetric) - rows
            errors[i] += float(((e @ self.mats[n]) * e).sum())
        best = self.grid[min(range(len(self.grid)), key=errors.__getitem__)]
        return QUANTIZE_ACT(x, bits, best, symmetric)
