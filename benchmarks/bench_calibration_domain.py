"""How much the calibration text's domain decides GPTQ's quality on held-out text (issue #16).

    python benchmarks/bench_calibration_domain.py --threads 1            # W4A16 g128, rotate + GPTQ
    python benchmarks/bench_calibration_domain.py --group-size 64 --calibrations python,mixed

The same recipe (Rotate(hadamard) + GPTQ W4 with act-order) is calibrated on 64 x 128 tokens of: "python"
(the Python HOWTOs, the peers table's protocol), "prose" (Luke, King James Bible) or "mixed" (32 windows of
each), and evaluated on both held-out texts (the Python tutorial; Genesis). Prints perplexity ratios to fp32,
and the 95% paired bootstrap over windows of each calibration against "python".
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

CALIBRATIONS = {"python": ("calib",), "prose": ("prose_calib",), "mixed": ("calib", "prose_calib")}
TEXTS = {"python": "eval", "prose": "prose_eval"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrations", default="python,prose,mixed", help=f"comma list of {', '.join(CALIBRATIONS)}")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    names = args.calibrations.split(",")
    unknown = [n for n in names if n not in CALIBRATIONS]
    if unknown or "python" not in names:
        parser.error(f"--calibrations: give some of {', '.join(CALIBRATIONS)}, python included (the baseline); "
                     f"unknown: {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import fxpress
    from fxpress.data import mixed_windows, token_windows
    from fxpress.models import load_smollm2
    from fxpress.passes import Quantize, Rotate
    from fxpress.passes.quantize import WeightQuant

    model, tokenizer = load_smollm2()
    evals = {text: token_windows(tokenizer, split, 256, args.eval_windows) for text, split in TEXTS.items()}
    reference = fxpress.compile(model, passes=[], progress=False)
    compiled = {}
    for name in names:
        passes = [Rotate(), Quantize(weights=WeightQuant(bits=4, group_size=args.group_size, method="gptq",
                                                         act_order=True))]
        calib = mixed_windows(tokenizer, CALIBRATIONS[name], args.calib_len, args.calib)
        compiled[name] = fxpress.compile(model, passes=passes, calibration=calib, progress=False)
    print(f"\nload average {os.getloadavg()}, W4A16 g{args.group_size}, rotate + GPTQ (act-order), calibration "
          f"{args.calib} x {args.calib_len}, eval {args.eval_windows} x 256")
    print("| calibration | text | ppl | x fp32 | minus python-calibrated [95%] |\n|---|---|---|---|---|")
    for text, windows in evals.items():
        for name, ppl, ratio, interval in paired_ppl_rows(reference, compiled, windows, "python"):
            print(f"| {name} | {text} | {ppl:.2f} | {ratio:.3f}x | {interval} |")


def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse `type=` for a comma list of `kind` ("4,8" -> [4, 8]); anything else is a usage error."""

    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"give numbers separated by commas, e.g. 4,8 (got {text!r})") from None

    return parse


def paired_ppl_rows(reference, compiled: dict, windows: torch.Tensor, *baselines: str) -> list[tuple]:
    """(name, perplexity, ratio to the fp32 `reference`, then per baseline the 95% paired bootstrap of the perplexity
    minus that baseline's, "-" against itself) for each compiled model on `windows`, in `compiled`'s order; the
    models are evaluated once, whatever the number of baselines."""
    from fxpress.evaluate import paired_bootstrap, window_metrics

    nll = {k: v["nll"] for k, v in window_metrics(reference, {"fp32": reference, **compiled}, windows).items()}
    fp = float(nll["fp32"].mean().exp())
    rows = []
    for name in compiled:
        ppl = float(nll[name].mean().exp())
        gaps = [paired_bootstrap(nll[name], nll[b]) if name != b else None for b in baselines]
        intervals = [f"{g['diff']:+.2f} [{g['lo']:+.2f}, {g['hi']:+.2f}]" if g else "-" for g in gaps]
        rows.append((name, ppl, ppl / fp, *intervals))
    return rows


if __name__ == "__main__":
    main()
