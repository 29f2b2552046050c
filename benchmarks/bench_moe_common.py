"""What bench_moe.py and bench_moe_export.py share: the measured programs (`MODELS`) and the report file.

benchmarks/results/moe.md has two parts: the allocation study (written by bench_moe.py) and the
exported artifacts (written by bench_moe_export.py, from EXPORT_HEADING on). Each script rewrites
only its own part, atomically, and keeps the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.data import token_windows
from fxpress.moe_model import load_tiny_moe, load_tiny_qwen2_moe

REPORT = Path(__file__).parent / "results" / "moe.md"
EXPORT_HEADING = "## Exported artifacts"
PARTS = ("allocation", "export")


@dataclass(frozen=True)
class MoeModel:
    """One shipped MoE and the text splits it is measured on (`fxpress.data`)."""

    load: Callable
    description: str  # architecture and training, for the report
    calib: str
    heldout: str
    eval: str
    report: Path


MODELS = {
    "tiny_moe": MoeModel(
        load_tiny_moe, "Mixtral architecture, 4 layers, 8 experts per layer, top-2, no shared "
        "expert, trained by `python examples/train_moe.py` on the \"train\" split (the Python library reference)",
        "calib", "heldout", "eval", REPORT),
    "tiny_qwen2_moe": MoeModel(
        load_tiny_qwen2_moe, "Qwen2-MoE architecture, 4 layers, 8 routed experts per layer, "
        "top-2 (weights not renormalised) plus a sigmoid-gated shared expert per layer, trained by "
        "`python examples/train_moe.py --arch qwen2_moe` on King James prose (every book but Genesis, Luke and Acts)",
        "prose_calib", "prose_heldout", "prose_eval", REPORT.with_name("moe_qwen2.md")),
}


def tiny_moe_program(calib_windows: int, seq: int = 128, model: str = "tiny_moe"):
    """A trained tiny MoE (`MODELS`) captured, with `calib_windows` x `seq` tokens of its calibration split; and its
    tokenizer."""
    spec = MODELS[model]
    net, tokenizer = spec.load()
    program = capture(net)
    program.calibration = Calibration(token_windows(tokenizer, spec.calib, seq, calib_windows))
    return program, tokenizer


def with_selection(program, tokenizer, windows: int, seq: int = 128, split: str = "heldout") -> int:
    """Append `windows` x `seq` tokens of `split` (held-out text: the FAQ, or Acts for the prose model) to the
    calibration; returns how many, for `QuantizeExperts(budget=ExpertBudget(selection_samples=...))`, which keeps
    them out of the analysis and scores plans on them."""
    if windows:
        held = token_windows(tokenizer, split, seq, windows)
        program.calibration = Calibration(torch.cat([program.calibration.batches, held]))
        return held.shape[0]
    return 0


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _split(text: str) -> dict[str, str]:
    head, sep, tail = text.partition("\n" + EXPORT_HEADING)
    return {"allocation": head.strip("\n"), "export": (EXPORT_HEADING + tail).strip("\n") if sep else ""}


def write_part(part: str, lines: list[str], path: Path = REPORT) -> None:
    """Replace one part of the report (see the module docstring), keep the other, write atomically."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if part == "export" and not lines[0].startswith(EXPORT_HEADING):
        raise ValueError(f"the export part must start with {EXPORT_HEADING!r}")
    parts = _split(path.read_text()) if path.exists() else {p: "" for p in PARTS}
    parts[part] = "\n".join(lines).strip("\n")
    text = "\n\n".join(parts[p] for p in PARTS if parts[p]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"wrote the {part} part of {path}")


def describe_machine(threads: int) -> str:
    import platform

    return f"{platform.machine()}, torch {torch.__version__}, {threads} thread(s)"
