"""fxpress beside the tools a user would pick instead, on SmolLM2-135M, both evaluation texts, one protocol.

    python benchmarks/bench_peers.py prepare                    # token windows + the HF directory, once
    bash benchmarks/peers/build_quality_peers.sh                # side venvs (benchmarks/peers/.venvs/<peer>)
    benchmarks/peers/.venvs/llmcompressor/bin/python benchmarks/peers/quality_llmcompressor.py \\
        --windows out/peers/windows.json --out benchmarks/results/peers_nll/llmcompressor.json
    python benchmarks/bench_peers.py fxpress --settings W4A16_g128+none,W4A16_g128+hadamard
    python benchmarks/bench_peers.py table --out benchmarks/results/peers.md

Protocol (that of bench_quality.py): eval windows of seq_len tokens from the start of the "eval" split
(Python tutorial) and of "prose_eval" (Genesis, King James Bible); every tool calibrates on the same
64 x 128 windows of "calib" (Python HOWTOs), so the prose is held out from every tool's calibration.
Each tool's JSON holds the summed NLL of every window, so the table's 95% intervals are paired
bootstraps over windows: of the perplexity ratio to fp32, and of fxpress's ratio to the best peer.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "peers"))
import quality_protocol as protocol  # noqa: E402  (shared with the peers' venvs, which cannot import fxpress)

TEXTS = {"python": "eval", "prose": "prose_eval"}
RESULTS = Path(__file__).parent / "results" / "peers_nll"
WINDOWS = "out/peers/windows.json"
# setting -> (weight bits, group size, activation bits, KV bits)
SETTINGS = {"W4A16_g128": (4, 128, None, None), "W4A16_g64": (4, 64, None, None), "W4A16_ch": (4, -1, None, None),
            "W3A16_g128": (3, 128, None, None), "W3A16_g64": (3, 64, None, None), "W8A8": (8, -1, 8, None),
            "W4A8": (4, 128, 8, None), "W4A4KV4": (4, 128, 4, 4),
            # the peers' own 4-bit-activation settings (g64: llm-compressor refuses g128 at width 576), paired by name
            "W4A8_g64": (4, 64, 8, None), "W4A4_g64": (4, 64, 4, None), "W4A4KV4_g64": (4, 64, 4, 4)}
ROTATIONS = ("none", "hadamard", "dfrot")


def prepare(args: argparse.Namespace) -> None:
    """Write the windows every tool reads, and the SmolLM2 HF directory (de-quantized from the GGUF once)."""
    from transformers import AutoTokenizer

    from fxpress.data import token_windows
    from fxpress.models import resolve_model_path

    model_dir = resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    payload = {"model_dir": str(Path(model_dir).resolve()), "seq_len": args.seq_len,
               "eval": {name: token_windows(tok, split, args.seq_len, args.eval_windows).tolist()
                        for name, split in TEXTS.items()},
               "calib": token_windows(tok, "calib", args.calib_len, args.calib_windows).tolist()}
    protocol.write_atomic(args.windows, payload)
    print(f"wrote {args.windows}: {args.eval_windows} x {args.seq_len} eval windows per text, "
          f"{args.calib_windows} x {args.calib_len} calib windows; model {model_dir}")


def fxpress_setting(base_cache: dict, name: str, calib: torch.Tensor):
    """The quantized Program for 'SETTING+ROTATION' (GPTQ; 'SETTING+ROTATION-rtn' for RTN weights,
    'SETTING+ROTATION-gptaq' for GPTQ that also corrects its input quantizer's error)."""
    from fxpress.calibration import Calibration
    from fxpress.passes import FoldHadamard, Quantize, Rotate, run_passes
    from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant

    setting, variant = name.split("+")
    rotation, _, method = variant.partition("-")
    w, group, a, kv = SETTINGS[setting]
    if rotation not in base_cache:
        program = copy.deepcopy(base_cache["captured"])
        program.calibration = Calibration(calib)
        if rotation != "none":
            run_passes(program, [Rotate(mode=rotation, seed=0), FoldHadamard()], progress=False)
        base_cache[rotation] = program
    q = copy.deepcopy(base_cache[rotation])
    low = a is not None and a <= 4
    run_passes(q, [Quantize(weights=WeightQuant(bits=w, group_size=group, method="rtn" if method == "rtn" else "gptq",
                                                   act_order=method != "rtn", correct_act_error=method == "gptaq"),
                            activations=ActQuant(bits=a, clip_ratio=1.0, clip_search=low, symmetric=not low),
                            kv_cache=KVQuant(bits=kv, clip_ratio=0.95))], progress=False)
    return q


def run_fxpress(args: argparse.Namespace) -> None:
    """fxpress's rows through the peers' own protocol runner (same windows, same NLL code, same JSON)."""
    import fxpress
    from fxpress.capture import capture
    from fxpress.models import load_smollm2

    names = [f"{s}+{r}{m}" for s in SETTINGS for r in ROTATIONS for m in ("", "-rtn", "-gptaq")]
    cache: dict = {}

    def make(name: str):
        def setting(_model, calib):
            if "captured" not in cache:
                cache["captured"] = capture(load_smollm2()[0], source="smollm2")
            return fxpress_setting(cache, name, calib)
        return setting

    protocol.run("fxpress", fxpress.__version__, {n: make(n) for n in names},
                 ["--windows", args.windows, "--settings", args.settings or ",".join(names)]
                 + (["--no-fp32"] if args.no_fp32 else []) + [
                  "--out", str(RESULTS / f"fxpress{'_' + args.tag if args.tag else ''}.json"),
                  "--threads", str(args.threads)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "fxpress", "table"))
    ap.add_argument("--windows", default=WINDOWS)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--settings", default=None, help="fxpress: comma list of SETTING+ROTATION")
    ap.add_argument("--tag", default="", help="fxpress: results go to fxpress_TAG.json (parallel runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fp32", action="store_true", help="fxpress: skip the fp32 pass (another run has it)")
    ap.add_argument("--out", default=None, help="table: write the markdown here")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(args)
    elif args.command == "fxpress":
        run_fxpress(args)
    else:
        from peers_table import write_table

        write_table(RESULTS, TEXTS, args.out)


if __name__ == "__main__":
    main()
