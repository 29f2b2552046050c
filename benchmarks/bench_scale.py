"""Scale benchmark (issue 13): compile time and peak memory against model size, each compile in a child process.

Each job runs in a child whose peak resident memory the parent reads when it exits (`os.wait4`'s rusage; on
Linux that counts the parent's own peak at fork too, so the parent prints its peak, which stays below the rows):
compile under `max_memory`, export ONNX, run it in ONNX Runtime and compare greedy tokens of a short prompt
with the PyTorch program. Checkpoints are random-init bf16 shards written once (benchmarks/scale_models.py).

    python benchmarks/bench_scale.py --quick                     # a minute-long smoke run (tiny model, RTN)
    python benchmarks/bench_scale.py --sizes 281m,0.5b --method rtn
    python benchmarks/bench_scale.py --only sizes,cli,moe,moe-experts,w4a4,streamed,torchrun   # everything (hours)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "def fibonacci(n):\n    "
PARTS = ("sizes", "cli", "moe", "moe-experts", "w4a4", "streamed", "torchrun")


def _calibration(vocab: int, seq_len: int, samples: int):
    """Real calibration text (the Python HOWTOs) in SmolLM2's tokenizer, ids taken modulo `vocab`."""
    from transformers import AutoTokenizer

    from fxpress.data import token_windows
    from fxpress.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids % vocab
    return token_windows(tokenizer, "calib", seq_len, samples) % vocab, prompt


def _passes(job: dict[str, Any]) -> list:
    from fxpress.passes import FoldHadamard, Precision, Quantize, QuantizeExperts, Rotate
    from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant
    from fxpress.passes.quantize_experts.config import ExpertAnalysis, ExpertBudget, ExpertWeights

    weights = WeightQuant(bits=4, method=job["method"], group_size=128)
    if job.get("w4a4kv4"):  # float64 activations: ORT and PyTorch then compute the same 4-bit codes (Precision's doc)
        return [Rotate(), FoldHadamard(), Quantize(weights=weights, activations=ActQuant(bits=4, clip_search=True),
                                                   kv_cache=KVQuant(bits=4)), Precision()]
    # Quantize leaves fused [E, out, in] expert weights to quantize_experts: uniform W4 here (the Llama rows'
    # recipe), or its mixed-precision allocation; its default Fisher analysis back-propagates through the whole
    # model (refused over budget), its output-error analysis runs block by block
    if job.get("experts") == "uniform":
        budget = ExpertBudget(avg_bits=4, bit_choices=(4,), allocation="uniform")
    else:
        budget = ExpertBudget()
    experts = ([QuantizeExperts(budget=budget, analysis=ExpertAnalysis(sensitivity="output"),
                                weights=ExpertWeights(method=job["method"], group_size=128))]
               if job.get("experts") else [])
    return [Rotate(), FoldHadamard(), *experts, Quantize(weights=weights)]


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Compile, export, run in ONNX Runtime; times per stage (what the parent prints)."""
    import torch

    import fxpress
    from fxpress.budget import peak_resident_bytes
    from fxpress.runtime.generate import generate
    from fxpress.runtime.runners import OnnxRunner

    torch.manual_seed(0)
    config = json.loads((Path(job["model"]) / "config.json").read_text())
    calib, prompt = _calibration(config["vocab_size"], job["seq_len"], job["samples"])
    start = time.perf_counter()
    cm = fxpress.compile(job["model"], passes=_passes(job), calibration=calib, dtype="float32",
                         max_memory=job["max_memory"], progress=False)
    times = {"compile": time.perf_counter() - start}
    compile_peak = peak_resident_bytes()  # the whole child's peak also counts ONNX Runtime holding the artifact
    times.update({f"pass {r.name}": r.seconds for r in cm.report})
    result = {"times": times, "plan": cm.program.metadata.get("memory_plan"), "compile_peak": compile_peak}
    if job.get("no_export"):
        return result
    out = Path(job["out"])
    start = time.perf_counter()
    path = cm.export("onnx", out / "model.onnx", overwrite=True)
    times["export onnx"] = time.perf_counter() - start
    start = time.perf_counter()
    ours = generate(cm, prompt, max_new_tokens=job["tokens"])
    # A float64 program's ONNX dequantizes its 4-bit weights in float64; ORT's constant folding would make them
    # dense float64 initializers (8 bytes per parameter), so that session runs unoptimised.
    theirs = generate(OnnxRunner(path, optimize=not job.get("w4a4kv4")), prompt, max_new_tokens=job["tokens"])
    times["generate (torch + ort)"] = time.perf_counter() - start
    return {**result, "greedy_equal": bool(torch.equal(ours, theirs))}


def _codes(program) -> dict[str, Any]:
    """The integer tensors (packed codes) of a compiled program, by attribute name."""
    from fxpress import graph as G

    found = {}
    for node in program.graph.nodes:
        if node.op == "get_attr":
            value = G.get_param(program.module, str(node.target))
            if not value.is_floating_point():
                found[str(node.target)] = value
    return found


def streamed_child(job: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2 compiled in memory (today's path) and streamed from its checkpoint under a budget: same codes and
    logits, and the time of each (issue 13: streamed <= 1.2x in-memory)."""
    import torch

    import fxpress
    from fxpress.models import load_causal_lm, resolve_model_path

    calib, prompt = _calibration(49152, job["seq_len"], job["samples"])
    model = load_causal_lm("smollm2", tokenizer=False)[0]
    start = time.perf_counter()
    memory = fxpress.compile(model, passes=_passes(job), calibration=calib, progress=False)
    in_memory = time.perf_counter() - start
    start = time.perf_counter()
    streamed = fxpress.compile(resolve_model_path("smollm2"), passes=_passes(job), calibration=calib,
                               max_memory=job["max_memory"], progress=False)
    stream_time = time.perf_counter() - start
    a, b = _codes(memory.program), _codes(streamed.program)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diff = (memory(calib[:2]) - streamed(calib[:2])).abs().max().item()
    return {"times": {"in memory": in_memory, "streamed": stream_time}, "ratio": stream_time / in_memory,
            "codes_equal": same, "logits_max_abs_diff": diff}


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int, str, str]:
    """(exit code, wall seconds, peak RSS of the child in bytes, stdout, last stderr line) of a child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
        return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, out.read(), (lines or [""])[-1]


SMOLLM2_PARAMETERS = 134_515_008


def _checkpoint(name: str) -> str:
    """A size's checkpoint directory: SmolLM2-135M's (converted from its GGUF, fp32) or a random-init one."""
    from scale_models import write_checkpoint

    from fxpress.models import resolve_model_path

    return resolve_model_path(name) if name == "smollm2" else str(write_checkpoint(name))


def _parameters(name: str) -> int:
    from scale_models import parameter_count

    return SMOLLM2_PARAMETERS if name == "smollm2" else parameter_count(name)


def _job(name: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    model = _checkpoint(name)
    return {"model": model, "method": args.method, "max_memory": args.max_memory, "seq_len": args.seq_len,
            "samples": args.samples, "tokens": args.tokens, "no_export": args.no_export, "out": tempfile.mkdtemp(prefix="bench-scale-"), **extra}


def _row(label: str, params: int, job: dict[str, Any]) -> dict[str, Any]:
    code, wall, peak, stdout, error = run_child([sys.executable, __file__, "--child", json.dumps(job)])
    result = json.loads(stdout.strip().splitlines()[-1]) if code == 0 and stdout.strip() else {"error": error}
    row = {"model": label, "params": params, "budget": job["max_memory"], "ok": code == 0, "wall": wall,
           "peak": peak, **result}
    print(_table([row]).splitlines()[-1], flush=True)  # each row as it finishes: the full run takes hours
    return row


def _cli_row(args: argparse.Namespace) -> dict[str, Any]:
    """The 281M checkpoint through `python -m fxpress compile --max-memory 1GiB --export onnx` (target <= 1.25 GiB)."""
    model, out = _checkpoint("281m"), tempfile.mkdtemp(prefix="bench-scale-cli-")
    argv = [sys.executable, "-m", "fxpress", "compile", "--model", str(model), "--max-memory", "1GiB",
            "--passes", "rotate,fold_hadamard,quantize", "--set", "quantize.weights.method=gptq",
            "--seq-len", str(args.seq_len), "--calib-samples", str(args.samples), "--export", "onnx", "--out", out]
    code, wall, peak, _, error = run_child(argv)
    return {"model": "281m (CLI)", "params": _parameters("281m"), "budget": "1GiB", "ok": code == 0, "wall": wall,
            "peak": peak, **({} if code == 0 else {"error": error})}


def _torchrun_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`torchrun --nproc-per-node 2 -m fxpress compile` (gloo) against one process on SmolLM2: same codes, wall time."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    compile_args = ["compile", "--model", "smollm2", "--passes", "rotate,fold_hadamard,quantize", "--set",
                    f"quantize.weights.method={args.method}", "--seq-len", str(args.seq_len), "--calib-samples",
                    str(args.samples)]
    rows, saved = [], []
    for label, launcher in (("one process", [sys.executable, "-m", "fxpress"]),
                            ("torchrun x2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                             "-m", "fxpress"])):
        out = tempfile.mkdtemp(prefix="bench-scale-dist-")
        code, wall, peak, _, error = run_child([*launcher, *compile_args, "--out", out], env)
        program = Path(out) / "program"
        saved.append({k: v for f in program.glob("*.safetensors") for k, v in load_file(f).items()} if code == 0 else {})
        rows.append({"model": f"SmolLM2 {label}", "params": SMOLLM2_PARAMETERS, "budget": "-", "ok": code == 0, "wall": wall,
                     "peak": peak, **({} if code == 0 else {"error": error})})
    a, b = saved
    rows[-1]["greedy_equal"] = f"codes equal: {a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)}"
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | budget | ok | greedy ORT = torch | wall s | peak RSS GiB | compile peak GiB | stages (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        compile_peak = f"{r['compile_peak'] / 2**30:.2f}" if "compile_peak" in r else "-"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("times", {}).items()) or r.get("error", "")[:160]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['budget']} | {r['ok']} | "
                     f"{r.get('greedy_equal', '-')} | {r['wall']:.1f} | {r['peak'] / 2**30:.2f} | {compile_peak} | {stages} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="smollm2,281m,0.5b,1.5b,2.5b", help="smollm2 or random-init sizes of scale_models.py")
    parser.add_argument("--only", default="sizes,cli", help=f"parts to run, of {','.join(PARTS)}")
    parser.add_argument("--method", default="gptq", choices=("rtn", "gptq"))
    parser.add_argument("--max-memory", default="4GiB")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens compared between PyTorch and ORT")
    parser.add_argument("--no-export", action="store_true", help="compile only: no ONNX export and no ORT check")
    parser.add_argument("--quick", action="store_true", help="the tiny model, RTN, 4 x 64 tokens: about a minute")
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(streamed_child(job) if job.get("streamed") else child(job)))
        return
    if args.quick:
        args.sizes, args.only, args.method, args.seq_len, args.samples, args.max_memory = "tiny", "sizes", "rtn", 64, 4, "2GiB"
    parts = set(args.only.split(","))
    rows = []
    if "sizes" in parts:
        rows += [_row(name, _parameters(name), _job(name, args)) for name in args.sizes.split(",")]
    if "cli" in parts:
        rows.append(_cli_row(args))
    if "moe" in parts:
        rows.append(_row("moe-1.2b W4", _parameters("moe-1.2b"), _job("moe-1.2b", args, experts="uniform")))
    if "moe-experts" in parts:
        rows.append(_row("moe-1.2b mixed 2-4 bit experts", _parameters("moe-1.2b"),
                         _job("moe-1.2b", args, experts="mixed")))
    if "w4a4" in parts:
        rows.append(_row("0.5b W4A4KV4", _parameters("0.5b"), _job("0.5b", args, w4a4kv4=True)))
    if "streamed" in parts:
        job = {**_job("tiny", args, streamed=True), "model": "smollm2"}
        rows.append(_row("SmolLM2-135M streamed vs in memory", SMOLLM2_PARAMETERS, job))
    if "torchrun" in parts:
        rows += _torchrun_rows(args)
    from fxpress.budget import peak_resident_bytes

    print(f"load average {os.getloadavg()[0]:.1f}; this parent's own peak {peak_resident_bytes() / 2**30:.2f} GiB "
          "(a child's peak below is its own where it is above this)")
    print(_table(rows))


if __name__ == "__main__":
    main()
