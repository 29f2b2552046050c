"""Token pruning on SmolLM2: learned router vs ShortGPT layer pruning and sub-block pruning at the same FLOPs.

Measures, in one run: per-block sparsity and FLOPs saved, the overall FLOPs ratio, perplexity /
KL / top-1 agreement against the unpruned model on the "eval" text, and prefill wall time of the
pruned vs the unpruned program, side by side, in PyTorch and in ONNX Runtime.
Writes benchmarks/results/prune.md.

    python benchmarks/bench_prune.py [--sparsity 0.3] [--train-steps 8] [--search-evals 12] [--quick]
"""

from __future__ import annotations

import argparse
import copy
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--search-evals", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256, help="calibration/eval window length")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=512, help="prefill length for wall time")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.train_steps, args.search_evals, args.eval_windows, args.reps, args.seq = 1, 3, 2, 2, 128
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    dense = capture(model)
    calib = torch.cat([token_windows(tok, "calib", args.seq, 6), token_windows(tok, "heldout", args.seq, 1)])
    evalw = token_windows(tok, "eval", args.seq, args.eval_windows)
    print(f"[{time.perf_counter() - t0:.0f}s] captured; calibration {tuple(calib.shape)}, eval {tuple(evalw.shape)}")

    pruned = clone(dense)
    pruned.calibration = Calibration(calib, batch_size=2)
    cfg = PruneTokens(sparsity=args.sparsity, train_steps=args.train_steps, search_evals=args.search_evals,
                      refine_evals=2, heldout_fraction=1 / 7)
    result = run_passes(pruned, [cfg])[0]
    print(f"[{time.perf_counter() - t0:.0f}s] prune_tokens done in {result.seconds:.0f}s: {result.stats}")
    meta = pruned.metadata["prune_tokens"]

    # --- quality ---------------------------------------------------------------------------------------
    with torch.no_grad():
        ref_logits = [dense(b) for b in evalw.split(2)]
    rows = {"unpruned": {"ppl": perplexity(dense, evalw, batch_size=2), "kl": 0.0, "top1": 1.0, "flops": 1.0}}
    flops = prune_flops(meta, args.seq)
    rows["token router (FTP)"] = {**quality(pruned, evalw, ref_logits), "flops": flops["ratio"]}
    print(f"[{time.perf_counter() - t0:.0f}s] router quality {rows['token router (FTP)']}")

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
    ids = token_windows(tok, "eval", args.prefill, 1)
    keys, values = dense.empty_cache(1)
    with torch.no_grad():
        pt = median_times({"dense": lambda: dense.run(ids, keys, values), "pruned": lambda: pruned.run(ids, keys, values)},
                          args.reps)
    print(f"[{time.perf_counter() - t0:.0f}s] PyTorch prefill {pt}")
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{name}.onnx") for name in ("dense", "pruned")}
        export_onnx(dense, paths["dense"])
        export_onnx(pruned, paths["pruned"])
        sessions = {name: ort.InferenceSession(path, providers=["CPUExecutionProvider"]) for name, path in paths.items()}
        feeds = {}
        for name, sess in sessions.items():
            names = [i.name for i in sess.get_inputs()]
            feeds[name] = dict(zip(names, (ids.numpy(), keys.numpy(), values.numpy())))
        with torch.no_grad():
            pt_pruned = pruned.run(ids, keys, values)[0].numpy()
        ort_pruned = sessions["pruned"].run(None, feeds["pruned"])[0]
        parity = float(np.abs(ort_pruned - pt_pruned).max() / np.abs(pt_pruned).max())
        ort_times = median_times({n: (lambda n=n: sessions[n].run(None, feeds[n])) for n in sessions}, args.reps)
    print(f"[{time.perf_counter() - t0:.0f}s] ORT prefill {ort_times}, parity {parity:.2e}")

    prefill_flops = prune_flops(meta, args.prefill)
    write_report(args, result, meta, rows, flops, prefill_flops, pt, ort_times, parity, time.perf_counter() - t0)


def write_report(args, result, meta, rows, flops, prefill_flops, pt, ort_times, parity, seconds) -> None:
    lines = [
        "# Token pruning (prune_tokens) on SmolLM2-135M-Instruct",
        "",
        f"Command: `python benchmarks/bench_prune.py --sparsity {args.sparsity} --train-steps {args.train_steps} "
        f"--search-evals {args.search_evals}{' --quick' if args.quick else ''}` ({seconds / 60:.1f} min on this machine).",
        f"Calibration: 6 x {args.seq} tokens of \"calib\" (router), 1 x {args.seq} of \"heldout\" (schedule scoring); "
        f"quality on {args.eval_windows} x {args.seq} tokens of \"eval\". Mean token sparsity over all "
        f"{len(meta['schedule'])} blocks: {sum(meta['schedule']) / len(meta['schedule']):.3f}.",
        "",
        f"## Quality at the same FLOPs (prefill of {args.seq} tokens, lm_head included)",
        "",
        "| method | FLOPs ratio | perplexity | KL vs unpruned | top-1 agreement | dropped |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['flops']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {r.get('dropped', '')} |")
    lines += [
        "",
        f"## Prefill wall time, {args.prefill} tokens, batch 1 (median of {args.reps} interleaved runs)",
        "",
        "| runtime | unpruned (s) | pruned (s) | pruned / unpruned |",
        "| --- | --- | --- | --- |",
        f"| PyTorch (FX graph) | {pt['dense']:.3f} | {pt['pruned']:.3f} | {pt['pruned'] / pt['dense']:.3f} |",
        f"| ONNX Runtime (CPU) | {ort_times['dense']:.3f} | {ort_times['pruned']:.3f} | {ort_times['pruned'] / ort_times['dense']:.3f} |",
        "",
        f"FLOPs ratio at {args.prefill} tokens: {prefill_flops['ratio']:.3f}. ONNX Runtime vs PyTorch logits of the pruned "
        f"program: max relative difference {parity:.1e}.",
        "",
        "## Per block",
        "",
        "| block | sparsity | FLOPs saved in block |",
        "| --- | --- | --- |",
    ]
    for i, (s, saved) in enumerate(zip(meta["schedule"], flops["block_saved"])):
        lines.append(f"| {i} | {s:.3f} | {saved:.3f} |")
    stats = {k: v for k, v in result.stats.items() if k not in ("block_sparsity", "block_flops_saved")}
    lines += ["", "## Pass statistics", "", "```", *(f"{k}: {v}" for k, v in stats.items()), "```", "",
              "Notes: skipped tokens still write keys/values (k/v projections run on every token) so the KV cache "
              "stays whole and decoding is unchanged; FLOPs count the router, its probe queries and the k/v "
              "projections. ShortGPT drops whole blocks by Block Influence (1 - cos(in, out)); the sub-block "
              "baseline drops attention/MLP sub-blocks by their own Block Influence (BlockPruner ranks by "
              "perplexity instead). Each baseline drops units until its FLOPs are closest to the router's.", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, RESULTS)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
