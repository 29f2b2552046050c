"""quantize_experts on the trained tiny MoE: MoQa-style vs uniform vs frequency-only allocation.

    python benchmarks/bench_moe.py                 # writes the allocation part of benchmarks/results/moe.md
    python benchmarks/bench_moe.py --eval-windows 32 --out /tmp/moe.md   # quicker
    python benchmarks/bench_moe.py --model tiny_qwen2_moe   # the Qwen2-MoE with a shared expert: results/moe_qwen2.md

Equal average bits (3 and 2.5) over the routed experts' weights, same quantizer (RTN or GPTQ, same
group size), same calibration text ("calib" split); perplexity on the whole "eval" split, plus KL and
top-1 agreement against the fp32 model, and a paired bootstrap over the eval windows of the
perplexity difference between MoQa and each baseline. Router and layer norms stay fp32. The Qwen2-MoE's
shared experts are quantized to 8 bits (`ExpertWeights.shared_bits`) in every row alike, outside the
budget, and their sigmoid gates stay fp32. Each model has its own splits (`bench_moe_common.MODELS`):
the prose model is calibrated on Luke, selects on Acts and is evaluated on Genesis. Everything is
measured in one run, side by side.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from bench_moe_common import MODELS, describe_machine, md_table, tiny_moe_program, with_selection, write_part

from fxpress.data import token_windows
from fxpress.evaluate import paired_bootstrap, window_metrics
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize_experts import ExpertAnalysis, ExpertBudget, ExpertWeights, QuantizeExperts
from fxpress.passes.quantize_experts.analysis import analyse_program

ALLOCATIONS = ("uniform", "frequency", "moqa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny_moe")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 2.5])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=None, help="default: the whole split")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sensitivity", default="fisher", help="quantize_experts.sensitivity for the moqa rows")
    parser.add_argument("--select-windows", type=int, default=256,
                        help='"heldout" windows that score MoQa\'s trust-region candidates (0: the calibration text)')
    parser.add_argument("--variants", nargs="*", default=["plain"],
                        help="more MoQa rows: 'plain' (the knapsack alone, no measured selection) or a "
                             "sensitivity (e.g. output: the layer-local routed error; loss)")
    parser.add_argument("--out", type=Path, default=None, help="default: the model's report (results/moe.md, moe_qwen2.md)")
    parser.add_argument("--dump", type=Path, default=None, help="also save the per-window figures here (torch.save)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    out = args.out if args.out is not None else spec.report

    base, tokenizer = tiny_moe_program(args.calib_windows, args.seq, args.model)
    calib = base.calibration.batches
    selection = with_selection(base, tokenizer, args.select_windows, args.seq, spec.heldout)  # kept out of the analysis
    args.select_windows = selection  # the report names what was used (Acts has only 241 windows of 128)
    windows = token_windows(tokenizer, spec.eval, args.seq, args.eval_windows)
    analysis = analyse_program(base, group_size=args.group_size, samples=calib)

    programs, plans, seconds = {}, {}, {}
    for method in args.methods:
        for budget in args.budgets:
            runs = [(a, a, args.sensitivity, {}) for a in ALLOCATIONS]
            for v in args.variants:
                plain = v == "plain"
                runs.append((f"moqa ({v})", "moqa", args.sensitivity if plain else v, {"trust_region": (0.0,)} if plain else {}))
            for label, allocation, sensitivity, trust_region in runs:
                key = (method, budget, label)
                program = copy.deepcopy(base)
                start = time.time()
                quantize = QuantizeExperts(
                    budget=ExpertBudget(avg_bits=budget, allocation=allocation, selection_samples=selection, **trust_region),
                    weights=ExpertWeights(method=method, group_size=args.group_size),
                    analysis=ExpertAnalysis(sensitivity=sensitivity), verbose=False)
                run_passes(program, [quantize])
                seconds[key] = time.time() - start
                programs[key], plans[key] = program, program.metadata["quantize_experts"]
                print(f"{method} {budget} {label:9s}: avg bits {plans[key]['avg_bits']:.3f}, "
                      f"predicted {plans[key]['predicted_error']:.4g} ({seconds[key]:.0f} s)", flush=True)
                for c in plans[key].get("candidates", []):
                    print(f"    mu {c['mu']}: predicted {c['predicted_error']:.4g}, selection ppl {math.exp(c['loss']):.3f}"
                          f"{' (chosen)' if c['chosen'] else ''}", flush=True)
    with torch.no_grad():
        metrics = window_metrics(base, {"fp32": base, **programs}, windows, batch_size=8)
    if args.dump is not None:  # the raw per-window figures, to re-check the report without rerunning
        torch.save({"metrics": metrics, "plans": plans, "seconds": seconds,
                    "bytes": {k: p.weight_bytes() for k, p in programs.items()}}, args.dump)
    for key, m in metrics.items():
        print(key, f"perplexity {math.exp(float(m['nll'].mean())):.3f}  KL {float(m['kl'].mean()):.4f}  "
              f"top-1 {float(m['top1'].mean()):.3f}")
    write_part("allocation", report(args, analysis, metrics, plans, seconds, base.weight_bytes(),
                                    {k: p.weight_bytes() for k, p in programs.items()}, len(windows)), out)


def _ppl(m: dict[str, torch.Tensor]) -> float:
    return math.exp(float(m["nll"].mean()))


def comparisons(metrics, keys) -> tuple[list[list[str]], list[str]]:
    """Paired MoQa-vs-baseline rows per setting, and findings computed from them (never written by hand)."""
    rows, findings = [], []
    for method, budget in sorted({k[:2] for k in keys}, key=lambda t: (t[0], -t[1])):
        moqa = metrics.get((method, budget, "moqa"))
        if moqa is None:
            continue
        every = {k[2]: metrics[k] for k in keys if k[:2] == (method, budget)}
        group = {a: m for a, m in every.items() if a in ALLOCATIONS}
        best = min(group, key=lambda a: _ppl(group[a]))
        best_kl = min(group, key=lambda a: float(group[a]["kl"].mean()))
        verdicts = []
        for other in every:
            if other == "moqa":
                continue
            b = paired_bootstrap(moqa["nll"], every[other]["nll"], stat="ppl")
            sure = "significant" if b["hi"] < 0 or b["lo"] > 0 else "within noise"
            rows.append([method, str(budget), f"moqa - {other}", f"{b['diff']:+.3f}", f"[{b['lo']:+.3f}, {b['hi']:+.3f}]",
                         f"{b['windows_better']:.2f}", sure])
            verdicts.append(f"vs {other} {b['diff']:+.3f} ({sure})")
        findings.append(f"- {method}, {budget} bits: lowest perplexity **{best}**, lowest KL **{best_kl}**; "
                        f"MoQa perplexity difference " + ", ".join(verdicts))
    findings.append(summary_line(metrics, keys))
    return rows, findings


def summary_line(metrics, keys) -> str:
    """In how many settings MoQa has the lowest perplexity / KL among uniform, frequency and MoQa."""
    settings = sorted({k[:2] for k in keys})
    wins = {"perplexity": [], "kl": []}
    for setting in settings:
        group = {a: metrics[(*setting, a)] for a in ALLOCATIONS if (*setting, a) in metrics}
        wins["perplexity"].append(min(group, key=lambda a: _ppl(group[a])) == "moqa")
        wins["kl"].append(min(group, key=lambda a: float(group[a]["kl"].mean())) == "moqa")
    lost = [f"{m} {b}" for (m, b), won in zip(settings, wins["perplexity"]) if not won]
    return (f"- Overall: MoQa has the lowest perplexity in {sum(wins['perplexity'])} of {len(settings)} settings and "
            f"the lowest KL to the fp32 model in {sum(wins['kl'])} of {len(settings)}"
            + (f"; it does not win perplexity at {', '.join(lost)} (differences above)." if lost else "."))


def candidate_rows(plans) -> list[list[str]]:
    """One row per distinct candidate plan of each MoQa run with a measured selection."""
    rows = []
    for (method, budget, label), plan in plans.items():
        for c in plan.get("candidates", []) if label == "moqa" else []:
            ppl = f"{math.exp(c['loss']):.3f}"
            rows.append([method, str(budget), ", ".join(f"{m:g}" for m in c["mu"]), f"{c['predicted_error']:.5f}",
                         f"{c['mean_abs_deviation']:.3f}", f"**{ppl}**" if c["chosen"] else ppl])
    return rows


def report(args, analysis, metrics, plans, seconds, fp_bytes, nbytes, len_eval) -> list[str]:
    fp = metrics["fp32"]
    keys = [k for k in metrics if k != "fp32"]
    rows = []
    for key in keys:
        method, budget, allocation = key
        m, plan = metrics[key], plans[key]
        h = ", ".join(f"{b}b: {n}" for b, n in sorted(plan["bits_histogram"].items()))
        rows.append([method, str(budget), allocation, f"{plan['avg_bits']:.3f}", f"{_ppl(m):.3f}",
                     f"{float(m['kl'].mean()):.4f}", f"{float(m['top1'].mean()):.3f}", h, f"{nbytes[key]:,}",
                     f"{seconds[key]:.0f}"])
    paired, findings = comparisons(metrics, keys)
    spec = MODELS[args.model]
    shared = ("; the shared experts are quantized to 8 bits in every row, outside the budget, their gates stay fp32"
              if args.model == "tiny_qwen2_moe" else "")
    flag = "" if args.model == "tiny_moe" else f" --model {args.model}"
    lines = [
        f"# quantize_experts on the trained {args.model}",
        "",
        f"Produced by `python benchmarks/bench_moe.py{flag}` ({describe_machine(args.threads)}).",
        "",
        f"Model: `fxpress.moe_model.{spec.load.__name__}()` ({spec.description}). Calibration: "
        f"{args.calib_windows} x {args.seq} tokens of the \"{spec.calib}\" split. Evaluation: {len_eval} x {args.seq} "
        f"tokens of the \"{spec.eval}\" split; KL and top-1 against the fp32 model. "
        f"Group size {args.group_size}, bit choices 2/3/4, average bits over the routed experts' weights "
        f"(router and attention stay fp32{shared}). Weight bytes include the fp32 attention and embeddings.",
        "",
        f"fp32 perplexity: **{_ppl(fp):.3f}**, weight bytes {fp_bytes:,}",
        "",
        *md_table(["method", "avg bits (target)", "allocation", "avg bits (achieved)", "perplexity", "KL", "top-1",
                   "bits histogram (params)", "weight bytes", "pass s"], rows),
        "",
        "Allocations, all solved by the same exact knapsack: *uniform* = one bit width for every expert when "
        "the budget is a bit choice, otherwise the data-free weight error alone decides; *frequency* = "
        "activation frequency x weight error (earlier MoE work); *moqa* = stage 2 as the model pays it: "
        "the model's output KL on the calibration text when only that expert projection is quantized at that "
        "bit width, to second order from sampled-Fisher gradients of each routed row (sensitivity "
        f"`{args.sensitivity}`; experts the text hardly reaches also pay the local error of rows routed to "
        "them on purpose), solved once per trust-region penalty mu in "
        f"{list(ExpertBudget.trust_region)} (mu x the mean predicted error per parameter, per parameter and "
        "bit away from the average), each plan measured whole on "
        + (f"{args.select_windows} x {args.seq} tokens of the \"{spec.heldout}\" split (never the eval text)"
           if args.select_windows else "the calibration text")
        + ", the lowest next-token loss wins; *moqa (plain)* = the knapsack alone (mu = 0, no measured "
        "selection); *moqa (output)* = the layer-local MoE output error over the rows routed to each expert, "
        "weighted by routing weight; *moqa (loss)* = the calibration text's loss change to second order (its "
        "next-token gradient term added to the KL term).",
        "",
        f"MoQa's candidates (selection perplexity on the \"{spec.heldout}\" windows; the chosen one is in bold):",
        "",
        *md_table(["method", "avg bits", "mu", "predicted KL", "mean abs bit deviation", "selection ppl"],
                  candidate_rows(plans)),
        "",
        "## MoQa against each baseline, paired over the eval windows",
        "",
        "Perplexity difference (negative: MoQa better), its 95% interval from 2000 bootstrap resamples of "
        "the eval windows (the same windows for both), and the share of windows where MoQa's NLL is lower.",
        "",
        *md_table(["method", "avg bits", "comparison", "ppl difference", "95% interval", "windows better",
                   "verdict"], paired),
        "",
        "## Findings",
        "",
        *findings,
        "",
        "## Analysis (stage 1: activation, stage 3: correlation) on the calibration text",
        "",
        "```", analysis.table(), "```",
        "",
        "Expert load (share of routed rows) per layer:",
        "",
    ]
    lines += [f"- layer {a.layer}: " + " ".join(f"{s:.3f}" for s in a.share) for a in analysis.layers]
    return lines


if __name__ == "__main__":
    main()
