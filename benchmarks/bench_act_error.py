"""GPTQ that corrects its input quantizer's error (`WeightQuant(correct_act_error=True)`, issue #16), on `make demo`'s
W4A4KV4 recipe, by ridge.

    python benchmarks/bench_act_error.py                       # off against ridges 1, 3 (the default) and 10
    python benchmarks/bench_act_error.py --ridges 0.3,3 --threads 1

Each variant is the demo's recipe (examples/demo.py: hadamard + GPTQ W4 g128 act-order + A4 per token with clip
search + KV4, 64 x 128 tokens of HOWTOs + Luke) with the option off or at one `act_error_ridge`. Evaluated on four
texts, 16 x 256 tokens each: the two evaluation texts (Python tutorial, Genesis) and the two held-out texts the
ridge is chosen on (the Python FAQ, Acts), never the evaluation texts. Prints perplexity ratios to fp32, the 95%
paired bootstrap over windows of each variant's perplexity minus "off", and each compile's seconds, side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
from bench_calibration_domain import comma_list, paired_ppl_rows
from bench_compile import demo_passes

TEXTS = {"python": "eval", "prose": "prose_eval", "python held-out": "heldout", "prose held-out": "prose_heldout"}


def variant_passes(rotation: str, ridge: float | None) -> list:
    """The demo's passes, its weight quantizer with `correct_act_error` off (None) or at `ridge`."""
    from fxpress.passes import Quantize

    passes = demo_passes(rotation)
    for i, p in enumerate(passes):
        if isinstance(p, Quantize):
            weights = dataclasses.replace(p.weights, correct_act_error=ridge is not None, act_error_ridge=ridge or 3.0)
            passes[i] = dataclasses.replace(p, weights=weights)
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ridges", type=comma_list(float), default="1,3,10",
                        help="comma list of act_error_ridge values (off always runs)")
    parser.add_argument("--rotation", default="hadamard")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fxpress
    from fxpress.data import MIXED_CALIB, mixed_windows, token_windows
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    calib = mixed_windows(tokenizer, MIXED_CALIB, 128, 64)  # as examples/demo.py
    reference = fxpress.compile(model, passes=[], progress=False)
    compiled, seconds = {}, {}
    for ridge in [None, *args.ridges]:
        name = "off" if ridge is None else f"ridge {ridge:g}"
        start = time.perf_counter()
        compiled[name] = fxpress.compile(model, passes=variant_passes(args.rotation, ridge), calibration=calib,
                                         progress=False)
        seconds[name] = time.perf_counter() - start
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}, W4A4KV4 ({args.rotation}), "
          f"eval {args.eval_windows} x 256 per text")
    print("| variant | compile s | text | ppl | x fp32 | minus off [95%] |\n|---|---|---|---|---|---|")
    for text, split in TEXTS.items():
        windows = token_windows(tokenizer, split, 256, args.eval_windows)
        for name, ppl, ratio, interval in paired_ppl_rows(reference, compiled, windows, "off"):
            print(f"| {name} | {seconds[name]:.0f} | {text} | {ppl:.2f} | {ratio:.3f}x | {interval} |")


if __name__ == "__main__":
    main()
