"""`make demo`'s compile of SmolLM2, stage by stage (issue #15: <= 60 s on a quiet 2-core machine).

    python benchmarks/bench_compile.py                 # the demo's recipe: hadamard + GPTQ W4A4KV4, 64 x 128 calib
    python benchmarks/bench_compile.py --export        # and the W4A16 g32 ONNX export the demo ships, timed by stage

Stages: capture (fxpress.compile's total minus its passes), each pass, and inside Quantize the activation clip
search, the weight quantization (GPTQ) and the rewrite; the export's stages come from export_onnx's statistics.
Prints the load average beside the figures: run it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def demo_passes(rotation: str) -> list:
    """The recipe from examples/demo.py itself, so the two cannot drift apart."""
    spec = importlib.util.spec_from_file_location("fxpress_demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.demo_passes(rotation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rotation", default="hadamard")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows of --calib-len tokens (demo: 64)")
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as make demo)")
    parser.add_argument("--export", action="store_true", help="also time the W4A16 g32 ONNX export")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fxpress
    from fxpress.data import MIXED_CALIB, mixed_windows
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    calib = mixed_windows(tokenizer, MIXED_CALIB, args.calib_len, args.calib)  # as examples/demo.py
    start = time.perf_counter()
    cm = fxpress.compile(model, passes=demo_passes(args.rotation), calibration=calib, progress=False)
    total = time.perf_counter() - start
    rows = [("capture", total - sum(r.seconds for r in cm.report))]
    for r in cm.report:
        rows.append((r.name, r.seconds))
        rows += [(f"  {r.name}: {stage}", s) for stage, s in r.stats.get("seconds", {}).items()]
    rows.append(("compile total", total))
    if args.export:
        rows += export_stages(model)
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}, "
          f"calibration {args.calib} x {args.calib_len}")
    print("| stage | s |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")


def export_stages(model: torch.nn.Module) -> list[tuple[str, float]]:
    """The ONNX export of the demo's shipped artifact (W4A16 g32 RTN), by export_onnx's own stage times."""
    import fxpress
    from fxpress.lowering.onnx import export_onnx
    from fxpress.passes import Quantize
    from fxpress.passes.quantize import WeightQuant

    w4 = fxpress.compile(model, passes=[Quantize(weights=WeightQuant(bits=4, group_size=32))], progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stats = export_onnx(w4.program, Path(tmp) / "m.onnx")
        total = time.perf_counter() - start
    return [(f"  export: {k}", v) for k, v in stats["seconds"].items()] + [("export total", total)]


if __name__ == "__main__":
    main()
