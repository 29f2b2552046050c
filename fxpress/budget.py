"""The memory budget: `max_memory` bounds the peak resident memory of the whole process, so it is split here.

What torch and fxpress already hold is measured (the process's resident memory now); what one decoder block
needs to be worked on is estimated from the graph (its weights in the compute dtype, the largest GPTQ Hessian,
the calibration activations one node reads and writes for the whole calibration set); what is left goes to
the weight store's overlay (rewritten tensors kept in memory) and the calibration engine's activations
(beyond it, spilled to disk). A budget below the need is refused before any weight is read, naming the
smallest budget that works.
"""

from __future__ import annotations

import math
import re
import resource
from dataclasses import dataclass

import torch

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.heap import resident_bytes, return_freed_memory, trim_heap
from fxpress.program import Program
from fxpress.weights import format_bytes, parse_memory, spec_bytes

REWRITE_SLICE_BYTES = 32 * 2**20  # the float64 slice rotate rewrites a large weight in (a vocabulary table)
HESSIAN_COPIES = 2  # GPTQ holds a group's float64 Hessian and two float32 K x K matrices while it factorises
_ZERO = re.compile(r"\s*0*\.?0+\s*[a-zA-Z]*\s*")  # "0", "0GiB", "0.0 MB"
ROUND = 0.05 * 2**30  # the smallest budget named in errors is rounded up to 0.05 GiB


@dataclass(frozen=True)
class MemoryPlan:
    """How `max_memory` bytes are spent: what is resident already, one block's work, the overlay, activations."""

    max_memory: int
    resident: int  # the process before compiling (torch, fxpress, the captured graph)
    block: int  # one decoder block's weights and Hessians (what rewriting the largest weight needs beyond it is
    # counted in `activations`: weight-only passes and calibration take turns)
    activations: int  # the calibration engine's activation budget
    overlay: int  # the weight store's in-memory budget


def plan_rows(plan: dict[str, int]) -> list[tuple[str, str]]:
    """A memory plan (MemoryPlan's fields, as a program's metadata keeps them) as (what, size) table rows."""
    return [(key.replace("_", " "), format_bytes(value)) for key, value in plan.items()]


def requested_budget(value: str | int | float | None, what: str = "max_memory") -> int | None:
    """`max_memory` in bytes (fxpress.weights.parse_memory), except that a budget of 0 is kept: plan_memory then
    refuses it naming the smallest budget that works, which only the captured graph tells."""
    try:
        return parse_memory(value, what)
    except ConfigError:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and _ZERO.fullmatch(str(value)):
            return 0
        raise


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: on Linux a child's ru_maxrss starts at its
    parent's resident size at fork, so a child of a large process would report the parent's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _weight_specs(program: Program) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every weight the graph reads, from the store's specs or the module's tensors."""
    store = program.weights
    specs = {}
    for node in program.graph.nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        if store is not None and target in store:
            specs[target] = store.spec(target)
        elif isinstance(value := G.val(node), torch.Tensor):
            specs[target] = (tuple(value.shape), value.dtype)
    return specs


def _block_linears(program: Program) -> list[list[G.LinearUse]]:
    """The linears of each decoder block (attention and MLP/MoE, readers and writers)."""
    parts = [[p for p in (b.attention, b.mlp) if p is not None] for b in G.decoder_blocks(program.module)]
    return [[u for p in block for u in (*p.readers, *p.writers)] for block in parts]


def largest_rewrite(program: Program) -> int:
    """Bytes a weight-only pass needs beyond what is resident: the largest weight in the compute dtype, the
    half-precision copy it is read from (a checkpoint's bf16), and the float64 slice rotate works in
    (REWRITE_SLICE_BYTES). Rotate rewrites a weight read from disk in place, so no second full copy is made."""
    dtype = program.info.torch_activation_dtype
    largest = max((spec_bytes(shape, dtype) for shape, _ in _weight_specs(program).values()), default=0)
    return largest + largest // 2 + min(largest * 2, REWRITE_SLICE_BYTES)


def block_weights(program: Program, hessians: bool) -> int:
    """Bytes to work on the largest decoder block: its weights in the compute dtype plus, with GPTQ, its
    largest Hessian (K x K float64, twice)."""
    dtype = program.info.torch_activation_dtype
    specs = _weight_specs(program)
    need = 0
    for uses in _block_linears(program):
        weights = sum(spec_bytes(specs[name][0], dtype) for name in {u.name for u in uses} if name in specs)
        widest = max((u.in_features() for u in uses), default=0) if hessians else 0
        need = max(need, weights + HESSIAN_COPIES * widest * widest * 8)
    return need


def block_activations(program: Program, tokens: int) -> int:
    """Bytes of calibration activations the engine keeps for one node over the whole calibration set: the
    widest block linear's input and output and the residual stream waiting for its add, in the compute dtype."""
    if tokens == 0:
        return 0
    uses = [u for block in _block_linears(program) for u in block]
    width = max((u.in_features() + u.out_features() for u in uses), default=0)
    return tokens * (width + (program.info.hidden_size or 0)) * program.info.torch_activation_dtype.itemsize


def plan_memory(program: Program, max_memory: int, calibration_tokens: int, hessians: bool,
                resident: int | None = None) -> MemoryPlan:
    """Split `max_memory` for `program`, or a ConfigError naming the smallest budget that works.

    `calibration_tokens`: samples x sequence length of the calibration set (0 when no pass calibrates);
    `hessians`: whether a pass gathers GPTQ Hessians. The surplus over the need is shared evenly between
    activations and the overlay.
    """
    return_freed_memory()
    trim_heap()  # what capture and tokenizing freed is not held: measure without it
    resident = resident_bytes() if resident is None else resident
    rewrite, calibrate = largest_rewrite(program), block_weights(program, hessians)
    activations = block_activations(program, calibration_tokens)
    need = resident + max(rewrite, calibrate + activations)  # weight-only passes and calibration take turns
    if max_memory < need:
        smallest = math.ceil(need * 1.1 / ROUND) * ROUND  # room for what the next capture adds
        raise ConfigError(
            f"max_memory={format_bytes(max_memory)} is below what one decoder block needs ({format_bytes(need)} with "
            f"torch loaded: {format_bytes(resident)} resident, then the larger of {format_bytes(rewrite)} to rewrite "
            f"the largest weight and {format_bytes(calibrate)} for one block's weights"
            f"{' and Hessians' if hessians else ''} with {format_bytes(activations)} of calibration activations): use "
            f"at least {smallest / 2**30:.2f}GiB, or fewer calibration samples"
        )
    surplus = max_memory - need
    activations = max(activations, rewrite - calibrate)  # what rewriting needs beyond a block is free while calibrating
    return MemoryPlan(max_memory, resident, calibrate, activations + surplus // 2, surplus - surplus // 2)
