"""Mixed-precision activations under an average-bits budget (`ActQuant(avg_bits=...)`, issue #16), on `make demo`'s
W4A4KV4 recipe.

    python benchmarks/bench_act_bits.py                         # uniform A4 against budgets 4.25, 4.5, 4.7, 5 and the hand rule
    python benchmarks/bench_act_bits.py --budgets 4.5 --threads 1

Each variant is the demo's recipe (examples/demo.py: hadamard + GPTQ W4 g128 act-order with correct_act_error + A4
per token with clip search + KV4, 64 x 128 tokens of HOWTOs + Luke) with its activation quantizers all at 4 bits
("uniform"), or mixed 4/8 under an average of `avg_bits` per quantized activation element, chosen by the pass's
sensitivity measurement. "gate/up rule" raises the inputs of every gate/up projection instead (the quantizers the
README names as the costliest at 4 bits): the hand-made allocation the measured one must beat at a like budget.
Evaluated on both evaluation texts (16 x 256 tokens each); prints perplexity ratios to fp32, the 95% paired
bootstrap over windows of each variant minus "uniform", each compile's seconds and which kinds of quantizer went up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections import Counter
from unittest import mock

import torch
from bench_calibration_domain import TEXTS, comma_list, paired_ppl_rows
from bench_compile import demo_passes

GATE_UP_AVG_BITS = 8.0  # the rule's budget only bounds the search; the rule itself decides which go up


def variant_passes(avg_bits: float | None) -> list:
    """The demo's passes with the activation quantizers uniform (None) or mixed under `avg_bits`."""
    from fxpress.passes import Quantize

    passes = demo_passes("hadamard")
    for i, p in enumerate(passes):
        if isinstance(p, Quantize):
            passes[i] = dataclasses.replace(p, activations=dataclasses.replace(p.activations, avg_bits=avg_bits))
    return passes


def reader_kind(node) -> str:
    """What a quantizer feeds, by the weight name of its first reader: q/k/v, o, gate/up or down."""
    name = str(next(iter(node.users)).args[1].target)
    return next((kind for kind in ("q_proj", "o_proj", "gate_proj", "down_proj") if kind in name), name)


def gate_up_rule(sensitivity, low: int, high: int, avg_bits: float) -> set:
    """The hand rule: every quantizer read by a gate projection goes up, whatever it measured."""
    return {node for node in sensitivity if reader_kind(node) == "gate_proj"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=comma_list(float), default="4.25,4.5,4.7,5",
                        help="comma list of avg_bits values (uniform always runs)")
    parser.add_argument("--no-rule", action="store_true", help="skip the gate/up hand rule")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fxpress
    from fxpress.data import MIXED_CALIB, mixed_windows, token_windows
    from fxpress.models import load_smollm2
    from fxpress.passes.quantize import act_bits

    model, tokenizer = load_smollm2()
    calib = mixed_windows(tokenizer, MIXED_CALIB, 128, 64)  # as examples/demo.py
    reference = fxpress.compile(model, passes=[], progress=False)
    variants = {"uniform": None} | {f"avg {b:g}": b for b in args.budgets}
    if not args.no_rule:
        variants["gate/up rule"] = GATE_UP_AVG_BITS
    compiled, seconds, notes = {}, {}, {}
    for name, budget in variants.items():
        chosen: list = []
        choose = gate_up_rule if name == "gate/up rule" else act_bits.choose_raised

        def recording(sensitivity, low, high, avg, choose=choose, chosen=chosen):
            raised = choose(sensitivity, low, high, avg)
            chosen.extend(raised)
            return raised

        start = time.perf_counter()
        with mock.patch.object(act_bits, "choose_raised", recording):
            compiled[name] = fxpress.compile(model, passes=variant_passes(budget), calibration=calib, progress=False)
        seconds[name] = time.perf_counter() - start
        quantize = compiled[name].report["quantize"].stats
        stats, kinds = quantize.get("mixed_act_bits"), Counter(reader_kind(n) for n in chosen)
        notes[name] = (f"avg {stats['average_bits']:.3f} bits, raised: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                       + f"; allocation {quantize['seconds']['act_bits_allocation']:.1f} s") if stats else "all 4-bit"
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}, W4A(mixed)KV4 (hadamard), "
          f"eval {args.eval_windows} x 256 per text")
    for name in variants:
        print(f"- {name}: {notes[name]}, compile {seconds[name]:.0f} s")
    rule = "gate/up rule" in compiled
    print(f"| variant | text | ppl | x fp32 | minus uniform [95%] |{' minus gate/up rule [95%] |' if rule else ''}\n"
          f"|---|---|---|---|---|{'---|' if rule else ''}")
    baselines = ("uniform", "gate/up rule") if rule else ("uniform",)
    for text, split in TEXTS.items():
        windows = token_windows(tokenizer, split, 256, args.eval_windows)
        for name, ppl, ratio, *intervals in paired_ppl_rows(reference, compiled, windows, *baselines):
            print(f"| {name} | {text} | {ppl:.2f} | {ratio:.3f}x | {' | '.join(intervals)} |")


if __name__ == "__main__":
    main()
