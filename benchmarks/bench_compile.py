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


def inverse_cholesky_before(h: torch.Tensor) -> torch.Tensor:
    """`gptq._inverse_cholesky` before stop 31: Cholesky, its inverse, and the inverse's upper Cholesky factor."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def quantize_act_before(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """`fxpress::quantize_act` (asymmetric, float32) before stop 31: a fresh temporary per operation, its rounding
    `runtime.quant.round_clamped` as it was then (clamp, then (v + 1.5 * 2^23) - 1.5 * 2^23)."""
    magic = 1.5 * 2.0**23

    def round_clamped(v: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (torch.clamp(v, low, high) + magic) - magic

    maxq = (1 << bits) - 1
    high = x.amax(-1, keepdim=True).clamp_min(0) * clip_ratio
    low = x.amin(-1, keepdim=True).clamp_max(0) * clip_ratio
    scale = (high - low) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = round_clamped(-low / scale, 0, maxq)
    return (round_clamped(x / scale + zero, 0, maxq) - zero) * scale


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
    """The GPTQ run's kernels that stops 29 and 31 changed, each beside what it replaced on SmolLM2's shapes (old
    and new alternating, medians of `rounds`): stop 29's calibration chunk Hessian (4 windows x 128 tokens) and
    correct_act_error fit of each linear group (q/k/v, o, gate/up, down), then stop 31's (`print_stop31_rows`)."""
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
    print_stop31_rows(rounds, gen)


def print_stop31_rows(rounds: int, gen: torch.Generator) -> None:
    """Stop 31's kernels beside what they replaced: the factor of H^-1 GPTQ sweeps with, the down_proj input's
    X^T X~ statistic per chunk (its product and float64 sum), and the activation quantizer on a chunk."""
    from fxpress.passes.quantize.act_clip import QUANTIZE_ACT
    from fxpress.passes.quantize.gptq import _inverse_cholesky, cross_statistic, float_input_target
    from fxpress.runtime.quant import _quantize_act

    for width in (576, 1536):
        x = torch.randn(4096, width, generator=gen) * torch.rand(width, generator=gen)
        h = x.T @ x / 4096
        h.diagonal().add_(0.01 * float(h.diagonal().mean()))
        old, new = alternate(partial(inverse_cholesky_before, h), partial(_inverse_cholesky, h.clone(), "h", 0.01),
                             rounds, 5)
        print(f"| upper Cholesky factor of H^-1 | {width} x {width} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    x = torch.randn(512, 1536, generator=gen)
    xq = QUANTIZE_ACT(x, 4, 1.0, False)
    w = torch.randn(576, 1536, generator=gen) * 0.02
    total_c, total_p = torch.zeros(1536, 1536, dtype=torch.float64), torch.zeros(1536, 576, dtype=torch.float64)
    old, new = alternate(lambda: total_c.add_(x.T @ xq), lambda: total_p.add_(cross_statistic(x, xq, [w])), rounds, 10)
    print(f"| down_proj's X^T X~ per chunk, summed in float64 | 512 x 1536, W 576 x 1536 | {old:.2f} | {new:.2f} | "
          f"{new / old:.2f} |")
    h = (xq.T @ xq).double() / 256
    c = (x.T @ xq).double() / 256
    old, new = alternate(partial(float_input_target, w, h, c, 3.0), partial(float_input_target, w, h, c.T @ w.T.double(), 3.0),
                         rounds, 3)
    print(f"| correct_act_error fit from C, then from C^T W^T | 576 x 1536 | {old:.1f} | {new:.1f} | {new / old:.2f} |")
    for width in (576, 1536):
        x = torch.randn(4, 128, width, generator=gen)
        old, new = alternate(partial(quantize_act_before, x, 4, 0.9), partial(_quantize_act, x, 4, 0.9, False),
                             rounds, 20)
        print(f"| quantize_act, 4-bit asymmetric | 4 x 128 x {width} | {old:.2f} | {new:.2f} | {new / old:.2f} |")


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
