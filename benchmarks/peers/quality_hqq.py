"""HQQ (half-quadratic, calibration-free) on SmolLM2-135M with fxpress's quality protocol (venv .venvs/hqq).

Every decoder linear becomes an HQQLinear (lm_head and the embedding stay fp32, as in fxpress's rows);
weights are dequantized and multiplied in float32 on the CPU. '+axis0' groups along the input axis of
HQQ's reshaped weight (its higher-quality layout); the default is axis=1, the layout its fast kernels need.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import quality_protocol as protocol  # noqa: E402

SETTINGS = {"W4A16_g128": (4, 128), "W4A16_g64": (4, 64), "W3A16_g128": (3, 128), "W3A16_g64": (3, 64),
            "W8A16_g128": (8, 128)}


def make(name: str):
    setting, _, variant = name.partition("+")
    bits, group = SETTINGS[setting]

    def quantize(model, _calib: torch.Tensor):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        config = BaseQuantizeConfig(nbits=bits, group_size=group, axis=0 if variant == "axis0" else 1)
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32, device="cpu")
        return model.eval()

    return quantize


if __name__ == "__main__":
    from importlib.metadata import version

    names = [s + v for s in SETTINGS for v in ("", "+axis0")]
    protocol.run("HQQ", version("hqq"), {n: make(n) for n in names})
