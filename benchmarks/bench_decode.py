"""fxpress's ONNX SmolLM2 artifacts against the ONNX Runtime GenAI model builder's int4 CPU model, side by side.

    benchmarks/peers/build_genai.sh                 # once: the builder's model (side venv)
    python benchmarks/bench_decode.py               # W4A16 g32 and rotated W4 vs the builder, 1 thread, 7 rounds

Artifacts (weights GPTQ with act-order on 64 x 128 calibration tokens of the HOWTOs, `--method rtn` for RTN; the
tied embedding / lm_head table int4 g32 as the builder's):
- fxpress W4A16 g32 = `Quantize(weights=WeightQuant(bits=4, group_size=32), tables=TableQuant(4, 4, 32))`;
- rotated W4 (R1+R2) = `Rotate()` then the same Quantize: both rotations fold into the weights, so the graph is
  the unrotated one (the weight-only recipe: online Hadamards only pay off when activations are quantized);
- rotated W4 (R1-R4) = `Rotate(), FoldHadamard()` then the same Quantize: the online Hadamards (R3 after RoPE,
  R4 before down_proj) that 4-bit activations need, timed here for what they cost (`--no-online` skips it).
Each is exported with `accuracy_level="auto"` (timed on this CPU). Every model runs in one plain ONNX Runtime session through the same loop (all three have the GenAI
I/O: input_ids, attention_mask, per-layer past_key_values / present), alternately in each round: decode ms/token
(a 128-token prompt, then 64 greedy tokens, each one call with the cache), prefill of 512 tokens, node counts,
size, perplexity on the same eval windows, and the greedy tokens of onnxruntime-genai's Generator on the fxpress
artifact against fxpress's runner. Prints a markdown table with ratios to the builder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
DEFAULT_PEER = HERE / "peers" / "models" / "smollm2-genai-int4"


class GenaiSession:
    """An ONNX model with GenAI I/O in one ORT session: prefill, greedy decode steps, logits for perplexity."""

    def __init__(self, path: Path, threads: int, accuracy_level: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted(n for n in self.inputs if n.startswith("past_key_values."))
        self.outputs = [o.name for o in self.session.get_outputs()]
        first = self.inputs[self.past[0]]
        decoder = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])  # the builder's dims are symbolic
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32

    def forward(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        past = next(iter(cache.values())).shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], past + ids.shape[1]), dtype=np.int64),
                 **cache}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + ids.shape[1]), ids.shape).astype(np.int64)
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        presents = {n: out[n.replace("past_key_values", "present")] for n in self.past}
        return out["logits"], presents

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        heads, dim = self.kv_shape
        return {n: np.zeros((batch, heads, 0, dim), dtype=self.kv_dtype) for n in self.past}

    def decode_ms(self, prompt: np.ndarray, new: int) -> tuple[float, list[int]]:
        logits, cache = self.forward(prompt, self.empty(1))
        tokens = [int(logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(new - 1):
            logits, cache = self.forward(np.array([[tokens[-1]]], dtype=np.int64), cache)
            tokens.append(int(logits[0, -1].argmax()))
        return (time.perf_counter() - start) * 1e3 / (new - 1), tokens

    def prefill_s(self, ids: np.ndarray) -> float:
        start = time.perf_counter()
        self.forward(ids, self.empty(ids.shape[0]))
        return time.perf_counter() - start

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.forward(ids.numpy().astype(np.int64), self.empty(ids.shape[0]))[0])


ARTIFACTS = {"fxpress W4A16 g32": "w4", "fxpress W4 rotated R1+R2": "w4-r12", "fxpress W4 rotated R1-R4": "w4-r1234"}


def build_fxpress(out: Path, name: str, program, method: str) -> tuple[Path, dict]:
    """Compile and export one artifact; returns its path and stage seconds (compile, export) with the export stats."""
    from fxpress.lowering.onnx import export_onnx
    from fxpress.passes import FoldHadamard, Quantize, Rotate
    from fxpress.passes.manager import run_passes
    from fxpress.passes.quantize import TableQuant, WeightQuant

    program = copy.deepcopy(program)
    passes = {"w4": [], "w4-r12": [Rotate()], "w4-r1234": [Rotate(), FoldHadamard()]}[ARTIFACTS[name]]
    passes.append(Quantize(weights=WeightQuant(bits=4, group_size=32, method=method, act_order=method == "gptq"),
                           tables=TableQuant(embedding_bits=4, lm_head_bits=4, group_size=32)))
    start = time.perf_counter()
    run_passes(program, passes, progress=False)
    compiled = time.perf_counter()
    path = out / ARTIFACTS[name] / "model.onnx"
    stats = export_onnx(program, path, accuracy_level="auto", overwrite=True)
    stats["compile_s"], stats["export_s"] = compiled - start, time.perf_counter() - compiled
    return path, stats


def model_facts(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.suffix in (".onnx", ".data"))
    return {"nodes": len(model.graph.node), "mb": size / 1e6}


def generator_tokens(folder: Path, prompt: np.ndarray, new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[prompt.shape[1]:]]


def measure(sessions: dict[str, GenaiSession], prompt: np.ndarray, prefill: np.ndarray, rounds: int, new: int):
    decode = {k: [] for k in sessions}
    fill = {k: [] for k in sessions}
    tokens = {}
    for _ in range(rounds):
        for name, s in sessions.items():  # alternate: machine load hits every model alike
            ms, tokens[name] = s.decode_ms(prompt, new)
            decode[name].append(ms)
            fill[name].append(s.prefill_s(prefill))
    return ({k: statistics.median(v) for k, v in decode.items()}, {k: statistics.median(v) for k, v in fill.items()},
            tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="the GenAI builder's model folder")
    parser.add_argument("--out", type=Path, default=HERE / "peers" / "models" / "fxpress")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="fxpress's weight quantizer")
    parser.add_argument("--calib-windows", type=int, default=64, help="GPTQ calibration windows of 128 tokens")
    parser.add_argument("--no-rotated", action="store_true", help="only the unrotated fxpress artifact")
    parser.add_argument("--no-online", action="store_true", help="skip the R1-R4 artifact (online Hadamards)")
    parser.add_argument("--skip-build", action="store_true", help="measure the artifacts already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fxpress.capture import capture
    from fxpress.data import token_windows
    from fxpress.evaluate import perplexity
    from fxpress.models import load_smollm2

    model, tokenizer = load_smollm2()
    start = time.perf_counter()
    program = None if args.skip_build else capture(model, source="smollm2")
    print(f"capture {time.perf_counter() - start:.1f} s")
    if program is not None and args.method == "gptq":
        from fxpress.calibration import Calibration

        program.calibration = Calibration(token_windows(tokenizer, "calib", 128, args.calib_windows))
    names = list(ARTIFACTS)[:1] if args.no_rotated else [n for n in ARTIFACTS if not (args.no_online and "R4" in n)]
    paths = {"genai builder": args.peer / "model.onnx"}
    for name in names:
        if args.skip_build:
            paths[name] = args.out / ARTIFACTS[name] / "model.onnx"
            continue
        path, stats = build_fxpress(args.out, name, program, args.method)
        paths[name] = path
        print(f"{name}: compile {stats['compile_s']:.1f} s, export {stats['export_s']:.1f} s, "
              f"accuracy_level {stats['accuracy_level']} "
              f"({stats['accuracy_level_ms']} ms), GQA {stats.get('group_query_attention')}, "
              f"rotary inside {stats.get('rotary_in_attention')}, fused away {stats.get('matmulnbits_fused_away')}, "
              f"unfused {stats.get('attention_unfused')}, stage seconds {stats.get('seconds')}")
    sessions = {name: GenaiSession(p, args.threads) for name, p in paths.items()}
    text = token_windows(tokenizer, "eval", seq_len=args.prefill + args.prompt, max_windows=1)
    prompt, prefill = text[:, :args.prompt].numpy(), text[:, :args.prefill].numpy()
    decode, fill, tokens = measure(sessions, prompt, prefill, args.rounds, args.new)
    windows = token_windows(tokenizer, "eval", seq_len=256, max_windows=args.eval_windows)
    ppl = {name: perplexity(s, windows, batch_size=1) for name, s in sessions.items()}
    report(paths, decode, fill, ppl, args)
    for name, path in paths.items():
        if name != "genai builder":
            same = generator_tokens(path.parent, prompt, 32) == tokens[name][:32]
            print(f"{name}: onnxruntime-genai Generator greedy tokens == fxpress loop: {same}")


def report(paths: dict, decode: dict, fill: dict, ppl: dict, args) -> None:
    base = "genai builder"
    print(f"\nload average {os.getloadavg()}, {args.threads} thread(s), {args.rounds} rounds, medians")
    print("| artifact | MB | nodes | decode ms/token | x builder | prefill-512 s | x builder | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        facts = model_facts(path)
        print(f"| {name} | {facts['mb']:.1f} | {facts['nodes']} | {decode[name]:.2f} | "
              f"{decode[name] / decode[base]:.2f} | {fill[name]:.3f} | {fill[name] / fill[base]:.2f} | "
              f"{ppl[name]:.2f} |")


if __name__ == "__main__":
    main()
