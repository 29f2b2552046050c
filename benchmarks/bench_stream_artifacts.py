"""Peak RSS of save / lazy load + ONNX export / ONNX Runtime: store-backed vs in-memory, each phase in a fresh child
process (156M-parameter Llama, bf16 checkpoint written once). Usage: python benchmarks/bench_stream_artifacts.py main WORKDIR"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("bench-stream-work")
CKPT = ROOT / "ckpt"


def make_checkpoint():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(CKPT, max_shard_size="150MB")


def phase(mode, stored):
    import importlib

    import torch

    from fxpress.budget import peak_resident_bytes
    from fxpress.lowering.onnx import export_onnx
    from fxpress.passes import Quantize
    from fxpress.passes.manager import run_passes
    from fxpress.passes.quantize.config import WeightQuant
    from fxpress.serialize import load_program, save_program

    cap = importlib.import_module("fxpress.capture")
    out = ROOT / ("stored" if stored else "memory")
    t = time.time()
    if mode == "compile_save":
        if stored:
            p = cap.capture_stored(str(CKPT), dtype=torch.float32, budget=64 * 2**20)
        else:
            from transformers import LlamaForCausalLM
            p = cap.capture(LlamaForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval())
        run_passes(p, [Quantize(weights=WeightQuant(bits=4, group_size=32))], progress=False)
        save_program(p, out / "program", overwrite=True, shard_bytes=256 * 2**20)
    elif mode == "load_export":
        p, _ = load_program(out / "program", lazy=stored)
        export_onnx(p, out / "model.onnx", overwrite=True)
    elif mode == "ort":
        from fxpress.runtime.runners import OnnxRunner
        ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        logits = OnnxRunner(out / "model.onnx")(ids)
        torch.save(logits, out / "ort_logits.pt")
    print(json.dumps({"mode": mode, "stored": stored, "seconds": round(time.time() - t, 1),
                      "peak_rss_MiB": round(peak_resident_bytes() / 2**20)}))


if __name__ == "__main__":
    if sys.argv[1] == "child":
        phase(sys.argv[3], sys.argv[4] == "1")
        sys.exit(0)
    if not CKPT.exists():
        make_checkpoint()
    for mode in ("compile_save", "load_export", "ort"):
        for stored in (1, 0):
            r = subprocess.run([sys.executable, __file__, "child", str(ROOT), mode, str(stored)], capture_output=True, text=True)
            line = [out for out in r.stdout.splitlines() if out.startswith("{")]
            print(mode, "stored" if stored else "memory", "rc", r.returncode, line, flush=True)
            if r.returncode:
                print(r.stderr[-3000:])
