"""ONNX Runtime prefill of SmolLM2 with the additive causal mask against the exporter's guarded boolean mask.

torch.onnx lowers a boolean-mask SDPA with a guard for rows that mask every key (IsNaN + Where over every
attention score); fxpress exports a causal LM's mask as additive instead (`export_onnx(additive_masks=True)`,
the default), since every query sees at least itself. Both artifacts run side by side, interleaved, in one run.

    python benchmarks/bench_attention_mask.py --threads 1 --seq 512 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

FORMS = {"guarded boolean mask": False, "additive mask": True}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[512])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import onnx

    import fxpress
    from fxpress.data import token_windows
    from fxpress.lowering.onnx import export_onnx
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    program = fxpress.compile(model, passes=[]).program
    info = program.info
    workdir = tempfile.mkdtemp(prefix="fxpress-mask-")
    sessions, nan_guards = {}, {}
    for name, additive in FORMS.items():
        path = f"{workdir}/{int(additive)}.onnx"
        export_onnx(program, path, additive_masks=additive)
        nan_guards[name] = sum(n.op_type == "IsNaN" for n in onnx.load(path, load_external_data=False).graph.node)
        sessions[name] = session(path, args.threads)
    print("| prefill tokens | IsNaN nodes (guarded / additive) | guarded ms | additive ms | additive / guarded | "
          "max rel. logit difference |")
    print("|---|---|---|---|---|---|")
    for seq in args.seq:
        ids = token_windows(tokenizer, "eval", seq_len=seq, max_windows=1).numpy()
        empty = np.zeros((info.num_layers, 1, info.num_kv_heads, 0, info.head_dim), np.float32)
        feeds = {"input_ids": ids, "past_keys": empty, "past_values": empty}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        logits = {}
        for _ in range(args.reps + 1):  # the first round warms up and is dropped
            for name, sess in sessions.items():
                start = time.perf_counter()
                logits[name] = sess.run(None, feeds)[0]
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(t[1:]) for name, t in times.items()}
        a, b = logits["guarded boolean mask"], logits["additive mask"]
        diff = float(np.abs(a - b).max() / np.abs(a).max())
        guarded, additive = ms["guarded boolean mask"], ms["additive mask"]
        print(f"| {seq} | {nan_guards['guarded boolean mask']} / {nan_guards['additive mask']} | {guarded:.0f} | "
              f"{additive:.0f} | {additive / guarded:.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
