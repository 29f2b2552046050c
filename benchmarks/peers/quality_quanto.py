"""optimum-quanto on SmolLM2-135M with fxpress's quality protocol (venv .venvs/quanto).

quanto quantizes weights per output channel at 8 bits and in groups of 128 at 4 bits (its fixed group
size), symmetric; 8-bit activations are static per tensor, their scales calibrated on the same
64 x 128 "calib" windows as every other tool. lm_head stays fp32, as in fxpress's rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import quality_protocol as protocol  # noqa: E402

# setting -> (weight qtype name, activation qtype name or None)
SETTINGS = {"W4A16_g128": ("qint4", None), "W8A16_ch": ("qint8", None), "W8A8": ("qint8", "qint8")}


def make(name: str):
    weights, acts = SETTINGS[name]

    def quantize(model, calib: torch.Tensor):
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, weights),
                        activations=getattr(quanto, acts) if acts else None, exclude="lm_head")
        if acts:
            with torch.no_grad(), quanto.Calibration():
                for batch in calib.split(8):
                    model(input_ids=batch)
        quanto.freeze(model)
        return model.eval()

    return quantize


if __name__ == "__main__":
    from importlib.metadata import version

    protocol.run("optimum-quanto", version("optimum-quanto"), {n: make(n) for n in SETTINGS})
