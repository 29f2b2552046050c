"""GPTQ over a whole graph: each group of linears is quantized when the calibration run reaches it.

The run is `fxpress.execute`'s node-major one: at the first linear of a group (linears reading the same
input) every calibration chunk's input is there, so the group's Hessian is summed over all chunks (and
all ranks), the group is quantized, and then every chunk continues with the dequantized weights, so
later layers see earlier layers' quantized outputs (sequential calibration). The run stops after the
last quantized linear. An activation clip search (`act_clip.ClipChooser`) can ride on the same run: each
quantizer's ratio is chosen when the run reaches it, from inputs that earlier GPTQ groups already shaped, so
the calibration set goes through the model once for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from tqdm.auto import tqdm

from fxpress import distributed
from fxpress import graph as G
from fxpress.execute import ChunkInputs, Executor
from fxpress.passes.quantize.act_clip import QUANTIZE_ACT, ClipChooser, calibration_inputs
from fxpress.passes.quantize.config import WeightQuant
from fxpress.passes.quantize.gptq import (
    QuantizedWeight,
    WeightSpec,
    cross_statistic,
    float_input_target,
    gptq,
    gram,
    rtn,
)

if TYPE_CHECKING:
    from fxpress.program import Program


def weight_spec(weights: WeightQuant) -> WeightSpec:
    return WeightSpec(weights.bits or 8, weights.group_size, weights.symmetric, weights.clip_search)


def gptq_weights(program: Program, targets: list[G.LinearUse], weights: WeightQuant, clips: ClipChooser | None = None
                 ) -> tuple[dict[str, QuantizedWeight] | ParkedWeights, dict[str, Any]]:
    """Run the calibration set through the graph once (this rank's share of its chunks); each group of
    linears that read the same input is quantized when the run reaches it, so later layers see earlier
    layers' quantized outputs. Every rank gets the same weights: the Hessians are all-reduced. With `clips`,
    the activation quantizers' clip ratios are searched in the same run (the caller applies them)."""
    calibration = program.calibration
    assert calibration is not None
    runner = _GPTQRunner(program, targets, weights, clips)
    runner.run(calibration_inputs(program), until=[u.node for u in targets])
    runner.bar.close()
    samples = calibration.batches
    stats = {"calibration_samples": int(samples.shape[0]), "calibration_tokens": int(samples.numel()),
             "gptq_groups": runner.groups_done, "warnings": runner.warnings}
    return runner.results, stats


def chunk_hessian(inputs: ChunkInputs, width: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(2/n) X^T X over the first argument of every chunk and every rank, and n (0 gives a zero matrix).

    Each chunk's X^T X is computed in float32 (as `gptq.hessian` does) and summed in float64, so the
    total does not depend on how chunks are spread over ranks; then it is all-reduced with the row count.
    """
    total = torch.zeros(width, width, dtype=torch.float64, device=device)
    rows = 0
    for args, _ in inputs:
        x = args[0].detach().reshape(-1, width).float()
        total.add_(gram(x))  # promoted to float64 element by element: no float64 copy of the product
        rows += x.shape[0]
    distributed.all_reduce_sum(total)
    count = int(distributed.all_reduce_sum(torch.tensor([rows], dtype=torch.int64)).item())
    return (total * (2.0 / count) if count else total), count


class _GPTQRunner(Executor):
    """Takes over the target linears: the first of each group quantizes the group from every chunk's input
    (one GPTQ over the stacked rows: they share H); each chunk's output uses the dequantized weights.
    The quantizers of `clips`, if given, are taken over too: their ratios are chosen as the run reaches them."""

    def __init__(self, program: Program, targets: list[G.LinearUse], weights: WeightQuant,
                 clips: ClipChooser | None = None):
        super().__init__(program.module, device=program.device, activation_budget=program.activation_budget)
        self.config = weights
        self.by_node = {u.node: u for u in targets}
        self.clips = clips
        self.groups: dict[Node, list[G.LinearUse]] = {}
        for u in targets:
            self.groups.setdefault(u.node.args[0], []).append(u)
        # with correct_act_error: X^T X~ across each group's activation quantizer, summed as the run passes it
        self.cross: dict[Node, torch.Tensor] = {}
        self.corrected = {x for x in self.groups if weights.correct_act_error and x.target == QUANTIZE_ACT}
        self.hooked = set(self.by_node) | (clips.nodes if clips else set()) | self.corrected
        store = program.weights
        self.results: dict[str, QuantizedWeight] | ParkedWeights = {} if store is None else ParkedWeights(store)
        self.dequantized: dict[str, torch.Tensor] = {}  # kept from a group's quantization to its weight's last use
        self.uses_left: dict[str, int] = {}
        for u in targets:
            self.uses_left[u.name] = self.uses_left.get(u.name, 0) + 1
        self.warnings: list[str] = []
        self.groups_done = 0
        self.bar = tqdm(total=len(self.groups), desc="gptq", leave=False, disable=not distributed.is_main())

    def prepare(self, node: Node, inputs: ChunkInputs) -> None:
        if node in self.by_node:
            if self.by_node[node].name not in self.results:
                self._quantize_group(self.groups[node.args[0]], inputs)
        elif self.clips is not None and node in self.clips.nodes:
            self.clips.choose(node, inputs, self.fetch)

    def call(self, node: Node, index: int, args: tuple, kwargs: dict) -> Any:
        if node not in self.by_node:  # an activation quantizer
            quantized = (self.clips.quantize(node, args) if self.clips is not None and node in self.clips.nodes
                         else self._execute(node, args, kwargs))
            if node in self.corrected:
                self._add_cross(node, args[0], quantized)
            return quantized
        x = args[0]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return F.linear(x, self.dequantized[self.by_node[node].name].to(x.dtype), bias)

    def finish(self, node: Node) -> None:
        if node not in self.by_node:
            return
        name = self.by_node[node].name
        self.uses_left[name] -= 1
        if not self.uses_left[name]:
            del self.dequantized[name]

    def _add_cross(self, node: Node, x: torch.Tensor, quantized: torch.Tensor) -> None:
        """Add one chunk's `cross_statistic` (float32 product, float64 sum, as `chunk_hessian`)."""
        width = x.shape[-1]
        product = cross_statistic(x.detach().reshape(-1, width).float(), quantized.detach().reshape(-1, width).float(),
                                  self._pending(self.groups[node])[1])
        if node in self.cross:
            self.cross[node].add_(product)
        else:
            self.cross[node] = product.to(torch.float64)

    def _pending(self, group: list[G.LinearUse]) -> tuple[list[str], list[torch.Tensor]]:
        """The names and weights (as stored) of a group's linears not quantized yet (a weight read twice counts once)."""
        names, weights = [], []
        for u in group:
            if u.name not in names and u.name not in self.results:
                names.append(u.name)
                weights.append(self.fetch(u.weight).detach())
        return names, weights

    def _quantize_group(self, group: list[G.LinearUse], inputs: ChunkInputs) -> None:
        names, stored = self._pending(group)
        weights = [w.float() for w in stored]
        h, tokens = chunk_hessian(inputs, weights[0].shape[1], weights[0].device)
        spec = weight_spec(self.config)
        source = group[0].node.args[0]
        cross = self.cross.pop(source, None)
        if cross is None and source in self.corrected:  # this rank ran no chunk: it still joins the all-reduce
            empty = h.new_zeros(0, h.shape[0], dtype=torch.float32)
            cross = cross_statistic(empty, empty, weights).to(torch.float64)
        if tokens == 0:
            self.warnings.append(f"{', '.join(names)}: no calibration tokens reached these linears; used RTN")
            quantized = [rtn(w, spec) for w in weights]
        else:
            stacked = torch.cat(weights)
            if cross is not None:  # all-reduced and scaled like H
                stacked = float_input_target(stacked, h, distributed.all_reduce_sum(cross) * (2.0 / tokens),
                                             self.config.act_error_ridge)
            stacked = gptq(stacked, h, spec, act_order=self.config.act_order, damp=self.config.damp,
                           name=", ".join(names))
            quantized = _split_rows(stacked, [w.shape[0] for w in weights])
        for name, qw in zip(names, quantized):
            self.dequantized[name] = qw.dequantize()
            self.results[name] = qw.to("cpu")
        self.groups_done += 1
        self.bar.update(1)


class ParkedWeights:
    """GPTQ results of a store-backed program, kept in its weight store (which spills) until the pass rewrites
    each linear: the codes of a large model do not fit in memory (one byte per weight before packing)."""

    PARTS = ("codes", "scales", "zeros")

    def __init__(self, store: Any) -> None:
        self.store = store
        self.specs: dict[str, tuple[WeightSpec, int]] = {}

    def __setitem__(self, name: str, qw: QuantizedWeight) -> None:
        for part in self.PARTS:
            self.store.set(f"gptq_result.{name}.{part}", getattr(qw, part))
        self.specs[name] = (qw.spec, qw.block_size)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    def pop(self, name: str) -> QuantizedWeight:
        """The result for `name`, read back and dropped from the store."""
        spec, block_size = self.specs.pop(name)
        parts = [self.store.get(f"gptq_result.{name}.{part}") for part in self.PARTS]
        for part in self.PARTS:
            self.store.drop(f"gptq_result.{name}.{part}")
        return QuantizedWeight(*parts, spec, block_size)


def _split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """Undo the row stacking of weights that shared one GPTQ run."""
    out = []
    for codes, scales, zeros in zip(qw.codes.split(rows), qw.scales.split(rows), qw.zeros.split(rows)):
        out.append(QuantizedWeight(codes.contiguous(), scales.contiguous(), zeros.contiguous(), qw.spec, qw.block_size))
    return out
