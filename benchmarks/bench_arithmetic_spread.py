"""How far rounding alone moves the demo's W4A4KV4 perplexity: the same recipe, the calibration cut into chunks of
different sizes (issue #16's 1.5x goal is judged on single compiles, so its noise floor matters).

    python benchmarks/bench_arithmetic_spread.py                   # chunks of 4 (the default) and 8 windows
    python benchmarks/bench_arithmetic_spread.py --chunks 2,4,8

The chunk size changes only the order in which GPTQ's per-chunk float32 products are summed (in float64) and the
shapes of the calibration forward's GEMMs: the same mathematics, different last bits. At 4-bit activations a flipped
code cascades through the layers, so the spread of these rows is a floor under which two W4A4KV4 recipes cannot be
told apart from one compile each. 16 x 256 tokens per evaluation text; brackets: 95% paired bootstrap over windows
against the first chunk size.
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_calibration_domain import TEXTS, comma_list, paired_ppl_rows
from bench_compile import demo_passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=comma_list(int), default="4,8",
                        help="comma list of calibration windows per chunk")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fxpress
    from fxpress.calibration import Calibration
    from fxpress.data import MIXED_CALIB, mixed_windows, token_windows
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    windows = mixed_windows(tokenizer, MIXED_CALIB, 128, 64)  # as examples/demo.py
    reference = fxpress.compile(model, passes=[], progress=False)
    compiled = {f"chunks of {c}": fxpress.compile(model, passes=demo_passes("hadamard"), progress=False,
                                                  calibration=Calibration(windows, batch_size=c)) for c in args.chunks}
    first = next(iter(compiled))
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}, the demo's W4A4KV4 recipe, "
          f"eval {args.eval_windows} x 256 per text")
    print(f"| calibration | text | ppl | x fp32 | minus {first} [95%] |\n|---|---|---|---|---|")
    for text, split in TEXTS.items():
        rows = paired_ppl_rows(reference, compiled, token_windows(tokenizer, split, 256, args.eval_windows), first)
        for name, ppl, ratio, interval in rows:
            print(f"| {name} | {text} | {ppl:.2f} | {ratio:.3f}x | {interval} |")


if __name__ == "__main__":
    main()
