"""The `fxpress::*` op table: each op's schema, reference kernel, fake kernel and lowerings, in one place.

A pass that needs an op ATen lacks defines it here (via `define_op` in its runtime module); each
lowering registers its part per op with `register_lowering` (ONNX: an `OnnxOp` class, TVM: a converter).
`EXPORT_TARGETS` is the one list of export targets; `missing_parts()` lists what an op still lacks for the
targets that lower op by op, and a test fails while that list is not empty.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NAMESPACE = "fxpress"


@dataclass(frozen=True)
class ExportTarget:
    """An export target: its exporter (named, not imported: lowerings sit above the op table) and whether
    every fxpress op needs a lowering of its own for it (hls/fpga map whole networks, not single ops)."""

    name: str
    exporter: str  # "module:function"
    artifact: str  # default artifact name in an output directory
    per_op: bool
    writes_file: bool = False  # one file (ONNX); the others write a directory

    def export_function(self) -> Callable:
        module, function = self.exporter.split(":")
        return getattr(importlib.import_module(module), function)


EXPORT_TARGETS: dict[str, ExportTarget] = {t.name: t for t in (
    ExportTarget("onnx", "fxpress.lowering.onnx:export_onnx", "model.onnx", per_op=True, writes_file=True),
    ExportTarget("tvm", "fxpress.lowering.tvm:export_tvm", "model.tvm", per_op=True),
    ExportTarget("hls", "fxpress.lowering.fpga:export_fpga", "hls", per_op=False),
    ExportTarget("fpga", "fxpress.lowering.fpga:export_fpga", "fpga", per_op=False),
)}
LOWERING_TARGETS = tuple(name for name, target in EXPORT_TARGETS.items() if target.per_op)


@dataclass
class OpSpec:
    """One custom op: everything needed to run it, export it again, and lower it."""

    name: str
    schema: str
    kernel: Callable
    fake: Callable
    doc: str
    lowerings: dict[str, Callable] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


OPS: dict[str, OpSpec] = {}


def define_op(name: str, schema: str, kernel: Callable, fake: Callable, doc: str) -> OpSpec:
    """Define `fxpress::name` with its reference kernel (all devices) and fake kernel (for re-export)."""
    if name in OPS:
        return OPS[name]
    qualname = f"{NAMESPACE}::{name}"
    torch.library.define(qualname, schema)
    torch.library.impl(qualname, "CompositeExplicitAutograd", kernel)
    torch.library.register_fake(qualname, fake)
    spec = OpSpec(name=name, schema=schema, kernel=kernel, fake=fake, doc=doc)
    OPS[name] = spec
    return spec


def register_lowering(op_name: str, target: str) -> Callable[[Callable], Callable]:
    """Decorator used by a lowering module: its lowering of `fxpress::op_name` for `target`."""
    if target not in LOWERING_TARGETS:
        raise ValueError(f"unknown lowering target '{target}': targets are {', '.join(LOWERING_TARGETS)}")

    def wrap(fn: Callable) -> Callable:
        if op_name not in OPS:
            raise KeyError(f"cannot register a {target} lowering for unknown op 'fxpress::{op_name}'")
        OPS[op_name].lowerings[target] = fn
        return fn

    return wrap


def missing_parts() -> dict[str, list[str]]:
    """Per op, the parts it still lacks (a lowering per target)."""
    return {
        name: [f"lowering:{t}" for t in LOWERING_TARGETS if t not in spec.lowerings]
        for name, spec in OPS.items()
        if any(t not in spec.lowerings for t in LOWERING_TARGETS)
    }
