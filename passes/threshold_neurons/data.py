"""The data `threshold_neurons` plans and fine-tunes on, and the model outputs and accuracy it reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fxpress.calibration import collect_activations, program_inputs
from fxpress.errors import ConfigError

if TYPE_CHECKING:
    from fxpress.program import Program

DATA_KEY = "train_data"
EVAL_KEY = "eval_data"
CHUNK = 512  # the captured graph guards batch <= 1024


def training_data(program: Program) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(inputs, targets or None) from `program.metadata[DATA_KEY]`, else the calibration inputs, else (None, None)."""
    data = program.metadata.get(DATA_KEY)
    if callable(data):
        data = data()
    if data is None and program.calibration is not None:
        data = program.calibration.batches
    if data is None:
        return None, None
    if isinstance(data, torch.Tensor):
        return (data if program.is_causal_lm else data.float()), None  # a causal LM reads token ids
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"{DATA_KEY}: inputs have {x.shape[0]} samples but targets {y.shape[0]}")
        return x.float(), y
    raise ConfigError(f"program.metadata['{DATA_KEY}'] must be inputs, (inputs, targets) or a callable returning them")


def activations(program: Program, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    acts = collect_activations(program, names, list(inputs.split(CHUNK)))
    return {k: torch.cat(v) for k, v in acts.items()}


def model_outputs(program: Program, inputs: torch.Tensor) -> torch.Tensor:
    outs = []
    for chunk in inputs.split(CHUNK):
        out = program.run(*program_inputs(program, chunk))  # through the weight store when the program has one
        outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return torch.cat(outs)


def eval_accuracy(program: Program) -> float | None:
    """Top-1 accuracy on `program.metadata[EVAL_KEY] = (inputs, class ids)`, when given."""
    data = program.metadata.get(EVAL_KEY)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return None
    x, y = data
    out = model_outputs(program, x.float())
    return float((out.argmax(-1) == y).float().mean())
