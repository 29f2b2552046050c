"""Token pruning on SmolLM2: learned router vs ShortGPT layer pruning and sub-block pruning at the same FLOPs.

Measures, in one run: per-block sparsity and FLOPs saved, the overall FLOPs ratio, perplexity /
KL / top-1 agreement against the unpruned model on the "eval" text, and prefill wall time of the
pruned vs the unpruned program, side by side, in PyTorch and in ONNX Runtime.
Writes benchmarks/results/prune.md.

    python benchmarks/bench_prune.py [--sparsity 0.3] [--train-steps 16] [--search-evals 40] [--threads 1]
                                     [--prefill 256 512 1024] [--no-onnx] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fxpress import baselines
from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.data import token_windows
from fxpress.evaluate import compare_logits, perplexity
from fxpress.models import load_smollm2
from fxpress.passes import PruneTokens, run_passes
from fxpress.passes.prune_tokens import export_inputs, prune_flops
from fxpress.token_router import find_blocks

RESULTS = Path(__file__).parent / "results" / "prune.md"


def clone(program):
    """A second Program over a deep copy of the graph module (passes rewrite in place)."""
    twin = copy.copy(program)
    twin.module = copy.deepcopy(program.module)
    twin.history, twin.report, twin.metadata = [], [], {}
    return twin


def quality(program, windows, ref_logits) -> dict[str, float]:
    cache = iter(ref_logits)
    return {"ppl": perplexity(program, windows, batch_size=2),
            **compare_logits(lambda _ids: next(cache), program, windows, batch_size=2)}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--train-steps", type=int, default=16)
    ap.add_argument("--search-evals", type=int, default=40)
    ap.add_argument("--refine-evals", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime threads")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and timing")
    ap.add_argument("--pure", action="store_true", help="also run the search with no whole-block drops")
    ap.add_argument("--seq", type=int, default=256, help="calibration/eval window length")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--prefill", type=int, nargs="+", default=[512], help="prefill lengths for wall time")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.train_steps, args.search_evals, args.eval_windows, args.reps, args.seq = 1, 3, 2, 2, 128
        args.refine_evals = 1
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    dense = capture(model)
    calib = torch.cat([token_windows(tok, "calib", args.seq, 6), token_windows(tok, "heldout", args.seq, 2)])
    evalw = token_windows(tok, "eval", args.seq, args.eval_windows)
    print(f"[{time.perf_counter() - t0:.0f}s] captured; calibration {tuple(calib.shape)}, eval {tuple(evalw.shape)}")

    pruned = clone(dense)
    pruned.calibration = Calibration(calib, batch_size=2)
    cfg = PruneTokens(sparsity=args.sparsity, train_steps=args.train_steps, search_evals=args.search_evals,
                      refine_evals=args.refine_evals, heldout_fraction=0.25)
    result = run_passes(pruned, [cfg])[0]
    print(f"[{time.perf_counter() - t0:.0f}s] prune_tokens done in {result.seconds:.0f}s: {result.stats}")
    meta = pruned.metadata["prune_tokens"]

    # --- quality ---------------------------------------------------------------------------------------
    with torch.no_grad():
        ref_logits = [dense(b) for b in evalw.split(2)]
    rows = {"unpruned": {"ppl": perplexity(dense, evalw, batch_size=2), "kl": 0.0, "top1": 1.0, "flops": 1.0}}
    flops = prune_flops(meta, args.seq)
    rows["token router (FTP)"] = {**quality(pruned, evalw, ref_logits), "flops": flops["ratio"],
                                  "dropped": schedule_text(meta["schedule"])}
    print(f"[{time.perf_counter() - t0:.0f}s] router quality {rows['token router (FTP)']}")
    if args.pure:  # the same search with whole-block drops ruled out: every pruned block routes tokens
        pure = clone(dense)
        pure.calibration = Calibration(calib, batch_size=2)
        top = 1.0 - 1.0 / cfg.levels
        pure_cfg = dataclasses.replace(cfg, max_block_sparsity=top)
        pure_stats = run_passes(pure, [pure_cfg])[0].stats
        pure_meta = pure.metadata["prune_tokens"]
        rows[f"token router, no block dropped (max {top:.3f})"] = {
            **quality(pure, evalw, ref_logits), "flops": prune_flops(pure_meta, args.seq)["ratio"],
            "dropped": schedule_text(pure_meta["schedule"])}
        print(f"[{time.perf_counter() - t0:.0f}s] pure router {pure_stats}")

    blocks = find_blocks(dense.module)
    costs = {}
    for b in blocks:
        for part, macs in baselines.sub_block_macs(b, args.seq).items():
            costs[(b.index, part)] = macs
    budget = flops["dense"] - flops["pruned"]
    scores = baselines.influence(dense, calib[:4])
    for label, kinds in (("ShortGPT layer pruning", ("block",)), ("sub-block pruning (attn/MLP by BI)", ("attn", "mlp"))):
        chosen, saved = baselines.choose_at_flops(scores, costs, budget, kinds)
        variant = clone(dense)
        baselines.drop(variant, chosen)
        rows[label] = {**quality(variant, evalw, ref_logits), "flops": 1.0 - saved / flops["dense"],
                       "dropped": ", ".join(f"{i}{'' if p == 'block' else ':' + p}" for i, p in sorted(chosen))}
        print(f"[{time.perf_counter() - t0:.0f}s] {label}: {rows[label]}")

    # --- wall time -------------------------------------------------------------------------------------
    pt, ort_times, parity = {}, {}, None
    keys, values = dense.empty_cache(1)
    for length in args.prefill:
        ids = token_windows(tok, "eval", length, 1)
        with torch.no_grad():
            pt[length] = median_times({"dense": lambda ids=ids: dense.run(ids, keys, values),
                                       "pruned": lambda ids=ids: pruned.run(ids, keys, values)}, args.reps)
        print(f"[{time.perf_counter() - t0:.0f}s] PyTorch prefill {length}: {pt[length]}")
    if not args.no_onnx:
        ort_times, parity = onnx_times(args, tok, dense, pruned, keys, values)
        print(f"[{time.perf_counter() - t0:.0f}s] ORT prefill {ort_times}, parity {parity:.2e}")
    prefill_flops = {length: prune_flops(meta, length)["ratio"] for length in args.prefill}
    write_report(args, result, meta, rows, flops, prefill_flops, pt, ort_times, parity, time.perf_counter() - t0)


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


def write_report(args, result, meta, rows, flops, prefill_flops, pt, ort_times, parity, seconds) -> None:
    schedule = meta["schedule"]
    command = (f"python benchmarks/bench_prune.py --sparsity {args.sparsity} --train-steps {args.train_steps} "
               f"--search-evals {args.search_evals} --refine-evals {args.refine_evals} --threads {args.threads} "
               f"--reps {args.reps} --prefill {' '.join(map(str, args.prefill))}"
               f"{' --no-onnx' if args.no_onnx else ''}{' --pure' if args.pure else ''}{' --quick' if args.quick else ''}")
    lines = [
        "# Token pruning (prune_tokens) on SmolLM2-135M-Instruct",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on this shared 2-core machine).",
        f"Calibration: 6 x {args.seq} tokens of \"calib\" (router training), 2 x {args.seq} of \"heldout\" (schedule "
        f"scoring); quality on {args.eval_windows} x {args.seq} tokens of \"eval\". Token sparsity {args.sparsity} is a "
        f"FLOPs budget: the cost of skipping that fraction of all token-block visits (at 0.3 on SmolLM2's equal blocks, "
        f"the cost of dropping 9 of 30 blocks). Mean per-block sparsity of the result: "
        f"{sum(schedule) / len(schedule):.3f}; dropped blocks (1.0): {result.stats['dropped_blocks']}; routed "
        f"blocks (0 < s < 1): {result.stats['routed_blocks']}.",
        "",
        f"## Quality at the same FLOPs (prefill of {args.seq} tokens, lm_head included)",
        "",
        "| method | FLOPs ratio | perplexity | KL vs unpruned | top-1 agreement | blocks dropped / routed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['flops']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {r.get('dropped', '')} |")
    lines += [
        "",
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


NOTES = """Notes:
- The schedule search chooses per block among 0, 1/8, ..., 7/8 (a router picks the tokens that run the
  block) and 1.0 (the block is dropped: no router, layer dropping as the limit case). Its seeds are the
  uniform schedule, ShortGPT's Block-Influence drop order, and the measured drop sensitivity of each block;
  every candidate is scored by KL to the unpruned model on held-out calibration text, so ShortGPT's
  choice is one candidate and the search keeps it unless something scores better.
- Skipped tokens still write their keys/values (the k/v projections run on every token, also in dropped
  blocks), so the KV cache stays whole and decoding is unchanged; FLOPs count the router, its probe
  queries and the k/v projections, for the router and the baselines alike. Position 0 (attention sink)
  is never skipped by a router.
- ShortGPT drops whole blocks by Block Influence (1 - cos(in, out)); the sub-block baseline drops
  attention/MLP sub-blocks by their own Block Influence (BlockPruner ranks by perplexity instead). Each
  baseline drops units until its FLOPs are closest to the router's.
- Gather/scatter in the exported graph read and write whole rows through a flat [batch*seq, hidden]
  view (ONNX Gather and ScatterND). ONNX Runtime's profiler on a 6-block SmolLM2-shaped model at 512
  tokens: the earlier element-wise ScatterElements took 17.8 ms per run (3.5% of the pruned run, ~3.5 ms
  per routed block) plus 11 ms of index Expand; ScatterND takes 2.3 ms in all.
- Held-out KL of the search's seeds (search_kl_shortgpt is ShortGPT's own choice), of its best
  schedule, and after router distillation (refine_kl_best) are in the pass statistics above."""


if __name__ == "__main__":
    sys.exit(main())
