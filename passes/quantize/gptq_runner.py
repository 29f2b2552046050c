"""GPTQ over a whole graph: each group of linears is quantized when the calibration run reaches it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from fxpress import graph as G
from fxpress.calibration import program_inputs
from fxpress.passes.quantize.config import WeightQuant
from fxpress.passes.quantize.gptq import QuantizedWeight, WeightSpec, gptq, hessian, rtn

if TYPE_CHECKING:
    from fxpress.program import Program


def weight_spec(weights: WeightQuant) -> WeightSpec:
    return WeightSpec(weights.bits or 8, weights.group_size, weights.symmetric, weights.clip_search)


def gptq_weights(program: Program, targets: list[G.LinearUse], weights: WeightQuant
                 ) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """Run the calibration set through the graph once; each group of linears that read the same
    input is quantized when the run reaches it, so later layers see earlier layers' quantized outputs."""
    samples = program.calibration.batches
    runner = _GPTQRunner(program.module, targets, weights)
    with torch.no_grad():
        try:
            runner.run(*program_inputs(program, samples))
        except _Done:
            pass
    stats = {"calibration_samples": int(samples.shape[0]), "calibration_tokens": int(samples.numel()),
             "gptq_groups": runner.groups_done, "warnings": runner.warnings}
    return runner.results, stats


class _Done(Exception):
    """Raised by the GPTQ runner after the last quantized linear: the rest of the graph is not needed."""


class _GPTQRunner(torch.fx.Interpreter):
    """Interprets the graph on the calibration set; at each group of linears sharing an input it builds
    the Hessian from that input, quantizes the group's weights together (one GPTQ over stacked rows,
    they share H) and continues with the dequantized weights."""

    def __init__(self, gm: GraphModule, targets: list[G.LinearUse], weights: WeightQuant):
        super().__init__(gm)
        self.config = weights
        self.by_node = {u.node: u for u in targets}
        self.groups: dict[Node, list[G.LinearUse]] = {}
        for u in targets:
            self.groups.setdefault(u.node.args[0], []).append(u)
        self.last = targets[-1].node if targets else None
        self.results: dict[str, QuantizedWeight] = {}
        self.dequantized: dict[str, torch.Tensor] = {}
        self.warnings: list[str] = []
        self.groups_done = 0
        self.bar = tqdm(total=len(self.groups), desc="gptq", leave=False)

    def run_node(self, n: Node) -> Any:
        use = self.by_node.get(n)
        if use is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        if use.name not in self.results:
            self._quantize_group(self.groups[n.args[0]], x)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = F.linear(x, self.dequantized[use.name].to(x.dtype), bias)
        if n is self.last:
            self.bar.close()
            raise _Done
        return out

    def _quantize_group(self, group: list[G.LinearUse], x: torch.Tensor) -> None:
        names, weights = [], []
        for u in group:
            if u.name not in names and u.name not in self.results:
                names.append(u.name)
                weights.append(G.get_param(self.module, u.weight).detach().float())
        h, tokens = hessian(x)
        spec = weight_spec(self.config)
        if tokens == 0:
            self.warnings.append(f"{', '.join(names)}: no calibration tokens reached these linears; used RTN")
            quantized = [rtn(w, spec) for w in weights]
        else:
            stacked = gptq(torch.cat(weights), h, spec, act_order=self.config.act_order, damp=self.config.damp,
                           name=", ".join(names))
            quantized = _split_rows(stacked, [w.shape[0] for w in weights])
        for name, qw in zip(names, quantized):
            self.results[name] = qw
            self.dequantized[name] = qw.dequantize()
        self.groups_done += 1
        self.bar.update(1)


def _split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """Undo the row stacking of weights that shared one GPTQ run."""
    out = []
    for codes, scales, zeros in zip(qw.codes.split(rows), qw.scales.split(rows), qw.zeros.split(rows)):
        out.append(QuantizedWeight(codes.contiguous(), scales.contiguous(), zeros.contiguous(), qw.spec, qw.block_size))
    return out
