"""Cross-runtime parity of low-bit-activation SmolLM2: ONNX Runtime and TVM against the PyTorch program.

For each activation width (A16, A8, A4 with KV4; weights W4, rotation + fold_hadamard) and each compute
precision (float32, and float64 through the `Precision` pass) the script prints the argmax agreement and
relative logit error of the exported artifacts on real eval text, beside a PyTorch-only noise floor: the
same program with ONE weight-scale tensor of layer 0 nudged by one ulp of the compute precision
(x (1 + 2^-23) in float32, x (1 + 2^-52) in float64). Per-token 4-bit activations turn any last-bit
difference upstream of a quantizer (a different summation order in a matmul, a norm or the Hadamard) into
a flipped code, a full quantization step, and the flips cascade through the layers and, through the KV
cache, along the sequence: in float32 the runtimes disagree as much as the noise floor says; in float64
the differences are ~1e-16 relative and the codes agree. `--decode` adds per-token decode latency (batch 1,
KV cache) of each artifact.

    python benchmarks/bench_act_parity.py --threads 1                       # A4 and A8, ORT and TVM, fp32
    python benchmarks/bench_act_parity.py --a-bits 4 --precision float32,float64 --windows 4 --seq-len 128
    python benchmarks/bench_act_parity.py --a-bits 4 --precision float32,float64 --recipe gptq --decode
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

LINEAR_NBIT = "linear_nbit"
ULP = {"float32": 2.0**-23, "float64": 2.0**-52}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="onnx,tvm")
    ap.add_argument("--a-bits", default="4,8", help="comma list of activation bits (16: weights only)")
    ap.add_argument("--precision", default="float32", help="comma list of compute precisions: float32, float64")
    ap.add_argument("--recipe", default="rtn", choices=("rtn", "gptq"),
                    help="rtn: W4 RTN g128, fixed clips; gptq: the demo's GPTQ act-order + searched clips")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 128 tokens (gptq recipe)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rotation", default="hadamard")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode", action="store_true", help="also time per-token decode (batch 1, KV cache)")
    return ap.parse_args(argv)


def build(base, a_bits: int, rotation: str, recipe: str = "rtn", calib=None):
    """W4 + A`a_bits` (+ KV4 at 4 bits) on a rotated copy of `base`: RTN, or the demo's GPTQ recipe."""
    from fxpress.calibration import Calibration
    from fxpress.passes import FoldHadamard, Quantize, Rotate, run_passes
    from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant

    program = copy.deepcopy(base)
    low = a_bits <= 4
    passes = [] if rotation == "none" else [Rotate(mode=rotation, seed=0), FoldHadamard()]
    a = None if a_bits >= 16 else a_bits
    if recipe == "gptq":
        program.calibration = Calibration(calib)
        passes.append(Quantize(weights=WeightQuant(bits=4, method="gptq", act_order=True),
                               activations=ActQuant(bits=a, clip_search=a is not None, symmetric=False),
                               kv_cache=KVQuant(bits=4 if low else None, clip_ratio=0.95)))
    else:
        passes.append(Quantize(weights=WeightQuant(bits=4),
                               activations=ActQuant(bits=a, clip_ratio=0.8 if low else 1.0, symmetric=not low),
                               kv_cache=KVQuant(bits=4 if low else None, clip_ratio=0.95)))
    run_passes(program, passes, progress=False)
    return program


def with_precision(program, precision: str):
    """The program itself (float32) or a float64 copy (the Precision pass)."""
    if precision == "float32":
        return program
    from fxpress.passes import Precision, run_passes

    out = copy.deepcopy(program)
    run_passes(out, [Precision(dtype=precision)], progress=False)
    return out


def scores(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    ref, out = ref.double(), out.double()
    return {"agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "rel": float((out - ref).norm() / ref.norm()),
            "max": float((out - ref).abs().max() / ref.abs().max())}


def noise_floor(program, windows: torch.Tensor, ref: torch.Tensor, ulp: float) -> dict[str, float]:
    """The program with the first packed linear's scales nudged by one ulp."""
    from fxpress import graph as G

    nudged = copy.deepcopy(program)
    first = next(n for n in nudged.graph.nodes if n.op == "call_function" and LINEAR_NBIT in str(n.target))
    scales = G.get_param(nudged.module, first.args[2]).detach()
    G.set_param(nudged.module, first.args[2], scales * (1 + ulp))
    with torch.no_grad():
        return scores(ref, nudged(windows))


def decode_ms(runner, ids: torch.Tensor, steps: int = 16) -> float:
    """Median milliseconds per decoded token at batch 1 after a prefill of `ids` (one row)."""
    logits, keys, values = runner.step(ids[:1], *runner.empty_cache(1))
    token = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, keys, values = runner.step(token, keys, values)
        times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
    return 1000 * sorted(times)[len(times) // 2]


def export_and_load(program, target: str, tmp: Path, threads: int):
    if target == "onnx":
        from fxpress.lowering.onnx import export_onnx
        from fxpress.runtime.runners import OnnxRunner

        export_onnx(copy.deepcopy(program), tmp / "m.onnx")
        return OnnxRunner(tmp / "m.onnx", threads=threads)
    from fxpress.lowering.tvm import export_tvm
    from fxpress.runtime.runners import TvmRunner

    export_tvm(copy.deepcopy(program), tmp / "tvm")
    return TvmRunner(tmp / "tvm")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from fxpress.capture import capture
    from fxpress.data import token_windows
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    base = capture(model, source="smollm2")
    del model
    windows = token_windows(tokenizer, "eval", args.seq_len, args.windows)
    calib = token_windows(tokenizer, "calib", 128, args.calib) if args.recipe == "gptq" else None
    targets = args.targets.split(",")
    rows = []
    for a_bits in (int(b) for b in args.a_bits.split(",")):
        start = time.perf_counter()
        quantized = build(base, a_bits, args.rotation, args.recipe, calib)
        print(f"W4A{a_bits} built in {time.perf_counter() - start:.0f} s", flush=True)
        for precision in args.precision.split(","):
            program = with_precision(quantized, precision)
            with torch.no_grad():
                ref = program(windows)
            row = {"setting": f"W4A{a_bits}" + ("KV4" if a_bits <= 4 else ""), "precision": precision,
                   "torch 1-ulp": noise_floor(program, windows, ref, ULP[precision])}
            print(row["setting"], precision, "torch 1-ulp", row["torch 1-ulp"], flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                for target in targets:
                    start = time.perf_counter()
                    runner = export_and_load(program, target, Path(tmp), args.threads)
                    row[target] = scores(ref, runner(windows))
                    row[target]["seconds"] = round(time.perf_counter() - start)
                    if args.decode:
                        row[target]["decode_ms"] = decode_ms(runner, windows)
                    del runner
                    print(row["setting"], precision, target, row[target], flush=True)
            rows.append(row)
            del program
    print_table(rows, targets, args)


def print_table(rows: list[dict], targets: list[str], args: argparse.Namespace) -> None:
    cols = ["torch 1-ulp", *targets]
    recipe = "W4 RTN g128" if args.recipe == "rtn" else f"W4 GPTQ g128 act-order, searched clips, {args.calib}x128 calib"
    print(f"\n{args.windows} x {args.seq_len} eval tokens, rotation {args.rotation}, {recipe}\n")
    print("| setting | precision | " + " | ".join(f"{c} argmax agreement / rel. error / max rel. error" for c in cols)
          + (" | " + " | ".join(f"{t} decode ms/token" for t in targets) if args.decode else "") + " |")
    print("|---|---|" + "---|" * (len(cols) + (len(targets) if args.decode else 0)))
    for row in rows:
        cells = [f"{row[c]['agree']:.4f} / {row[c]['rel']:.1e} / {row[c]['max']:.1e}" for c in cols]
        if args.decode:
            cells += [f"{row[t]['decode_ms']:.1f}" for t in targets]
        print(f"| {row['setting']} | {row['precision']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
