"""Export the mixed-precision tiny MoE to ONNX and TVM and check them against the PyTorch program.

    python benchmarks/bench_moe_export.py            # rewrites the export part of benchmarks/results/moe.md

Quantizes the trained tiny MoE with quantize_experts (MoQa allocation, 2.5 and 3 average bits), exports
ONNX (ONNX Runtime MatMulNBits) and TVM (llvm), and reports argmax agreement with the PyTorch compiled
model on real "eval" text and the artifact sizes next to the budget's expected expert bytes.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from bench_moe_common import EXPORT_HEADING, REPORT, tiny_moe_program, with_selection, write_part

from fxpress.data import token_windows
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize_experts import ExpertBudget, QuantizeExperts


def agreement(ref_fn, fn, windows: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and max |logit difference| over the windows."""
    agree, count, diff = 0, 0, 0.0
    with torch.no_grad():
        for batch in windows.split(4):
            a, b = ref_fn(batch), fn(batch)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += a.shape[0] * a.shape[1]
            diff = max(diff, float((a - b).abs().max()))
    return agree / count, diff


def expert_bytes(summary: dict) -> float:
    """Bytes the routed experts' codes take at the chosen bits (scales and zero points not included)."""
    return sum(int(b) * n for b, n in summary["bits_histogram"].items()) / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0])
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--select-windows", type=int, default=256, help='"heldout" windows that score MoQa\'s candidates')
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fxpress.lowering.onnx import export_onnx
    from fxpress.lowering.tvm import export_tvm
    from fxpress.runtime.runners import load_runner

    base, tokenizer = tiny_moe_program(32)
    selection = with_selection(base, tokenizer, args.select_windows)
    windows = token_windows(tokenizer, "eval", 128, args.eval_windows)
    lines = [f"{EXPORT_HEADING} (`python benchmarks/bench_moe_export.py`)", "",
             f"MoQa allocation (default sensitivity: sampled-Fisher model KL; trust-region plan measured on "
             f"{selection} \"heldout\" windows), RTN, group 64; argmax agreement with the PyTorch program over {args.eval_windows} x 128 "
             "\"eval\" tokens. Expert code bytes = sum(params x bits) / 8 of the routed experts (the budget); the "
             "artifacts also hold scales, zero points, fp32 attention, norms and the embedding.", "",
             "| avg bits | target | artifact | bytes | expert code bytes | top-1 vs PyTorch | max abs logit diff |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for budget in args.budgets:
        program = copy.deepcopy(base)
        run_passes(program, [QuantizeExperts(budget=ExpertBudget(avg_bits=budget, selection_samples=selection), verbose=False)])
        summary = program.metadata["quantize_experts"]
        with tempfile.TemporaryDirectory() as tmp:
            for target in ("onnx", "tvm"):
                path = Path(tmp) / ("model.onnx" if target == "onnx" else "model_tvm")
                try:
                    stats = export_onnx(program, path) if target == "onnx" else export_tvm(program, path)
                except Exception as err:  # report a failing lowering, still measure the other target
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                    print(f"{budget} bits {target}: export failed: {type(err).__name__}: {reason}")
                    lines.append(f"| {summary['avg_bits']:.3f} | {budget} | {target} | export failed: "
                                 f"{type(err).__name__} | | | |")
                    continue
                runner = load_runner(path)
                top1, diff = agreement(program, runner, windows)
                size = stats.get("bytes") or sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
                print(f"{budget} bits {target}: {size:,} bytes, top-1 {top1:.4f}, max diff {diff:.2e}")
                lines.append(f"| {summary['avg_bits']:.3f} | {budget} | {target} | {size:,} | {expert_bytes(summary):,.0f} | "
                             f"{top1:.4f} | {diff:.2e} |")
    write_part("export", lines, args.out)


if __name__ == "__main__":
    main()
