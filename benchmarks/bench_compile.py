"""`make demo`'s compile of SmolLM2, stage by stage (issue #15: <= 60 s on a quiet 2-core machine).

    python benchmarks/bench_compile.py                 # the demo's recipe: hadamard + GPTQ W4A4KV4, 64 x 128 calib
    python benchmarks/bench_compile.py --export        # and the W4A16 g32 ONNX export the demo ships, timed by stage
    python benchmarks/bench_compile.py --kernels       # only the GPTQ run's kernels, each against what it replaced

Stages: capture (fxpress.compile's total minus its passes), each pass, and inside Quantize the activation clip
search, the weight quantization (GPTQ) and the rewrite; the export's stages come from export_onnx's statistics.
Prints the load average beside the figures: run it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from functools import partial
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
    parser.add_argument("--batch-size", type=int, default=None,
                        help="calibration windows per chunk (default: fxpress.calibration.Calibration's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as make demo)")
    parser.add_argument("--export", action="store_true", help="also time the W4A16 g32 ONNX export")
    parser.add_argument("--kernels", action="store_true", help="time the GPTQ run's kernels against their old forms")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        print_kernel_rows()
        return
    import fxpress
    from fxpress.data import MIXED_CALIB, mixed_windows
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    calib = mixed_windows(tokenizer, MIXED_CALIB, args.calib_len, args.calib)  # as examples/demo.py
    if args.batch_size:
        from fxpress.calibration import Calibration
        calib = Calibration(calib, batch_size=args.batch_size)
    start = time.perf_counter()
    cm = fxpress.compile(model, passes=demo_passes(args.rotation), calibration=calib, progress=False)
    total = time.perf_counter() - start
    rows = [("capture", total - sum(r.seconds for r in cm.report))]
    for r in cm.report:
        rows.append((r.name, r.seconds))
        rows += [(f"  {r.name}: {stage}", s) for stage, s in r.stats.get("seconds", {}).items()]
    quantize = cm.report["quantize"].stats
    if "act_clip_evaluations" in quantize:
        print(f"activation clip search: {quantize['act_clip_evaluations']} ratios scored for "
              f"{len(quantize['act_clip_ratios'])} quantizers")
    rows.append(("compile total", total))
    if args.export:
        rows += export_stages(model)
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}, "
          f"calibration {args.calib} x {args.calib_len}")
    print("| stage | s |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")


def float64_fit(weight: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """`gptq.float_input_target` as it was before stop 29: every product in float64, in one order."""
    lam = ridge * float(torch.diagonal(h).mean())
    dampened = h.clone()
    dampened.diagonal().add_(lam)
    w = weight.double()
    return torch.cholesky_solve(cross.T @ w.T + lam * w.T, torch.linalg.cholesky(dampened)).T.float()


def alternate(before, after, rounds: int, calls: int) -> tuple[float, float]:
    """Median ms per call of `before` and `after`, timed in alternating rounds of `calls` calls each."""
    times: dict = {before: [], after: []}
    before(), after()
    for _ in range(rounds):
        for fn in (before, after):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[fn].append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times[before]), statistics.median(times[after])


def print_kernel_rows(rounds: int = 7) -> None:
    """The GPTQ run's kernels that stop 29 changed, each beside what it replaced on SmolLM2's shapes (old and new
    alternating, medians of `rounds`): a calibration chunk's Hessian (4 windows x 128 tokens), and the
    correct_act_error fit of each linear group (q/k/v, o, gate/up, down)."""
    from fxpress.passes.quantize.gptq import float_input_target, gram

    gen = torch.Generator().manual_seed(0)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, {rounds} alternating rounds, "
          "medians\n| kernel | shape | before ms | now ms | now / before |\n|---|---|---|---|---|")
    for width in (576, 1536):
        x = torch.randn(512, width, generator=gen)
        old, new = alternate(partial(torch.mm, x.T, x), partial(gram, x), rounds, 20)
        print(f"| chunk Hessian X^T X | 512 x {width} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    for outputs, width in ((960, 576), (576, 576), (3072, 576), (576, 1536)):
        x = torch.randn(2048, width, generator=gen) * torch.rand(width, generator=gen) * 3
        xq = x + 0.1 * torch.randn(2048, width, generator=gen)
        stats = (torch.randn(outputs, width, generator=gen) * 0.02, (xq.T @ xq).double() / 1024,
                 (x.T @ xq).double() / 1024, 3.0)
        old, new = alternate(partial(float64_fit, *stats), partial(float_input_target, *stats), rounds, 3)
        print(f"| correct_act_error fit | {outputs} x {width} | {old:.1f} | {new:.1f} | {new / old:.2f} |")


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
