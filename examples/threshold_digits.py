"""Threshold neurons on scikit-learn's digits, from training to an iCE40 bitstream.

Train a small MLP (64 -> 32 -> 10) on the 8x8 digits (pixel values are integers 0..16, so the
input codes are exact 5-bit numbers), replace the hidden layer by threshold neurons (the classifier
stays a conventional layer: multiplication injection), fine-tune with the straight-through
estimator, compare accuracy, then emit the netlist, HLS C++ and Verilog, check C and RTL simulation
against PyTorch on every test digit, and synthesise the threshold layer to an iCE40 bitstream.

The whole network (with its int8 classifier) is simulated; the bitstream holds the threshold layer
alone, because the fully parallel int8 classifier (10 x 32 constant multipliers) would not fit an
iCE40 next to it. At the default density 0.5 (32 connections per neuron: the accuracy choice, within
1 point of the conventional network over 8 seeds) the whole layer needs about 7.6k LUTs, over 90% of
the largest iCE40 (HX8K): it is synthesised whole, and its first 8 neurons are placed, routed and
packed into a bitstream (`--bitstream-neurons`); `--density 0.25` places the whole layer on an UP5K
(about 4k LUTs) at about one more point of accuracy lost.

    python examples/threshold_digits.py [--density 0.5] [--hidden 32] [--out out/threshold_digits]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fxpress.capture import capture
from fxpress.data import digits_split
from fxpress.evaluate import accuracy
from fxpress.lowering.fpga import build, export_fpga, netlist_from_program
from fxpress.lowering.fpga.netlist import first_neurons
from fxpress.passes import ThresholdNeurons, run_passes
from fxpress.passes.threshold_neurons import FineTuning
from fxpress.zoo import train_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="out/threshold_digits")
    parser.add_argument("--no-bitstream", action="store_true")
    parser.add_argument("--bitstream-neurons", type=int, default=8, help="neurons placed when the layer does not fit")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 64-32-10 network: threads only add overhead

    xtr, ytr, xte, yte = digits_split()
    model = train_mlp(xtr, ytr, sizes=(64, args.hidden, 10))
    acc_fp = accuracy(model, xte, yte)

    program = capture(model, (xtr[:4],))
    program.metadata["train_data"] = (xtr, ytr)
    result = run_passes(program, [ThresholdNeurons(density=args.density, fine_tune=FineTuning(steps=args.steps))], verify=False)[0]
    acc_tn = accuracy(program, xte, yte)
    netlist = netlist_from_program(program)
    acc_int = float((netlist.reference(netlist.quantize(xte))[-1].argmax(-1) == yte).float().mean())

    start = time.perf_counter()
    export_fpga(program, args.out, vectors=xte, synthesize=False)
    sim = program.metadata["fpga_report"]
    export_fpga(program, f"{args.out}_layer0", vectors=xte, layers=1, synthesize=True, bitstream=not args.no_bitstream)
    fpga = program.metadata["fpga_report"]
    layer_synthesis = {k: fpga["fpga"][k] for k in ("luts", "ffs", "placed") if k in fpga["fpga"]}
    placed_neurons = netlist.layers[0].out_features
    if not fpga["fpga"].get("placed", True):  # too big for an iCE40: place a slice of the layer
        placed_neurons = min(args.bitstream_neurons, placed_neurons)
        fpga = build(first_neurons(netlist, placed_neurons), f"{args.out}_layer0_slice", netlist.quantize(xte),
                     bitstream=not args.no_bitstream)
    seconds = time.perf_counter() - start

    layer = result.stats["layers"][0]
    summary = {
        "accuracy_conventional": acc_fp,
        "accuracy_threshold_graph": acc_tn,
        "accuracy_integer_netlist": acc_int,
        "accuracy_drop_points": 100 * (acc_fp - acc_tn),
        "hidden": args.hidden,
        "density": args.density,
        "multiplications_removed": result.stats["multiplications_removed"],
        "connections": layer["excitatory"] + layer["inhibitory"],
        "test_vectors": sim["vectors"],
        "csim_mismatches_full_network": sim["csim_mismatches"],
        "rtl_mismatches_full_network": sim["rtl_mismatches"],
        "csim_mismatches_layer0": fpga["csim_mismatches"],
        "rtl_mismatches_layer0": fpga["rtl_mismatches"],
        "layer0_whole_synthesis": layer_synthesis,
        "layer0_neurons_placed": placed_neurons,
        "layer0_fpga": {k: v for k, v in fpga["fpga"].items() if k != "synthesis"},
        "lowering_seconds": seconds,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
