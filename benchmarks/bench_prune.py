"""Token pruning on SmolLM2: learned router vs ShortGPT layer pruning and sub-block pruning at the same FLOPs.

Measures, in one run: per-block sparsity and FLOPs saved, the overall FLOPs ratio, perplexity /
KL / top-1 agreement against the unpruned model on the "eval" text, and prefill wall time of the
pruned vs the unpruned program, side by side, in PyTorch and in ONNX Runtime.
Writes benchmarks/results/prune.md.

    python benchmarks/bench_prune.py [--sparsity 0.3] [--train-steps 16] [--lr 1e-3] [--search-evals 40]
        [--block-search-evals 40] [--calib-windows 16] [--heldout-windows 4] [--eval-windows 32] [--threads 1]
        [--prefill 256 512 1024] [--no-onnx] [--quick]

Also the ablations at the same FLOPs (the same search restricted to whole blocks; the router's schedule with
a fixed token score) and paired bootstrap intervals over the eval windows.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.data import token_windows
from fxpress.evaluate import paired_bootstrap, window_metrics
from fxpress.models import load_smollm2
from fxpress.passes import PruneTokens, run_passes
from fxpress.passes.prune_tokens import RouterTraining, SearchSettings, baselines
from fxpress.passes.prune_tokens.export import export_inputs
from fxpress.passes.prune_tokens.flops import prune_flops
from fxpress.passes.prune_tokens.router import HeuristicRouter, find_blocks, route_blocks
from fxpress.passes.prune_tokens.training import kl_divergence

RESULTS = Path(__file__).parent / "results" / "prune.md"
ROUTER = "token router (FTP)"
SEARCHED = "searched block pruning (ablation: same search, {0, 1} per block)"
HEURISTIC = "fixed token score (ablation: router's schedule)"
SHORTGPT = "ShortGPT layer pruning"


def clone(program):
    """A second Program over a copy of the graph that shares the weights (passes rewrite graphs in place,
    none of them here changes a weight), so six variants of SmolLM2 fit in memory."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(program.module.graph, {}))
    twin = copy.copy(program)
    twin.module = torch.fx.GraphModule(program.module, graph)
    twin.history, twin.report, twin.metadata = [], [], {}
    return twin


def summary(m: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"ppl": math.exp(float(m["nll"].mean())), "kl": float(m["kl"].mean()), "top1": float(m["top1"].mean())}


def heuristic_program(dense, schedule: list[float], held: torch.Tensor, probes: int):
    """The router's schedule with a fixed token score in its routed blocks; of hidden-state RMS (high or
    low first) and attention received, the one with the lowest KL on held-out calibration text."""
    best = None
    for feature, sign in (("hidden_norm", 1.0), ("hidden_norm", -1.0), ("attention", 1.0)):
        variant = clone(dense)
        router = HeuristicRouter(len(schedule), feature, sign)
        router.sparsity.copy_(torch.tensor(schedule))
        route_blocks(variant.module, router, "gather", schedule, probes)
        with torch.no_grad():
            kl = sum(float(kl_divergence(dense(b), variant(b))) for b in held.split(2))
        print(f"heuristic {feature} sign {sign:+.0f}: held-out KL {kl / len(held.split(2)):.4f}")
        if best is None or kl < best[0]:
            best = (kl, f"{'high' if sign > 0 else 'low'} {feature.replace('_', ' ')}", variant)
    return best[1], best[2]


def median_times(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Interleaved repetitions, so machine load hits every variant alike; median seconds."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def export_onnx(program, path: str) -> None:
    """The project's ONNX lowering when present, else torch.onnx (dynamo) with the same dynamic shapes."""
    try:
        from fxpress.lowering.onnx import export_onnx as lower
    except ImportError:
        lower = None
    if lower is not None:
        lower(program, path)
        return
    args, shapes = export_inputs(program)
    onnx_program = torch.onnx.export(program.module, args, dynamo=True, dynamic_shapes=shapes, opset_version=21,
                                     verbose=False)
    onnx_program.save(path)


def schedule_text(schedule: list[float]) -> str:
    """Dropped blocks and routed blocks with their sparsity, for the table."""
    dropped = [str(i) for i, s in enumerate(schedule) if s >= 1.0]
    routed = [f"{i}@{s:.3g}" for i, s in enumerate(schedule) if 0 < s < 1.0]
    return f"dropped {', '.join(dropped) or '-'}; routed {', '.join(routed) or '-'}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--train-steps", type=int, default=16)
    ap.add_argument("--search-evals", type=int, default=40)
    ap.add_argument("--refine-evals", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime threads")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and timing")
    ap.add_argument("--seq", type=int, default=256, help="calibration/eval window length")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--calib-windows", type=int, default=8, help="\"calib\" windows: router guide and distillation")
    ap.add_argument("--heldout-windows", type=int, default=4, help="\"heldout\" windows: schedule scoring")
    ap.add_argument("--block-search-evals", type=int, default=None,
                    help="evaluations of the whole-block-only search (ablation); default: --search-evals")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prefill", type=int, nargs="+", default=[512], help="prefill lengths for wall time")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.train_steps, args.search_evals, args.eval_windows, args.reps, args.seq = 1, 3, 2, 2, 128
        args.refine_evals, args.calib_windows, args.heldout_windows, args.block_search_evals = 1, 2, 2, 2
    if args.block_search_evals is None:
        args.block_search_evals = args.search_evals
    return args


def baseline_programs(args, dense, calib: torch.Tensor, flops: dict) -> tuple[dict, dict]:
    """ShortGPT layer pruning and sub-block pruning by Block Influence, at the router's FLOPs."""
    costs = {}
    for b in find_blocks(dense.module):
        for part, macs in baselines.sub_block_macs(b, args.seq).items():
            costs[(b.index, part)] = macs
    budget = flops["dense"] - flops["pruned"]
    scores = baselines.influence(dense, calib[:4])
    programs, info = {}, {}
    for label, kinds in ((SHORTGPT, ("block",)), ("sub-block pruning (attn/MLP by BI)", ("attn", "mlp"))):
        chosen, saved = baselines.choose_at_flops(scores, costs, budget, kinds)
        programs[label] = clone(dense)
        baselines.drop(programs[label], chosen)
        info[label] = {"flops": 1.0 - saved / flops["dense"],
                       "dropped": ", ".join(f"{i}{'' if p == 'block' else ':' + p}" for i, p in sorted(chosen))}
    return programs, info


def variant_programs(args, dense, pruned, result, held: torch.Tensor, calib: torch.Tensor, probes: int):
    """The router, its ablations and the baselines, all at the router's FLOPs, with their table columns."""
    meta = pruned.metadata["prune_tokens"]
    flops = prune_flops(meta, args.seq)
    programs = {"unpruned": dense, ROUTER: pruned}
    info = {"unpruned": {"flops": 1.0}, ROUTER: {"flops": flops["ratio"], "dropped": schedule_text(meta["schedule"])}}
    if any(0 < s < 1 for s in meta["schedule"]):
        label, programs[HEURISTIC] = heuristic_program(dense, meta["schedule"], held, probes)
        info[HEURISTIC] = {**info[ROUTER], "dropped": f"{label}; same schedule"}
    if "block_only_schedule" in result.stats:
        chosen = [(i, "block") for i, s in enumerate(result.stats["block_only_schedule"]) if s >= 1.0]
        programs[SEARCHED] = clone(dense)
        baselines.drop(programs[SEARCHED], chosen)
        info[SEARCHED] = {"flops": prune_flops(meta, args.seq, result.stats["block_only_schedule"])["ratio"],
                          "dropped": ", ".join(str(i) for i, _ in chosen)}
    more_programs, more_info = baseline_programs(args, dense, calib, flops)
    return {**programs, **more_programs}, {**info, **more_info}


def quality(dense, programs: dict, info: dict, evalw: torch.Tensor, t0: float) -> tuple[dict, list]:
    """Per-variant quality rows and paired bootstrap tests of the pairs that matter."""
    metrics = window_metrics(dense, programs, evalw, batch_size=2)
    rows = {name: {**summary(metrics[name]), **info[name]} for name in programs}
    for name, row in rows.items():
        print(f"[{time.perf_counter() - t0:.0f}s] {name}: {row}")
    pairs = [(ROUTER, SHORTGPT), (ROUTER, SEARCHED), (ROUTER, HEURISTIC), (SEARCHED, SHORTGPT)]
    tests = [(a, b, paired_bootstrap(metrics[a]["nll"], metrics[b]["nll"], "ppl"),
              paired_bootstrap(metrics[a]["kl"], metrics[b]["kl"], "mean"))
             for a, b in pairs if a in metrics and b in metrics]
    return rows, tests


def pytorch_times(args, tok, dense, pruned, keys, values, t0: float) -> dict:
    pt = {}
    for length in args.prefill:
        ids = token_windows(tok, "eval", length, 1)
        with torch.no_grad():
            pt[length] = median_times({"dense": lambda ids=ids: dense.run(ids, keys, values),
                                       "pruned": lambda ids=ids: pruned.run(ids, keys, values)}, args.reps)
        print(f"[{time.perf_counter() - t0:.0f}s] PyTorch prefill {length}: {pt[length]}")
    return pt


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    dense = capture(model)
    held = token_windows(tok, "heldout", args.seq, args.heldout_windows)
    calib = torch.cat([token_windows(tok, "calib", args.seq, args.calib_windows), held])
    evalw = token_windows(tok, "eval", args.seq, args.eval_windows)
    print(f"[{time.perf_counter() - t0:.0f}s] captured; calibration {tuple(calib.shape)}, eval {tuple(evalw.shape)}")

    pruned = clone(dense)
    pruned.calibration = Calibration(calib, batch_size=2)
    cfg = PruneTokens(sparsity=args.sparsity, router=RouterTraining(train_steps=args.train_steps, lr=args.lr),
                      search=SearchSettings(search_evals=args.search_evals, refine_evals=args.refine_evals,
                                            block_search_evals=args.block_search_evals,
                                            heldout_fraction=len(held) / len(calib)))
    result = run_passes(pruned, [cfg])[0]
    print(f"[{time.perf_counter() - t0:.0f}s] prune_tokens done in {result.seconds:.0f}s: {result.stats}")
    meta = pruned.metadata["prune_tokens"]

    programs, info = variant_programs(args, dense, pruned, result, held, calib, cfg.router.probes)
    rows, tests = quality(dense, programs, info, evalw, t0)

    keys, values = dense.empty_cache(1)
    pt = pytorch_times(args, tok, dense, pruned, keys, values, t0)
    ort_times, parity = {}, None
    if not args.no_onnx:
        ort_times, parity = onnx_times(args, tok, dense, pruned, keys, values)
        print(f"[{time.perf_counter() - t0:.0f}s] ORT prefill {ort_times}, parity {parity:.2e}")
    prefill_flops = {length: prune_flops(meta, length)["ratio"] for length in args.prefill}
    write_report(args, result, meta, rows, tests, prune_flops(meta, args.seq), prefill_flops, pt, ort_times, parity,
                 time.perf_counter() - t0)


def onnx_times(args, tok, dense, pruned, keys, values) -> tuple[dict, float]:
    """Export both programs, then time ONNX Runtime prefill (fixed threads, interleaved, median)."""
    import onnxruntime as ort

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{name}.onnx") for name in ("dense", "pruned")}
        export_onnx(dense, paths["dense"])
        export_onnx(pruned, paths["pruned"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                    for name, path in paths.items()}
        names = {name: [i.name for i in sess.get_inputs()] for name, sess in sessions.items()}
        parity = 0.0
        for length in args.prefill:
            ids = token_windows(tok, "eval", length, 1)
            feeds = {n: dict(zip(names[n], (ids.numpy(), keys.numpy(), values.numpy()))) for n in sessions}
            with torch.no_grad():
                expected = pruned.run(ids, keys, values)[0].numpy()
            got = sessions["pruned"].run(None, feeds["pruned"])[0]
            parity = max(parity, float(np.abs(got - expected).max() / np.abs(expected).max()))
            times[length] = median_times({n: (lambda n=n, f=feeds: sessions[n].run(None, f[n])) for n in sessions},
                                         args.reps)
    return times, parity


def write_report(args, result, meta, rows, tests, flops, prefill_flops, pt, ort_times, parity, seconds) -> None:
    schedule = meta["schedule"]
    command = (f"python benchmarks/bench_prune.py --sparsity {args.sparsity} --train-steps {args.train_steps} "
               f"--lr {args.lr} --search-evals {args.search_evals} --block-search-evals {args.block_search_evals} "
               f"--refine-evals {args.refine_evals} --calib-windows {args.calib_windows} "
               f"--heldout-windows {args.heldout_windows} --eval-windows {args.eval_windows} --threads {args.threads} "
               f"--reps {args.reps} --prefill {' '.join(map(str, args.prefill))}"
               f"{' --no-onnx' if args.no_onnx else ''}{' --quick' if args.quick else ''}")
    lines = [
        "# Token pruning (prune_tokens) on SmolLM2-135M-Instruct",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on this shared 2-core machine).",
        f"Calibration: {args.calib_windows} x {args.seq} tokens of \"calib\" (router training), {args.heldout_windows} x "
        f"{args.seq} of \"heldout\" (schedule "
        f"scoring); quality on {args.eval_windows} x {args.seq} tokens of \"eval\". Token sparsity {args.sparsity} is a "
        f"FLOPs budget: the cost of skipping that fraction of all token-block visits (at 0.3 on SmolLM2's equal blocks, "
        f"the cost of dropping 9 of 30 blocks). Mean per-block sparsity of the result: "
        f"{sum(schedule) / len(schedule):.3f}; dropped blocks (1.0): {result.stats['dropped_blocks']}; routed "
        f"blocks (0 < s < 1): {result.stats['routed_blocks']}.",
        "",
        *quality_lines(args, rows, tests),
        "",
        *timing_lines(args, prefill_flops, pt, ort_times, parity),
        "",
        "## Per block",
        "",
        "| block | sparsity | FLOPs saved in block |",
        "| --- | --- | --- |",
    ]
    for i, (s, saved) in enumerate(zip(schedule, flops["block_saved"])):
        lines.append(f"| {i} | {s:.3f} | {saved:.3f} |")
    stats = {k: v for k, v in result.stats.items() if k not in ("block_sparsity", "block_flops_saved")}
    lines += ["", "## Pass statistics", "", "```", *(f"{k}: {v}" for k, v in stats.items()), "```", "", NOTES, ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, RESULTS)
    print("\n".join(lines))


def quality_lines(args, rows: dict, tests: list) -> list[str]:
    """The quality table at equal FLOPs and the paired bootstrap differences."""
    lines = [
        f"## Quality at the same FLOPs (prefill of {args.seq} tokens, lm_head included)",
        "",
        "| method | FLOPs ratio | perplexity | KL vs unpruned | top-1 agreement | blocks dropped / routed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['flops']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {r.get('dropped', '')} |")
    lines += [
        "",
        f"## Paired differences over the {args.eval_windows} eval windows (95% bootstrap intervals, 2000 resamples)",
        "",
        "| a - b | perplexity diff | 95% interval | KL diff | 95% interval | windows with lower NLL in a |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a, b, ppl, kl in tests:
        lines.append(f"| {a} - {b} | {ppl['diff']:+.2f} | [{ppl['lo']:+.2f}, {ppl['hi']:+.2f}] | {kl['diff']:+.3f} | "
                     f"[{kl['lo']:+.3f}, {kl['hi']:+.3f}] | {ppl['windows_better']:.2f} |")
    return lines


def timing_lines(args, prefill_flops: dict, pt: dict, ort_times: dict, parity: float | None) -> list[str]:
    """Prefill wall time of the unpruned and pruned programs in PyTorch and ONNX Runtime, and their parity."""
    lines = [
        f"## Prefill wall time, batch 1, {args.threads} thread(s) (median of {args.reps} interleaved runs)",
        "",
        "| prefill tokens | FLOPs ratio | PyTorch unpruned (s) | PyTorch pruned (s) | PyTorch ratio "
        "| ORT unpruned (s) | ORT pruned (s) | ORT ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for length in args.prefill:
        p, o = pt[length], ort_times.get(length)
        ort_cells = (f"{o['dense']:.3f} | {o['pruned']:.3f} | {o['pruned'] / o['dense']:.3f}" if o else "n/a | n/a | n/a")
        lines.append(f"| {length} | {prefill_flops[length]:.3f} | {p['dense']:.3f} | {p['pruned']:.3f} | "
                     f"{p['pruned'] / p['dense']:.3f} | {ort_cells} |")
    lines += [
        "",
        (f"ONNX Runtime vs PyTorch logits of the pruned program: max relative difference {parity:.1e}."
         if parity is not None else "ONNX Runtime not measured (--no-onnx)."),
    ]
    return lines


NOTES = """Notes:
- The schedule search chooses per block among 0, 1/8, ..., 7/8 (a router picks the tokens that run the
  block) and 1.0 (the block is dropped: no router, layer dropping as the limit case). Its seeds are the
  uniform schedule, ShortGPT's Block-Influence drop order, the measured drop sensitivity of each block,
  "mixed" schedules (1-3 fewer dropped blocks, the rest of the budget as light routing over the next
  blocks), and the best schedule of the whole-block-only search; every candidate is scored by KL to the
  unpruned model on held-out calibration text ("heldout" split, never the eval text).
- Ablations at the same FLOPs: "searched block pruning" is the same search restricted to {0, 1} per block
  (`block_search_evals` evaluations, sharing the sensitivity probes), so the gap between it and the router
  row is what token routing adds over the search itself; "fixed token score" runs the router's schedule with
  a one-factor score (hidden-state RMS high/low first, or attention received; the best on held-out text).
- Router: FTP's factors (position, attention received and its rank, required sparsity) plus hidden-state
  RMS, depth, and a learned per-block direction on the RMS-normalised hidden state (576 multiply-adds per
  token), one shared MLP (hidden 64). Guide loss: BCE to an oracle's keep labels (the size of each token's
  block update) at random sparsities. Distillation (KL to the unpruned logits + sparsity constraint + guide)
  is kept only when it lowers held-out KL (distill_kept in the pass statistics).
- Skipped tokens still write their keys/values (the k/v projections run on every token, also in dropped
  blocks), so the KV cache stays whole and decoding is unchanged; FLOPs count the router, its probe
  queries and the k/v projections, for the router and the baselines alike. Position 0 (attention sink)
  is never skipped by a router.
- ShortGPT drops whole blocks by Block Influence (1 - cos(in, out)); the sub-block baseline drops
  attention/MLP sub-blocks by their own Block Influence (BlockPruner ranks by perplexity instead). Each
  baseline drops units until its FLOPs are closest to the router's.
- Paired differences: per-window mean NLL and KL of two methods on the same eval windows, 2000 bootstrap
  resamples of the windows (fxpress.evaluate.window_metrics / paired_bootstrap); an interval that excludes 0
  is a difference beyond window-sampling noise.
- Gather/scatter in the exported graph read and write whole rows through a flat [batch*seq, hidden]
  view (ONNX Gather and ScatterND)."""


if __name__ == "__main__":
    sys.exit(main())
