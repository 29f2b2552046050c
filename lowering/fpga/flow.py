"""The iCE40 flow: yosys synth_ice40 -> nextpnr-ice40 -> icepack (.bin) -> icetime, with a parsed report.

Debian packages: yosys, nextpnr-ice40, fpga-icestorm (icepack, icetime). The part is chosen by size:
UP5K (5280 LUTs, sg48) when the design fits in 90% of it, else HX8K (7680 LUTs, ct256); a design too
big for either is synthesised (LUT/FF counts) but not placed, and the report says why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from fxpress.errors import LoweringError

DEVICES = {  # name: (nextpnr flag, package, icetime device, LUTs)
    "up5k": ("--up5k", "sg48", "up5k", 5280),
    "hx8k": ("--hx8k", "ct256", "hx8k", 7680),
}
TOOLS = ("yosys", "nextpnr-ice40", "icepack", "icetime")
APT_PACKAGES = "yosys nextpnr-ice40 fpga-icestorm"


def _run(cmd: list[str], cwd: Path, timeout: float, what: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise LoweringError(f"{what} needs {cmd[0]}: apt-get install {APT_PACKAGES}")
    try:
        run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise LoweringError(f"{what} ({cmd[0]}) took longer than {timeout:.0f} s") from err
    if run.returncode != 0:
        tail = (run.stdout + run.stderr)[-3000:]
        raise LoweringError(f"{what} failed ({' '.join(cmd[:3])} ...): {tail}")
    return run


def synthesize(verilog: str | Path, directory: str | Path, top: str = "fxnet_top", timeout: float = 900) -> dict[str, Any]:
    """yosys synth_ice40 (no DSPs: the comparison is in logic cells); returns the cell counts."""
    d = Path(directory)
    script = f"read_verilog {Path(verilog).resolve()}; synth_ice40 -top {top} -json {top}.json; stat"
    _run(["yosys", "-q", "-p", script, "-l", f"yosys_{top}.log"], d, timeout, "synthesis")
    return parse_yosys_stat((d / f"yosys_{top}.log").read_text())


def parse_yosys_stat(log: str) -> dict[str, Any]:
    """LUTs (SB_LUT4), flip-flops (SB_DFF*), carry cells (SB_CARRY) from the last `stat` in a yosys log."""
    section = log[log.rfind("Number of cells:"):] if "Number of cells:" in log else log
    cells: dict[str, int] = {}
    for name, count in re.findall(r"^\s+(SB_\w+)\s+(\d+)\s*$", section, flags=re.M):
        cells[name] = cells.get(name, 0) + int(count)
    return {
        "luts": cells.get("SB_LUT4", 0),
        "ffs": sum(v for k, v in cells.items() if k.startswith("SB_DFF")),
        "carries": cells.get("SB_CARRY", 0),
        "cells": cells,
    }


def choose_device(luts: int, device: str = "auto") -> str | None:
    if device != "auto":
        if device not in DEVICES:
            raise LoweringError(f"unknown iCE40 device '{device}': choose one of {', '.join(DEVICES)} or 'auto'")
        return device
    for name, (_, _, _, capacity) in DEVICES.items():
        if luts <= 0.9 * capacity:
            return name
    return None


def place_and_route(directory: str | Path, device: str, top: str = "fxnet_top", timeout: float = 900, seed: int = 1) -> dict[str, Any]:
    """nextpnr-ice40 -> icepack -> icetime; returns utilisation, the .bin path and the clock estimates."""
    d = Path(directory)
    flag, package, chip, _ = DEVICES[device]
    run = _run(["nextpnr-ice40", flag, "--package", package, "--json", f"{top}.json", "--asc", f"{top}.asc",
                "--pcf-allow-unconstrained", "--seed", str(seed), "--freq", "12"], d, timeout, "place and route")
    log = run.stdout + run.stderr
    _run(["icepack", f"{top}.asc", f"{top}.bin"], d, timeout, "bitstream packing")
    timing = _run(["icetime", "-d", chip, "-P", package, "-t", f"{top}.asc"], d, timeout, "timing analysis")
    report = parse_nextpnr(log)
    report.update(parse_icetime(timing.stdout + timing.stderr))
    report.update({"device": device, "package": package, "bitstream": str(d / f"{top}.bin")})
    return report


def parse_nextpnr(log: str) -> dict[str, Any]:
    """Placed LUT/FF utilisation and nextpnr's max clock from its log."""
    out: dict[str, Any] = {}
    lc = re.findall(r"ICESTORM_LC:\s+(\d+)/\s*(\d+)", log)
    if lc:
        out["logic_cells"], out["logic_cells_available"] = int(lc[-1][0]), int(lc[-1][1])
    freq = re.findall(r"Max frequency for clock\s+'[^']*':\s+([\d.]+) MHz", log)
    if freq:
        out["nextpnr_fmax_mhz"] = float(freq[-1])
    return out


def parse_icetime(text: str) -> dict[str, Any]:
    m = re.search(r"Total path delay:\s+([\d.]+) ns \(([\d.]+) MHz\)", text)
    return {"icetime_path_ns": float(m.group(1)), "fmax_mhz": float(m.group(2))} if m else {}


def run_flow(verilog: str | Path, directory: str | Path, device: str = "auto", bitstream: bool = True,
             timeout: float = 900) -> dict[str, Any]:
    """Synthesis, then (when it fits and `bitstream`) place, route, pack and time: one report dict."""
    d = Path(directory)
    report = {"synthesis": synthesize(verilog, d, timeout=timeout)}
    luts = report["synthesis"]["luts"]
    report["luts"], report["ffs"] = luts, report["synthesis"]["ffs"]
    chosen = choose_device(luts, device)
    if chosen is None:
        report["placed"] = False
        report["reason"] = f"{luts} LUTs exceed 90% of the largest supported iCE40 (HX8K, 7680 LUTs)"
        return report
    report["device"] = chosen
    if bitstream:
        report.update(place_and_route(d, chosen, timeout=timeout))
        report["placed"] = True
    return report
