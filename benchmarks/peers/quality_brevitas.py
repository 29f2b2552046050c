"""brevitas's LLM entry point (brevitas_ptq_llm) on SmolLM2-135M with fxpress's protocol (venv .venvs/brevitas).

brevitas_ptq_llm reads its calibration text from the Hugging Face Hub (wikitext2, c4), which this
machine cannot reach; its dataset loader is replaced by the same 64 x 128 "calib" windows every tool
gets, and everything else is its own code path (`quantize_llm`), which returns the quantized model.
Rows: weights per group (GPTQ with act-order), activations per row (token), dynamic; '+rotation' adds
its fused Hadamard rotation (QuaRot-style, `--rotation fused_no_fx`). GPTQ runs block by block
(`--gpxq-block-name model.layers`, brevitas's own option for models it does not trace with FX): without it,
brevitas runs the calibration set through the whole model once per linear, stopping at that linear, so its
time grows with depth (on SmolLM2, 1.5 s for the first linear and 15 s by the 32nd of 210, hours in all).
Its block-wise loop moves each block's inputs to 'cuda' unconditionally ("AssertionError: Torch not compiled
with CUDA enabled" on this CPU-only machine), so the script maps that device to the CPU when CUDA is absent:
the only change to brevitas's code path.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import quality_protocol as protocol  # noqa: E402

# setting -> (weight bits, group size, activation bits or None)
SETTINGS = {"W4A16_g64": (4, 64, None), "W4A8_g64": (4, 64, 8), "W4A4_g64": (4, 64, 4), "W8A8": (8, 64, 8)}


def cli(model_dir: str, calib: torch.Tensor, setting: str, rotation: bool) -> list[str]:
    w, group, a = SETTINGS[setting]
    argv = ["--model", model_dir, "--dtype", "float32", "--nsamples", str(len(calib)), "--seqlen",
            str(calib.shape[1]), "--weight-bit-width", str(w), "--weight-quant-granularity", "per_group",
            "--weight-group-size", str(group), "--gptq", "--gpxq-act-order", "--gpxq-block-name", "model.layers"]
    if a is not None:
        argv += ["--input-bit-width", str(a), "--input-quant-granularity", "per_row", "--input-scale-type",
                 "dynamic", "--input-quant-type", "asym"]
    return argv + (["--rotation", "fused_no_fx", "--replace-rmsnorm"] if rotation else [])


def _on_available_device(send_to_device, obj, device):
    """accelerate's send_to_device, with brevitas's hard-coded 'cuda' read as the CPU where there is no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    return send_to_device(obj, device)


def make(name: str, model_dir: str):
    setting, _, variant = name.partition("+")

    def quantize(_model, calib: torch.Tensor):
        from brevitas_examples.common.parse_utils import override_defaults, parse_args
        from brevitas_examples.llm import main as llm_main
        from brevitas_examples.llm.llm_args import create_args_parser
        from brevitas_examples.llm.llm_quant import gpxq
        from datasets import Dataset

        llm_main.get_dataset_for_model = lambda **_: Dataset.from_dict({"input_ids": calib.tolist()})
        gpxq.send_to_device = partial(_on_available_device, gpxq.send_to_device)
        argv = cli(model_dir, calib, setting, variant == "rotation")
        args, extra = parse_args(create_args_parser(), argv, override_defaults=override_defaults(argv))
        _, model = llm_main.quantize_llm(args, extra)
        return model.float().eval()

    return quantize


if __name__ == "__main__":
    import json
    from importlib.metadata import version

    windows = sys.argv[sys.argv.index("--windows") + 1]
    model_dir = json.loads(Path(windows).read_text())["model_dir"]
    names = [s + v for s in SETTINGS for v in ("", "+rotation")]
    protocol.run("brevitas", version("brevitas"), {n: make(n, model_dir) for n in names})
