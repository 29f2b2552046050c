"""brevitas's LLM entry point (brevitas_ptq_llm) on SmolLM2-135M with fxpress's protocol (venv .venvs/brevitas).

brevitas_ptq_llm reads its calibration text from the Hugging Face Hub (wikitext2, c4), which this
machine cannot reach; its dataset loader is replaced by the same 64 x 128 "calib" windows every tool
gets, and everything else is its own code path (`quantize_llm`), which returns the quantized model.
Rows: weights per group (GPTQ with act-order), activations per row (token), dynamic; '+rotation' adds
its fused Hadamard rotation (QuaRot-style: `--rotation fused_no_fx --rotation-orphan-sink --rotation-sdpa-regions`). GPTQ runs block by block
(`--gpxq-block-name model.layers`, brevitas's own option for models it does not trace with FX): without it,
brevitas runs the calibration set through the whole model once per linear, stopping at that linear, so its
time grows with depth (on SmolLM2, 1.5 s for the first linear and 15 s by the 32nd of 210, hours in all).
Two fixes for this CPU-only machine, neither in brevitas's quantization: its block-wise loop moves each block's
inputs to 'cuda' unconditionally ("AssertionError: Torch not compiled with CUDA enabled"), so that device is read
as the CPU when CUDA is absent; and its final `remove_hooks` fails inside accelerate on its quantizer injectors
(`_answer_accelerate`).
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


# variant -> (rotation, GPTQ): '-rtn' rows keep brevitas's round-to-nearest weights (no GPTQ)
VARIANTS = {"": (False, True), "+rotation": (True, True), "+rtn": (False, False), "+rotation-rtn": (True, False)}


def cli(model_dir: str, calib: torch.Tensor, setting: str, rotation: bool, gptq: bool) -> list[str]:
    w, group, a = SETTINGS[setting]
    argv = ["--model", model_dir, "--dtype", "float32", "--nsamples", str(len(calib)), "--seqlen",
            str(calib.shape[1]), "--weight-bit-width", str(w), "--weight-quant-granularity", "per_group",
            "--weight-group-size", str(group)]
    if gptq:
        argv += ["--gptq", "--gpxq-act-order", "--gpxq-block-name", "model.layers"]
    if a is not None:
        argv += ["--input-bit-width", str(a), "--input-quant-granularity", "per_row", "--input-scale-type",
                 "dynamic", "--input-quant-type", "asym"]
    # QuaRot's set: R1 fused into the residual stream, R2 across attention (v/o), online Hadamards where nothing
    # can absorb one (the down_proj inputs: "orphan sinks")
    return argv + (["--rotation", "fused_no_fx", "--replace-rmsnorm", "--rotation-orphan-sink",
                    "--rotation-sdpa-regions"] if rotation else [])


def _on_available_device(send_to_device, obj, device):
    """accelerate's send_to_device, with brevitas's hard-coded 'cuda' read as the CPU where there is no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    return send_to_device(obj, device)


def _answer_accelerate(injector_base) -> None:
    """Give brevitas's quantizer injectors the attribute accelerate's `remove_hook_from_module` probes on every
    value of a module's __dict__ (`getattr(value, "_accelerate_added_attribute", False)`): an injector raises
    DependencyError, not AttributeError, for a name it lacks, so brevitas's own final `remove_hooks` fails
    (accelerate 1.16 with brevitas 0.13.4). Set on the base class, past the injector's metaclass."""
    type.__setattr__(injector_base, "_accelerate_added_attribute", False)


def make(name: str, model_dir: str):
    setting = name.partition("+")[0]
    rotation, gptq = VARIANTS[name[len(setting):]]

    def quantize(_model, calib: torch.Tensor):
        from brevitas.inject import ExtendedInjector
        from brevitas_examples.common.parse_utils import override_defaults, parse_args
        from brevitas_examples.llm import main as llm_main
        from brevitas_examples.llm.llm_args import create_args_parser
        from brevitas_examples.llm.llm_quant import gpxq
        from datasets import Dataset

        llm_main.get_dataset_for_model = lambda **_: Dataset.from_dict({"input_ids": calib.tolist()})
        if not isinstance(gpxq.send_to_device, partial):  # once per process
            gpxq.send_to_device = partial(_on_available_device, gpxq.send_to_device)
            _answer_accelerate(ExtendedInjector)
        argv = cli(model_dir, calib, setting, rotation, gptq)
        args, extra = parse_args(create_args_parser(), argv, override_defaults=override_defaults(argv))
        _, model = llm_main.quantize_llm(args, extra)
        return model.float().eval()

    return quantize


if __name__ == "__main__":
    import json
    from importlib.metadata import version

    windows = sys.argv[sys.argv.index("--windows") + 1]
    model_dir = json.loads(Path(windows).read_text())["model_dir"]
    names = [s + v for s in SETTINGS for v in VARIANTS]
    protocol.run("brevitas", version("brevitas"), {n: make(n, model_dir) for n in names})
