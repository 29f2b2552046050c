"""quantize_experts on the trained tiny MoE: MoQa-style vs uniform vs frequency-only allocation.

    python benchmarks/bench_moe.py                 # writes benchmarks/results/moe.md
    python benchmarks/bench_moe.py --eval-windows 32 --out /tmp/moe.md   # quicker

Equal average bits (3 and 2.5) over the routed experts' weights, same quantizer (RTN or GPTQ, same
group size), same calibration text ("calib" split); perplexity on the "eval" split, plus KL and
top-1 agreement against the fp32 model. Router and layer norms stay fp32; the model has no shared
experts. Everything is measured in one run, side by side.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch

from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.data import token_windows
from fxpress.evaluate import evaluate
from fxpress.moe_analysis import analyse_program
from fxpress.moe_model import load_tiny_moe
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize_experts import QuantizeExperts

ALLOCATIONS = ("uniform", "frequency", "moqa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 2.5])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=None, help="default: the whole split")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_tiny_moe()
    calib = token_windows(tokenizer, "calib", args.seq, args.calib_windows)
    windows = token_windows(tokenizer, "eval", args.seq, args.eval_windows)
    base = capture(model)
    base.calibration = Calibration(calib)
    fp = evaluate(base, windows, batch_size=8)
    print(f"fp32: perplexity {fp['perplexity']:.3f}")
    analysis = analyse_program(base, group_size=args.group_size)

    rows = []
    for method in args.methods:
        for budget in args.budgets:
            for allocation in ALLOCATIONS:
                program = copy.deepcopy(base)
                start = time.time()
                run_passes(program, [QuantizeExperts(avg_bits=budget, allocation=allocation, method=method,
                                                     group_size=args.group_size, verbose=False)])
                seconds = time.time() - start
                result = evaluate(program, windows, ref_fn=base, batch_size=8)
                plan = program.metadata["quantize_experts"]
                rows.append((method, budget, allocation, plan["avg_bits"], result, plan["bits_histogram"], seconds,
                             program.weight_bytes()))
                print(f"{method} {budget} {allocation:9s}: avg bits {plan['avg_bits']:.3f}  perplexity "
                      f"{result['perplexity']:.3f}  KL {result['kl']:.4f}  top-1 {result['top1']:.3f}  ({seconds:.1f} s)")
    write_report(args, fp, analysis, rows, base.weight_bytes(), len(windows))


def findings(rows) -> list[str]:
    """Which allocation wins each setting, per metric, computed from the rows above (not written by hand)."""
    out = []
    settings = sorted({(r[0], r[1]) for r in rows}, key=lambda t: (t[0], -t[1]))
    for method, budget in settings:
        group = {r[2]: r[4] for r in rows if r[0] == method and r[1] == budget}
        best = {m: (min if m != "top1" else max)(group, key=lambda a, m=m: group[a][m]) for m in ("perplexity", "kl", "top1")}
        spread = max(v["perplexity"] for v in group.values()) - min(v["perplexity"] for v in group.values())
        out.append(f"- {method}, {budget} bits: lowest perplexity **{best['perplexity']}**, lowest KL **{best['kl']}**, "
                   f"highest top-1 **{best['top1']}**; perplexity spread across allocations {spread:.3f}")
    out.append("- The perplexity differences between allocations are a few tenths of a point on a model whose fp32 "
               "perplexity is ~160 (an under-trained 4.4M-parameter model); KL to the fp32 model is the steadier "
               "measure of what the allocation controls.")
    return out


def write_report(args, fp, analysis, rows, fp_bytes, len_eval) -> None:
    lines = [
        "# quantize_experts on the trained tiny MoE",
        "",
        "Produced by `python benchmarks/bench_moe.py` "
        f"({platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)).",
        "",
        "Model: `fxpress.moe_model.load_tiny_moe()` (Mixtral architecture, 4 layers, 8 experts of width 256 per "
        "layer, top-2, trained by `examples/train_moe.py` on the \"train\" split). Calibration: "
        f"{args.calib_windows} x {args.seq} tokens of the \"calib\" split. Evaluation: {len_eval} x {args.seq} "
        "tokens of the \"eval\" split; KL and top-1 against the fp32 model. "
        f"Group size {args.group_size}, bit choices 2/3/4, average bits over the routed experts' weights "
        "(router and attention stay fp32). Weight bytes include the fp32 attention and embeddings.",
        "",
        f"fp32 perplexity: **{fp['perplexity']:.3f}**, weight bytes {fp_bytes:,}",
        "",
        "| method | avg bits (target) | allocation | avg bits (achieved) | perplexity | KL | top-1 | bits histogram (params) | weight bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, budget, allocation, achieved, result, hist, _seconds, nbytes in rows:
        h = ", ".join(f"{b}b: {n}" for b, n in sorted(hist.items()))
        lines.append(f"| {method} | {budget} | {allocation} | {achieved:.3f} | {result['perplexity']:.3f} | "
                     f"{result['kl']:.4f} | {result['top1']:.3f} | {h} | {nbytes:,} |")
    lines += ["", "Allocations: *uniform* = one bit width for every expert when the budget is a bit choice, "
              "otherwise the data-free weight error alone decides; *frequency* = activation frequency x weight "
              "error (earlier MoE work); *moqa* = each expert projection's error on the MoE output over the rows "
              "routed to it, weighted by routing weight (stage 2). All three use the same exact knapsack solver.",
              "", "## Findings", ""] + findings(rows) + [
              "", "## Analysis (stage 1: activation, stage 3: correlation) on the calibration text", "",
              "```", analysis.table(), "```", "", "Expert load (share of routed rows) per layer:", ""]
    for a in analysis.layers:
        lines.append(f"- layer {a.layer}: " + " ".join(f"{s:.3f}" for s in a.share))
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
