"""FPGA lowering: threshold-neuron networks to a netlist, HLS C++, Verilog and an iCE40 bitstream.

`export_fpga(program, path, vectors=..., ...)` writes into the folder `path`:

- `netlist.json`      the integer network (format in `fxpress.lowering.fpga.netlist`)
- `hls/`              fxnet.h, fxnet.cpp, fxnet_tb.cpp, run_hls.tcl (+ test vectors)
- `rtl/`              fxnet.v (fxnet_core, fxnet_top), fxnet_tb.v, vectors, and the flow's outputs
- `rtl/fxnet_top.bin` the iCE40 bitstream (when `bitstream=True` and the design fits)
- `report.json`       C-sim / RTL-sim agreement with PyTorch, LUTs, FFs, max clock, device

`layers=k` lowers only the first k layers (e.g. the threshold layer alone, when the whole network
is too big for an iCE40); simulation still checks those layers bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fxpress.artifact_names import NETLIST_FILE
from fxpress.atomic import check_target, staged_dir, write_atomic
from fxpress.errors import ConfigError, LoweringError
from fxpress.lowering.fpga.flow import run_flow
from fxpress.lowering.fpga.hls import csim, emit_hls, write_vectors
from fxpress.lowering.fpga.netlist import Netlist, netlist_from_program
from fxpress.lowering.fpga.verilog import emit_verilog, rtl_sim

__all__ = ["Netlist", "build", "export_fpga", "netlist_from_program"]


def build(netlist: Netlist, directory: str | os.PathLike, codes: torch.Tensor | None = None, simulate: bool = True,
          synthesize: bool = True, bitstream: bool = True, device: str = "auto") -> dict[str, Any]:
    """Emit HLS and Verilog for `netlist` into `directory`, simulate both on `codes`, run the iCE40 flow."""
    out = Path(directory)
    hls_dir, rtl_dir = out / "hls", out / "rtl"
    hls_dir.mkdir(parents=True, exist_ok=True)
    rtl_dir.mkdir(parents=True, exist_ok=True)
    netlist.save(out / NETLIST_FILE)
    emit_hls(netlist, hls_dir)
    verilog = emit_verilog(netlist, rtl_dir / "fxnet.v")
    report: dict[str, Any] = {"netlist": netlist.summary()}
    if codes is not None:
        expected = netlist.reference(codes)[-1]
        write_vectors(hls_dir, codes, expected)
        if simulate:
            c_out = csim(hls_dir)
            r_out = rtl_sim(netlist, rtl_dir, codes)
            report["vectors"] = int(codes.shape[0])
            report["csim_mismatches"] = _mismatches(c_out, expected)
            report["rtl_mismatches"] = _mismatches(r_out, expected)
    if synthesize:
        report["fpga"] = run_flow(verilog, rtl_dir, device=device, bitstream=bitstream)
    _write_report(out, report)
    return report


def _write_report(directory: Path, report: dict[str, Any]) -> None:
    write_atomic(directory / "report.json", json.dumps(report, indent=1, default=str))


def _mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    if actual.shape != expected.shape:
        return int(expected.numel())
    return int((actual != expected).sum())


def export_fpga(program, path: str | os.PathLike, vectors: torch.Tensor | None = None, layers: int | None = None,
                simulate: bool = True, synthesize: bool = True, bitstream: bool = True, device: str = "auto",
                weight_bits: int = 8, overwrite: bool = False) -> Path:
    """Lower a program whose first layers are threshold neurons; `vectors` are real-valued inputs.

    The folder is built beside `path` and published whole (fxpress.atomic); a folder at `path` that fxpress
    did not write is refused before any work unless `overwrite`.
    """
    if not (isinstance(weight_bits, int) and 2 <= weight_bits <= 8):
        raise ConfigError(f"weight_bits={weight_bits!r}: conventional layers are lowered as int2..int8 MACs")
    out = Path(path)
    if out.suffix:
        raise ConfigError(f"export_fpga writes a folder; {out} looks like a file name (drop '{out.suffix}')")
    check_target(out, directory=True, overwrite=overwrite)
    netlist = netlist_from_program(program, weight_bits=weight_bits)
    if layers is not None:
        if not (isinstance(layers, int) and 1 <= layers <= len(netlist.layers)):
            raise ConfigError(f"layers={layers!r}: the netlist has {len(netlist.layers)} layers, choose 1..{len(netlist.layers)}")
        netlist.layers = netlist.layers[:layers]
    if vectors is None:
        vectors = program.example_inputs[0]
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != netlist.input["features"]:
        raise LoweringError(f"vectors must be a tensor (N, {netlist.input['features']}) of real inputs")
    with staged_dir(out, overwrite=overwrite) as stage:
        report = build(netlist, stage, netlist.quantize(vectors), simulate, synthesize, bitstream, device)
        if "bitstream" in report.get("fpga", {}):  # name the published file, not the staging one
            report["fpga"]["bitstream"] = str(out / Path(report["fpga"]["bitstream"]).relative_to(stage))
            _write_report(stage, report)
    program.metadata["fpga_report"] = report
    return out
