"""The signature an artifact is exported with: input/output names, example tensors and dynamic dims.

Serialization and every lowering re-export a Program with the same signature, so it lives in the core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from fxpress.errors import LoweringError
from fxpress.program import Program

EXPORT_BATCH, EXPORT_SEQ, EXPORT_PAST = 2, 8, 3  # > 1 so that export keeps the dims symbolic


@dataclass
class Signature:
    """Names, example tensors and dynamic dims of an artifact's inputs and outputs."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_args: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Dim], ...]
    dim_names: dict[str, str]  # export symbol (e.g. "s70") -> readable name ("seq"), filled after export


def signature(program: Program) -> Signature:
    """Example arguments and dynamic shapes: (input_ids, past_keys, past_values) for causal LMs."""
    info = program.info
    if program.is_causal_lm:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, info.vocab_size or 100, (EXPORT_BATCH, EXPORT_SEQ), generator=generator)
        past_k, past_v = program.empty_cache(EXPORT_BATCH, info.torch_activation_dtype)
        past_k = past_k.new_zeros(*past_k.shape[:3], EXPORT_PAST, past_k.shape[4])
        past_v = past_v.new_zeros(*past_v.shape[:3], EXPORT_PAST, past_v.shape[4])
        batch = Dim("batch", min=1, max=1024)
        seq = Dim("seq", min=1, max=8192)
        past = Dim("past", min=0, max=8192)
        shapes = ({0: batch, 1: seq}, {1: batch, 3: past}, {1: batch, 3: past})
        names_in = info.input_names or ("input_ids", "past_keys", "past_values")
        names_out = info.output_names or ("logits", "present_keys", "present_values")
        return Signature(tuple(names_in), tuple(names_out), (ids, past_k, past_v), shapes, {})
    args = tuple(program.example_inputs)
    for t in args:
        if t.ndim == 0 or t.shape[0] < 2:
            raise LoweringError(
                f"example input of shape {tuple(t.shape)} has no batch dimension >= 2: capture the model with a "
                "batch of at least 2 so the artifact keeps a dynamic batch"
            )
    batch = Dim("batch", min=1, max=1024)
    names_in = info.input_names or tuple(f"input_{i}" for i in range(len(args)))
    names_out = info.output_names or ("output",)
    return Signature(tuple(names_in), tuple(names_out), args, tuple({0: batch} for _ in args), {})
