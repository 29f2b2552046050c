"""Cross-runtime parity of low-bit-activation SmolLM2: ONNX Runtime and TVM against the PyTorch program.

For each activation width (A16, A8, A4 with KV4; weights W4 RTN g128, rotation + fold_hadamard) the script
prints the argmax agreement and relative logit error of the exported artifacts on real eval text, beside a
PyTorch-only noise floor: the same program with ONE weight-scale tensor of layer 0 nudged by one ulp
(x (1 + 2^-23)). Per-token 4-bit activations turn any last-bit difference upstream of a quantizer (a
different summation order in a matmul, a norm or the Hadamard) into a flipped code, a full quantization
step, and the flips cascade through the layers and, through the KV cache, along the sequence; the noise
floor shows how much of the runtimes' disagreement that alone explains.

    python benchmarks/bench_act_parity.py --threads 1                       # A4 and A8, ORT and TVM
    python benchmarks/bench_act_parity.py --targets onnx --a-bits 4 --windows 4 --seq-len 64
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

LINEAR_NBIT = "linear_nbit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="onnx,tvm")
    ap.add_argument("--a-bits", default="4,8", help="comma list of activation bits (16: weights only)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rotation", default="hadamard")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def build(base, a_bits: int, rotation: str):
    """W4 RTN g128 + A`a_bits` (+ KV4 at 4 bits) on a rotated copy of `base`."""
    from fxpress.passes import FoldHadamard, Quantize, Rotate, run_passes

    program = copy.deepcopy(base)
    low = a_bits <= 4
    passes = [] if rotation == "none" else [Rotate(mode=rotation, seed=0), FoldHadamard()]
    passes.append(Quantize(w_bits=4, a_bits=None if a_bits >= 16 else a_bits, kv_bits=4 if low else None,
                           clip_ratio=0.8 if low else 1.0, kv_clip_ratio=0.95, act_symmetric=not low))
    run_passes(program, passes, progress=False)
    return program


def scores(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    return {"agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "rel": float((out - ref).norm() / ref.norm())}


def noise_floor(program, windows: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """The program with the first packed linear's scales nudged by one ulp."""
    from fxpress import graph as G

    nudged = copy.deepcopy(program)
    first = next(n for n in nudged.graph.nodes if n.op == "call_function" and LINEAR_NBIT in str(n.target))
    scales = G.get_param(nudged.module, first.args[2]).detach()
    G.set_param(nudged.module, first.args[2], scales * (1 + 2.0**-23))
    with torch.no_grad():
        return scores(ref, nudged(windows))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from fxpress.capture import capture
    from fxpress.data import token_windows
    from fxpress.models import load_smollm2
    from fxpress.runtime.runners import OnnxRunner, TvmRunner

    model, tokenizer = load_smollm2()
    base = capture(model, source="smollm2")
    del model
    windows = token_windows(tokenizer, "eval", args.seq_len, args.windows)
    rows = []
    for a_bits in (int(b) for b in args.a_bits.split(",")):
        program = build(base, a_bits, args.rotation)
        with torch.no_grad():
            ref = program(windows)
        row = {"setting": f"W4A{a_bits}" + ("KV4" if a_bits <= 4 else ""), "torch 1-ulp": noise_floor(program, windows, ref)}
        with tempfile.TemporaryDirectory() as tmp:
            for target in args.targets.split(","):
                start = time.perf_counter()
                if target == "onnx":
                    from fxpress.lowering.onnx import export_onnx

                    export_onnx(copy.deepcopy(program), Path(tmp) / "m.onnx")
                    runner = OnnxRunner(Path(tmp) / "m.onnx", threads=args.threads)
                else:
                    from fxpress.lowering.tvm import export_tvm

                    export_tvm(copy.deepcopy(program), Path(tmp) / "tvm")
                    runner = TvmRunner(Path(tmp) / "tvm")
                row[target] = scores(ref, runner(windows))
                row[target]["seconds"] = round(time.perf_counter() - start)
                print(row["setting"], target, row[target], flush=True)
        rows.append(row)
        print(row, flush=True)
    cols = ["torch 1-ulp", *args.targets.split(",")]
    print(f"\n{args.windows} x {args.seq_len} eval tokens, rotation {args.rotation}, W4 RTN g128\n")
    print("| setting | " + " | ".join(f"{c} argmax agreement / rel. error" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in rows:
        print(f"| {row['setting']} | " + " | ".join(f"{row[c]['agree']:.3f} / {row[c]['rel']:.2e}" for c in cols) + " |")


if __name__ == "__main__":
    main()
