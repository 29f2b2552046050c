"""Real int8 activation compute in ONNX Runtime (issue #15): SmolLM2 fp32, W8A8, W4A16 g32 and W4A8 g32, side by side.

    python benchmarks/bench_int8.py                  # 1 thread, 5 alternating rounds, 16 x 256 eval windows
    python benchmarks/bench_int8.py --rotate         # W8A8 after Rotate(), FoldHadamard()

Programs: W8A8 = `Quantize(weights=WeightQuant(bits=8, group_size=-1), activations=ActQuant(bits=8))` (RTN,
per-channel weights, symmetric per-token activations: the README's W8A8 recipe; lm_head stays fp32); W4A16 g32 =
`WeightQuant(bits=4, group_size=32)` with 4-bit g32 tables (bench_decode.py's W4); W4A8 g32 = the same plus
`ActQuant(bits=8)`. Each is exported with `int8_activations="all"` (W8A8 -> MatMulInteger,
W4A8 -> MatMulNBits accuracy_level 4; W4A16 at accuracy_level 0) and run in one ONNX Runtime session through
bench_decode.py's GenaiSession, alternately in each round: prefill of 512 tokens, decode ms/token (128-token
prompt, then greedy tokens). Perplexity of each artifact and of its PyTorch program on the same windows, with a
95% paired bootstrap over windows of artifact - PyTorch (within noise when the interval holds 0).
Targets: W8A8 prefill <= 0.6x fp32; W4A8 decode <= W4A16 decode; perplexity within noise of PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import GenaiSession, model_facts  # noqa: E402


def programs(captured, rotate: bool) -> dict:
    """name -> quantized Program (RTN: no calibration)."""
    from fxpress.passes import FoldHadamard, Quantize, Rotate
    from fxpress.passes.manager import run_passes
    from fxpress.passes.quantize import ActQuant, TableQuant, WeightQuant

    tables = TableQuant(embedding_bits=4, lm_head_bits=4, group_size=32)
    recipes = {"W8A8": ([Rotate(), FoldHadamard()] if rotate else [])
               + [Quantize(weights=WeightQuant(bits=8, group_size=-1), activations=ActQuant(bits=8))],
               "W4A16 g32": [Quantize(weights=WeightQuant(bits=4, group_size=32), tables=tables)],
               "W4A8 g32": [Quantize(weights=WeightQuant(bits=4, group_size=32), activations=ActQuant(bits=8),
                                     tables=tables)]}
    out = {"fp32": captured}
    for name, passes in recipes.items():
        out[name] = copy.deepcopy(captured)
        run_passes(out[name], passes, progress=False)
    return out


def export_all(progs: dict, folder: Path) -> dict[str, Path]:
    from fxpress.lowering.onnx import export_onnx

    paths = {}
    for name, program in progs.items():
        path = folder / name.replace(" ", "_") / "model.onnx"
        start = time.perf_counter()
        stats = export_onnx(program, path, overwrite=True, int8_activations="all")
        counts = {k: stats.get(k) for k in ("matmulnbits", "int8_matmulinteger", "int8_matmulnbits_level4",
                                           "int8_quantizers_kept")}
        print(f"{name}: export {time.perf_counter() - start:.1f} s, {counts}", flush=True)
        paths[name] = path
    return paths


def timings(sessions: dict[str, GenaiSession], prompt, prefill, rounds: int, new: int) -> tuple[dict, dict]:
    decode = {k: [] for k in sessions}
    fill = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():  # alternate: machine load hits every model alike
            fill[name].append(s.prefill_s(prefill))
            decode[name].append(s.decode_ms(prompt, new)[0])
    return ({k: statistics.median(v) for k, v in decode.items()}, {k: statistics.median(v) for k, v in fill.items()})


def quality(progs: dict, sessions: dict[str, GenaiSession], windows: torch.Tensor) -> dict[str, dict]:
    """Per model: PyTorch and ONNX perplexity on the same windows, and the bootstrap of ONNX - PyTorch."""
    from fxpress.evaluate import paired_bootstrap, window_metrics

    out = {}
    for name, program in progs.items():
        last = {}

        def reference(batch: torch.Tensor, program=program, last=last) -> torch.Tensor:
            last["logits"] = program(batch)  # the PyTorch program runs once per window: reference and row
            return last["logits"]

        fns = {"pytorch": lambda batch, last=last: last["logits"], "onnx": sessions[name]}
        nll = window_metrics(reference, fns, windows, batch_size=1)
        torch_nll, onnx_nll = nll["pytorch"]["nll"], nll["onnx"]["nll"]
        out[name] = {"pytorch": float(torch_nll.mean().exp()), "onnx": float(onnx_nll.mean().exp()),
                     "boot": paired_bootstrap(onnx_nll, torch_nll, "ppl"), "kl": float(nll["onnx"]["kl"].mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--rotate", action="store_true", help="W8A8 after Rotate(), FoldHadamard()")
    parser.add_argument("--out", type=Path, default=None, help="artifact folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fxpress.capture import capture
    from fxpress.data import token_windows
    from fxpress.models import load_smollm2

    print(f"load average at start {os.getloadavg()}", flush=True)
    model, tokenizer = load_smollm2()
    start = time.perf_counter()
    progs = programs(capture(model, source="smollm2"), args.rotate)
    print(f"capture + quantize {time.perf_counter() - start:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_all(progs, args.out or Path(tmp))
        sessions = {name: GenaiSession(path, args.threads) for name, path in paths.items()}
        text = token_windows(tokenizer, "eval", seq_len=args.prefill + args.prompt, max_windows=1)
        decode, fill = timings(sessions, text[:, :args.prompt].numpy(), text[:, :args.prefill].numpy(), args.rounds,
                               args.new)
        load = os.getloadavg()
        windows = token_windows(tokenizer, "eval", seq_len=256, max_windows=args.eval_windows)
        ppl = quality(progs, sessions, windows)
        facts = {name: model_facts(path) for name, path in paths.items()}
    print(f"\nload average after timing {load}, at end {os.getloadavg()}; {args.threads} thread(s), {args.rounds} "
          f"rounds, medians; perplexity on {args.eval_windows} x 256 eval windows"
          + ("; W8A8 rotated" if args.rotate else ""))
    print("| artifact | MB | nodes | prefill-512 s | x fp32 | decode ms/token | x W4A16 | ppl ONNX | ppl PyTorch | "
          "ONNX - PyTorch [95%] | KL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in paths:
        q, boot = ppl[name], ppl[name]["boot"]
        print(f"| {name} | {facts[name]['mb']:.1f} | {facts[name]['nodes']} | {fill[name]:.3f} | "
              f"{fill[name] / fill['fp32']:.2f} | {decode[name]:.2f} | {decode[name] / decode['W4A16 g32']:.2f} | "
              f"{q['onnx']:.3f} | {q['pytorch']:.3f} | {boot['diff']:+.3f} [{boot['lo']:+.3f}, {boot['hi']:+.3f}] | "
              f"{q['kl']:.4f} |")


if __name__ == "__main__":
    main()
