"""Quality of quantized SmolLM2: perplexity, KL divergence and top-1 agreement against the fp model.

Rows W8A8, W6A6, W4A8, W4A4, W4A4KV4 (every linear but lm_head); columns rotation none / hadamard /
orthogonal / dfrot / learned (`Rotate` + `FoldHadamard`), weights RTN and GPTQ. Perplexity over fixed
non-overlapping windows of the "eval" split, GPTQ calibrated on the disjoint "calib" split. A second
table shows W4 weight-only at several group sizes: SmolLM2 ships as Q4_1 (4-bit, blocks of 32), so
g32 sits on the grid the weights came from, and the main table uses g128 (or what --group-size says).

    python benchmarks/bench_quality.py              # full: 16 x 256 eval tokens, GPTQ on 64 x 128 calib
    python benchmarks/bench_quality.py --quick      # 4 x 256 eval, 8 x 128 calib, rotation none+hadamard
    python benchmarks/bench_quality.py --out benchmarks/results/quality.md
    python benchmarks/bench_quality.py --eval-split prose_eval   # the second text (prose, another domain)
    # the W4A4KV4 headline: asymmetric per-token activations with a clip ratio searched per quantizer
    python benchmarks/bench_quality.py --threads 1 --rows W4A4KV4 --act-clip-search --act-asym --clip-ratio 1.0 \
        --no-group-table --rotations dfrot,hadamard,orthogonal --methods gptq --out /tmp/q.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS = {"W8A8": (8, 8, None), "W6A6": (6, 6, None), "W4A8": (4, 8, None), "W4A4": (4, 4, None), "W4A4KV4": (4, 4, 4),
        "W16A4KV4": (None, 4, 4)}  # activations and KV only: what rotation 'learned' is trained on
ROTATIONS = ("none", "hadamard", "orthogonal", "dfrot", "learned")
METHODS = ("rtn", "gptq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run: 4 eval windows, 8 calib windows, none+hadamard")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--eval-split", default="eval", choices=("eval", "prose_eval"),
                    help="evaluation text: the Python tutorial, or Genesis (King James Bible, held out by domain)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=None)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128, help="weight group size for the main table (-1 per channel)")
    ap.add_argument("--clip-ratio", type=float, default=0.8,
                    help="activation clip ratio at 4 bits (1.0 above); 0.8 beat 0.9 and 1.0 on SmolLM2 with hadamard")
    ap.add_argument("--kv-clip-ratio", type=float, default=0.95)
    ap.add_argument("--act-clip-search", action="store_true",
                    help="search each activation quantizer's clip ratio (<= --clip-ratio) on the calibration set")
    ap.add_argument("--act-asym", action="store_true", help="asymmetric activations (integer zero point per token)")
    ap.add_argument("--learned-steps", type=int, default=100, help="Cayley steps of rotation 'learned' (SpinQuant)")
    ap.add_argument("--learned-lr", type=float, default=2e-3)
    ap.add_argument("--no-act-order", action="store_true", help="GPTQ without act-order")
    ap.add_argument("--rows", default="W8A8,W6A6,W4A8,W4A4,W4A4KV4", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--rotations", default=None, help=f"comma list of {', '.join(ROTATIONS)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-group-table", action="store_true", help="skip the W4 group-size table")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the markdown tables here (atomically), results beside as .json")
    ap.add_argument("--merge", nargs="+", default=None, help="only merge the .json results of earlier runs into --out")
    args = ap.parse_args(argv)
    args.eval_windows = args.eval_windows or (4 if args.quick else 16)
    args.calib_windows = args.calib_windows or (8 if args.quick else 64)
    args.rotations = args.rotations or ("none,hadamard" if args.quick else ",".join(ROTATIONS))
    return args


class Reference:
    """The fp model's log-probabilities per eval batch (kept in float16), to score every variant against."""

    def __init__(self, program, windows: torch.Tensor, batch_size: int):
        self.batches = list(windows.split(batch_size))
        self.logprobs = []
        with torch.no_grad():
            for batch in self.batches:
                self.logprobs.append(F.log_softmax(program(batch).float(), -1).half())

    def score(self, program) -> dict[str, float]:
        nll, kl, agree, tokens, positions = 0.0, 0.0, 0, 0, 0
        with torch.no_grad():
            for batch, ref in zip(self.batches, self.logprobs):
                logp = F.log_softmax(program(batch).float(), -1)
                nll += float(F.nll_loss(logp[:, :-1].reshape(-1, logp.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
                tokens += batch[:, 1:].numel()
                ref = ref.float()
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
                positions += batch.numel()
        return {"ppl": math.exp(nll / tokens), "kl": kl / positions, "top1": agree / positions}


def rotated(base, rotation: str, seed: int, args=None):
    """A copy of the captured program with the rotation passes applied (none: a plain copy). `learned` trains
    with the row's quantizers: 4-bit per-token activations (asymmetric with --act-asym) and the 4-bit KV clip."""
    from fxpress.passes import run_passes

    program = copy.deepcopy(base)
    if rotation == "none":
        return program, {}
    from fxpress.passes.fold_hadamard.fold_hadamard import FoldHadamard
    from fxpress.passes.rotate.rotate import Rotate

    extra = {}
    if rotation == "learned" and args is not None:
        extra = {"learned_steps": args.learned_steps, "learned_lr": args.learned_lr,
                 "learned_act_asym": bool(getattr(args, "act_asym", False)), "learned_kv_clip": args.kv_clip_ratio}
    results = run_passes(program, [Rotate(mode=rotation, seed=seed, **extra), FoldHadamard()], progress=False)
    secs: dict = {r.name: round(r.seconds, 1) for r in results}
    if rotation == "learned":
        secs["learned"] = results[0].stats["learned"]
        print(f"learned: {secs['learned']}", flush=True)
    return program, secs


def quantize_cell(program, row: str, method: str, args) -> tuple[object, dict]:
    from fxpress.passes import Quantize, run_passes
    from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant

    w, a, kv = ROWS[row]
    q = copy.deepcopy(program)
    cfg = Quantize(weights=WeightQuant(bits=w, group_size=args.group_size, method=method, act_order=method == "gptq" and w is not None and not args.no_act_order, seed=args.seed),
                   activations=ActQuant(bits=a, clip_ratio=args.clip_ratio if a <= 4 else 1.0, clip_search=getattr(args, "act_clip_search", False) and a <= 4, symmetric=not getattr(args, "act_asym", False)),
                   kv_cache=KVQuant(bits=kv, clip_ratio=args.kv_clip_ratio))
    result = run_passes(q, [cfg], progress=False)[0]
    return q, {"seconds": round(result.seconds, 1), "bytes_before": result.bytes_before, "bytes_after": result.bytes_after}


def group_table(base, reference: Reference, args) -> list[dict]:
    """W4 weight-only RTN at several group sizes, asymmetric and without clipping search: the weight error
    against the stored (Q4_1-dequantized) weights and the perplexity."""
    from fxpress import graph as G
    from fxpress.passes import Quantize, run_passes
    from fxpress.passes.quantize import WeightQuant
    from fxpress.passes.quantize.gptq import WeightSpec, rtn

    weights = [G.get_param(base.module, u.weight) for u in G.linear_uses(base.graph) if "lm_head" not in u.name]
    rows = []
    for group in (32, 64, 128, -1):
        spec = WeightSpec(4, group, symmetric=False, clip_search=False)
        err = max(float((rtn(w, spec).dequantize() - w.detach()).norm() / w.detach().norm()) for w in weights)
        q = copy.deepcopy(base)
        run_passes(q, [Quantize(weights=WeightQuant(bits=4, group_size=group, clip_search=False))], progress=False)
        rows.append({"group": group, "max_rel_weight_error": err, **reference.score(q)})
        print(f"  W4A16 g{group}: weight rel err {err:.2e}  ppl {rows[-1]['ppl']:.3f}", flush=True)
        del q
    return rows


def markdown(results: dict, args, command: str, seconds: float) -> str:
    fp = results["fp"]
    cols = [(r, m) for r in args.rotations.split(",") for m in args.methods.split(",")]
    head = "| | " + " | ".join(f"{r} {m.upper()}" for r, m in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    out = [f"# SmolLM2-135M-Instruct quantization quality\n\nCommand: `{command}` ({seconds / 60:.1f} min, "
           f"{getattr(args, 'threads', None) or torch.get_num_threads()} torch threads per process)\n",
           f"Eval: {args.eval_windows} windows x {args.seq_len} tokens of the \"{getattr(args, 'eval_split', 'eval')}\" split "
           f"({'Genesis, King James Bible' if getattr(args, 'eval_split', 'eval') == 'prose_eval' else 'Python tutorial'}); "
           f"GPTQ calibration: {args.calib_windows} x {args.calib_len} tokens of \"calib\" (HOWTOs); weights "
           f"asymmetric, group size {args.group_size} (576 = 4.5 x 128: each row's last group has 64 columns), "
           f"GPTQ with act-order {'off' if args.no_act_order else 'on'}, clipping search on; activations "
           f"{'asymmetric' if getattr(args, 'act_asym', False) else 'symmetric'} per token ("
           + (f"clip ratio searched per quantizer on the calibration set, at most {args.clip_ratio}, at 4 bits"
              if getattr(args, "act_clip_search", False) else f"clip {args.clip_ratio} at 4 bits")
           + f"); KV asymmetric per token and head "
           f"(clip {args.kv_clip_ratio}); lm_head and the embedding stay fp32.\n",
           f"fp32: perplexity **{fp['ppl']:.3f}**" + "".join(
               f"; rotated ({r}) fp32 {v['ppl']:.3f}" for r, v in results.get("rotated_fp", {}).items()) + "\n"]
    for metric, title, fmt in (("ppl", "Perplexity (lower is better)", "{:.2f}"),
                               ("kl", "KL(fp || quantized) per token, nats", "{:.4f}"),
                               ("top1", "Top-1 agreement with fp", "{:.3f}")):
        lines = [f"\n## {title}\n\n", head]
        for row in args.rows.split(","):
            cells = []
            for r, m in cols:
                cell = results["cells"].get(f"{row}/{r}/{m}")
                cells.append("n/a" if cell is None else fmt.format(cell[metric]))
            lines.append(f"| {row} | " + " | ".join(cells) + " |\n")
        out.append("".join(lines))
    if results.get("groups"):
        out.append("\n## W4 weight-only (A16) RTN by group size, no rotation, no clipping search\n\n"
                   "SmolLM2 was distributed as GGUF Q4_1 (4-bit, blocks of 32, float scale and float minimum), "
                   "so its fp32 weights lie on a 16-level grid per block of 32. fxpress stores integer zero points "
                   "(MatMulNBits' packed uint8 layout), which cannot represent every Q4_1 minimum, so g32 comes close "
                   "to but not exactly onto the stored grid; g64 and above must really quantize, which is why the "
                   "main table uses g128.\n\n| group | max relative weight error | perplexity | KL | top-1 |\n|---|---|---|---|---|\n")
        for g in results["groups"]:
            name = "per channel" if g["group"] == -1 else f"g{g['group']}"
            out.append(f"| {name} | {g['max_rel_weight_error']:.2e} | {g['ppl']:.3f} | {g['kl']:.4f} | {g['top1']:.3f} |\n")
    return "".join(out)


def summary(results: dict, args) -> str:
    """The issue's acceptance checks, read off the table."""
    fp, cells = results["fp"]["ppl"], results["cells"]
    lines = ["\n## Summary\n\n"]
    rotated = [(k, v) for k, v in cells.items() if k.startswith("W4A4KV4/") and "/none/" not in k and k.endswith("/gptq")]
    if rotated:
        key, best = min(rotated, key=lambda kv: kv[1]["ppl"])
        lines.append(f"- W4A4KV4 with rotation and GPTQ: best {best['ppl']:.2f} ({key.split('/')[1]}) = "
                     f"{best['ppl'] / fp:.2f}x fp ({fp:.2f}); the 2x bound is {2 * fp:.2f}, "
                     f"{'met' if best['ppl'] <= 2 * fp else 'NOT met'} by {abs(2 * fp - best['ppl']):.2f}. All rotated W4A4KV4 GPTQ: "
                     + ", ".join(f"{k.split('/')[1]} {v['ppl']:.2f}" for k, v in rotated) + ".\n")
    for method in ("rtn", "gptq"):
        cell = cells.get(f"W4A4/none/{method}")
        if cell:
            lines.append(f"- W4A4 without rotation, {method.upper()}: {cell['ppl']:.2f} = {cell['ppl'] / fp:.1f}x fp.\n")
    pairs = [(k, v["ppl"], cells[k[:-3] + "gptq"]["ppl"]) for k, v in cells.items()
             if k.endswith("/rtn") and k[:-3] + "gptq" in cells]
    if pairs:
        wins = sum(1 for _, r, g in pairs if g < r)
        lines.append(f"- GPTQ beats RTN in {wins} of {len(pairs)} cells (perplexity).\n")
    return "".join(lines)


def merge(paths: list[str]) -> tuple[dict, argparse.Namespace, str, float]:
    """Combine the .json of runs that split the rotations between processes."""
    merged: dict = {"cells": {}, "rotated_fp": {}, "rotation_seconds": {}}
    rotations, rows, methods, commands, seconds, args = [], set(), set(), [], 0.0, None
    for path in paths:
        data = json.loads(Path(path).read_text())
        res, run_args = data["results"], argparse.Namespace(**data["args"])
        args = args or run_args
        merged["fp"] = res["fp"]
        for key in ("cells", "rotated_fp", "rotation_seconds"):
            merged[key].update(res[key])
        if res.get("groups"):
            merged["groups"] = res["groups"]
        rotations += [r for r in run_args.rotations.split(",") if r not in rotations]
        rows |= set(run_args.rows.split(","))
        methods |= set(run_args.methods.split(","))
        commands.append(data["command"])
        seconds = max(seconds, data["seconds"])
    args.rotations = ",".join(r for r in ROTATIONS if r in rotations)
    args.rows = ",".join(r for r in ROWS if r in rows)
    args.methods = ",".join(m for m in METHODS if m in methods)
    return merged, args, " & ".join(commands) + " (run in parallel, then merged with --merge)", seconds


def write_atomic(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        results, run_args, command, seconds = merge(args.merge)
        text = markdown(results, run_args, command, seconds) + summary(results, run_args)
        print(text)
        if args.out:
            write_atomic(args.out, text)
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from fxpress.calibration import Calibration
    from fxpress.capture import capture
    from fxpress.data import token_windows
    from fxpress.models import load_smollm2

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    base = capture(model, source="smollm2")
    del model
    base.calibration = Calibration(token_windows(tokenizer, "calib", args.calib_len, args.calib_windows))
    windows = token_windows(tokenizer, args.eval_split, args.seq_len, args.eval_windows)
    reference = Reference(base, windows, args.batch_size)
    results: dict = {"fp": reference.score(base), "rotated_fp": {}, "cells": {}, "rotation_seconds": {}}
    print(f"fp32 ppl {results['fp']['ppl']:.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)
    if not args.no_group_table:
        results["groups"] = group_table(base, reference, args)
    for rotation in args.rotations.split(","):
        program, secs = rotated(base, rotation, args.seed, args)
        results["rotation_seconds"][rotation] = secs
        if rotation != "none":
            results["rotated_fp"][rotation] = reference.score(program)
            print(f"{rotation}: rotated fp32 ppl {results['rotated_fp'][rotation]['ppl']:.3f} {secs}", flush=True)
        for row in args.rows.split(","):
            for method in args.methods.split(","):
                q, info = quantize_cell(program, row, method, args)
                score = reference.score(q)
                results["cells"][f"{row}/{rotation}/{method}"] = {**score, **info}
                print(f"{row:8s} {rotation:10s} {method:4s} ppl {score['ppl']:9.3f}  kl {score['kl']:.4f}  "
                      f"top1 {score['top1']:.3f}  (quantize {info['seconds']}s, total {time.perf_counter() - start:.0f}s)",
                      flush=True)
                del q
                save(results, args, argv, start)
        del program
    text = save(results, args, argv, start)
    print(text)
    return results


def save(results: dict, args, argv: list[str] | None, start: float) -> str:
    """Write the markdown and the .json beside it (after every cell, so a long run keeps what it measured)."""
    seconds = time.perf_counter() - start
    command = ("python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    text = markdown(results, args, command, seconds) + summary(results, args)
    if args.out:
        write_atomic(args.out, text)
        payload = {"args": {k: v for k, v in vars(args).items() if k != "merge"}, "results": results,
                   "command": command, "seconds": seconds}
        write_atomic(str(Path(args.out).with_suffix(".json")), json.dumps(payload, indent=1))
    return text


if __name__ == "__main__":
    main()
