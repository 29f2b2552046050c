"""The FPGA lowering: netlist, HLS C++ (g++ C-sim), Verilog (iverilog), iCE40 bitstream, MAC baseline."""

from __future__ import annotations

import json

import pytest
import torch

from fxpress.calibration import collect_activations
from fxpress.capture import capture
from fxpress.data import digits_split
from fxpress.errors import ArtifactError, ConfigError, LoweringError
from fxpress.lowering.fpga import build, export_fpga, netlist_from_program
from fxpress.lowering.fpga.flow import parse_icetime, parse_nextpnr, parse_yosys_stat
from fxpress.lowering.fpga.netlist import Netlist, first_neurons, mac_netlist
from fxpress.lowering.fpga.verilog import lint
from fxpress.passes import ThresholdNeurons, run_passes
from fxpress.passes.threshold_neurons import FineTuning
from fxpress.zoo import train_mlp

pytest.importorskip("sklearn")

KERNEL_NEURONS = 2  # the slice of the digits layer that is placed, routed and packed in the tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


@pytest.fixture(scope="module")
def converted():
    """(program, original model, x_test, y_test): the digits MLP with a threshold hidden layer."""
    xtr, ytr, xte, yte = digits_split()
    model = train_mlp(xtr, ytr)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    program = capture(model, (xtr[:4],))
    program.metadata["train_data"] = (xtr, ytr)
    run_passes(program, [ThresholdNeurons(density=0.25, fine_tune=FineTuning(steps=300))], verify=False)  # small kernels
    return program, original, xte, yte


def test_netlist_reference_is_the_graph_bit_for_bit(converted):
    program, _, xte, _ = converted
    netlist = netlist_from_program(program)
    assert [layer.kind for layer in netlist.layers] == ["threshold", "mac"]
    node = next(n for n in program.graph.nodes if n.target == torch.ops.fxpress.threshold_linear.default)
    graph_out = collect_activations(program, [node.name], [xte])[node.name][0]
    ref = netlist.reference(netlist.quantize(xte))
    assert torch.equal(ref[0], graph_out.to(torch.int64))
    assert netlist.input == {"features": 64, "scale": 1.0, "min": 0, "max": 31, "bits": 5, "signed": False}
    # the int8 classifier keeps the graph's decisions on (almost) every digit
    agree = float((ref[1].argmax(1) == program(xte).argmax(1)).float().mean())
    assert agree > 0.98


def test_netlist_json_round_trip(converted, tmp_path):
    netlist = netlist_from_program(converted[0])
    netlist.save(tmp_path / "n.json")
    again = Netlist.load(tmp_path / "n.json")
    assert again.to_dict() == netlist.to_dict()
    data = json.loads((tmp_path / "n.json").read_text())
    neuron = data["layers"][0]["neurons"][0]
    assert set(neuron) == {"excitatory", "inhibitory", "threshold"}
    assert len(neuron["excitatory"]) + len(neuron["inhibitory"]) == 16
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ArtifactError):
        Netlist.load(tmp_path / "bad.json")


def test_csim_and_rtl_match_pytorch_on_every_test_vector(converted, tmp_path):
    program, _, xte, yte = converted
    out = export_fpga(program, tmp_path / "digits", vectors=xte, synthesize=False)
    report = json.loads((out / "report.json").read_text())
    assert report["vectors"] == 450
    assert report["csim_mismatches"] == 0 and report["rtl_mismatches"] == 0
    csim_out = [list(map(int, line.split())) for line in (out / "hls" / "csim_out.txt").read_text().splitlines()]
    netlist = Netlist.load(out / "netlist.json")
    expected = netlist.reference(netlist.quantize(xte))[-1]
    assert torch.equal(torch.tensor(csim_out), expected)
    assert float((expected.argmax(1) == yte).float().mean()) > 0.93
    cpp = (out / "hls" / "fxnet.cpp").read_text()
    for pragma in ("#pragma HLS PIPELINE II=1", "#pragma HLS UNROLL", "#pragma HLS ARRAY_PARTITION"):
        assert pragma in cpp
    assert "csim_design" in (out / "hls" / "run_hls.tcl").read_text()
    assert "uint8_t in_t" in (out / "hls" / "fxnet.h").read_text()


def test_verilog_lints_clean(converted, tmp_path):
    export_fpga(converted[0], tmp_path / "lint", vectors=converted[2][:8], simulate=False, synthesize=False)
    assert lint(tmp_path / "lint" / "rtl" / "fxnet.v") == []


def test_bitstream_and_lut_ratio_against_int8_mac(converted, tmp_path):
    program, original, xte, _ = converted
    kernel = first_neurons(netlist_from_program(program), KERNEL_NEURONS)
    codes = kernel.quantize(xte[:32])
    tn = build(kernel, tmp_path / "tn", codes)
    assert tn["csim_mismatches"] == 0 and tn["rtl_mismatches"] == 0
    fpga = tn["fpga"]
    assert fpga["placed"] and fpga["device"] == "up5k"
    bitstream = tmp_path / "tn" / "rtl" / "fxnet_top.bin"
    assert bitstream.stat().st_size > 100_000  # a whole UP5K configuration image
    assert fpga["luts"] > 0 and fpga["ffs"] > 0 and fpga["fmax_mhz"] > 5
    # the same neurons as int8 multiply-accumulates on the same connections: multipliers vs adders
    w, b = original["0.weight"][:KERNEL_NEURONS], original["0.bias"][:KERNEL_NEURONS]
    mac = mac_netlist(w, b, True, kernel.input, mask=kernel.layers[0].matrix())
    base = build(mac, tmp_path / "mac", codes, bitstream=False)
    assert base["csim_mismatches"] == 0 and base["rtl_mismatches"] == 0
    assert base["fpga"]["luts"] > 3 * fpga["luts"]


def test_parsers_read_tool_reports():
    stat = "Number of cells: 12\n     SB_CARRY                       3\n     SB_DFF                         4\n     SB_DFFE 2\n     SB_LUT4                        9\n"
    assert parse_yosys_stat(stat) == {"luts": 9, "ffs": 6, "carries": 3, "cells": {"SB_CARRY": 3, "SB_DFF": 4, "SB_DFFE": 2, "SB_LUT4": 9}}
    assert parse_icetime("Total path delay: 12.50 ns (80.00 MHz)")["fmax_mhz"] == 80.0
    log = "Info:         ICESTORM_LC:   120/  5280     2%\nInfo: Max frequency for clock 'clk$SB_IO_IN_$glb_clk': 71.20 MHz (PASS at 12.00 MHz)"
    assert parse_nextpnr(log) == {"logic_cells": 120, "logic_cells_available": 5280, "nextpnr_fmax_mhz": 71.2}


def test_export_refuses_what_it_cannot_lower(converted, tmp_path):
    program, _, xte, _ = converted
    with pytest.raises(ConfigError, match="folder"):
        export_fpga(program, tmp_path / "x.bin", vectors=xte)
    with pytest.raises(LoweringError, match="vectors"):
        export_fpga(program, tmp_path / "y", vectors=xte[:, :10])
    with pytest.raises(ConfigError, match="layers"):
        export_fpga(program, tmp_path / "z", vectors=xte, layers=3)
    plain = capture(torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.ones(2, 4),))
    with pytest.raises(LoweringError, match="threshold layer first"):
        export_fpga(plain, tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("sizes", [(8, 6, 3), (8, 6, 5, 3)])
def test_compiled_float_model_lowers_bit_exact(sizes, tmp_path):
    """Real-valued (signed) inputs quantized to 8-bit codes; one or two chained threshold layers."""
    import fxpress

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    x = torch.randn(64, sizes[0])
    passes = [ThresholdNeurons(fine_tune=FineTuning(steps=20), density=0.5, layers=[str(2 * i) for i in range(len(sizes) - 2)])]
    cm = fxpress.compile(model, passes=passes, example_inputs=(x[:4],), calibration=x, progress=False)
    out = cm.export("fpga", tmp_path / "net", vectors=x, synthesize=False)
    report = json.loads((out / "report.json").read_text())
    netlist = Netlist.load(out / "netlist.json")
    assert netlist.input["signed"] and netlist.input["bits"] == 8
    assert [layer.kind for layer in netlist.layers] == ["threshold"] * (len(sizes) - 2) + ["mac"]
    assert report["csim_mismatches"] == 0 and report["rtl_mismatches"] == 0 and report["vectors"] == 64
