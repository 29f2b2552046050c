"""llm-compressor on SmolLM2-135M with fxpress's quality protocol (run in benchmarks/peers/.venvs/llmcompressor).

Settings are 'SETTING' (GPTQ alone) or 'SETTING+TRANSFORM': '+quip' is its QuIP-style random-Hadamard
transform (U and V around every linear) before GPTQ, '+spinquant' its SpinQuant-style R1+R2 random Hadamards
(its deterministic one refuses width 576), '+smoothquant' SmoothQuant (strength 0.8) before GPTQ, '+rtn' round-to-nearest (its QuantizationModifier,
no GPTQ). GPTQ: static act-order, its default dampening,
symmetric weights (its presets) unless '+asym'; activations per token, dynamic, symmetric (its presets).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import quality_protocol as protocol  # noqa: E402

# setting -> (weight bits, group size or -1 per channel, activation bits or None, KV bits or None)
SETTINGS = {"W4A16_g128": (4, 128, None, None), "W4A16_g64": (4, 64, None, None), "W4A16_ch": (4, -1, None, None),
            "W3A16_g128": (3, 128, None, None), "W3A16_g64": (3, 64, None, None), "W8A8": (8, -1, 8, None),
            "W4A8": (4, 128, 8, None),
            "W4A4": (4, 128, 4, None), "W4A4KV4": (4, 128, 4, 4),
            # its groups must divide SmolLM2's 576 columns, so 128 fails: the 4-bit-activation rows at g64
            "W4A8_g64": (4, 64, 8, None), "W4A4_g64": (4, 64, 4, None), "W4A4KV4_g64": (4, 64, 4, 4)}
TRANSFORMS = ("", "quip", "spinquant", "smoothquant", "asym", "rtn")


def scheme(w: int, group: int, a: int | None, symmetric: bool, gptq: bool = True):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=w, type="int", symmetric=symmetric, dynamic=False,
                               strategy="channel" if group == -1 else "group",
                               group_size=None if group == -1 else group,
                               actorder="static" if gptq and group != -1 else None)
    acts = None if a is None else QuantizationArgs(num_bits=a, type="int", strategy="token", symmetric=True,
                                                   dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def recipe(setting: str, transform: str) -> list:
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    w, group, a, kv = SETTINGS[setting]
    kv_args = None if kv is None else QuantizationArgs(num_bits=kv, type="int", strategy="tensor",
                                                       symmetric=False, dynamic=False)
    mods: list = {"quip": [QuIPModifier(rotations=["v", "u"], transform_type="random-hadamard")],
                  "spinquant": [SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard")],
                  "smoothquant": [SmoothQuantModifier(smoothing_strength=0.8)]}.get(transform, [])
    kind = QuantizationModifier if transform == "rtn" else GPTQModifier
    mods.append(kind(config_groups={"group_0": scheme(w, group, a, transform != "asym", transform != "rtn")},
                     ignore=["lm_head"], kv_cache_scheme=kv_args))
    return mods


def make(name: str):
    setting, _, transform = name.partition("+")

    def quantize(model, calib: torch.Tensor):
        from datasets import Dataset
        from llmcompressor import oneshot

        data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        oneshot(model=model, dataset=data, recipe=recipe(setting, transform), num_calibration_samples=len(calib),
                max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
        return model.eval()

    return quantize


if __name__ == "__main__":
    from importlib.metadata import version

    names = [s + (f"+{t}" if t else "") for s in SETTINGS for t in TRANSFORMS]
    protocol.run("llm-compressor", version("llmcompressor"), {n: make(n) for n in names})
