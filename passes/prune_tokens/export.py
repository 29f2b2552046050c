"""Re-exporting a rewritten causal-LM graph to plain ATen, so later passes and lowerings see shapes on every node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fxpress.errors import CaptureError

if TYPE_CHECKING:
    from fxpress.program import Program


def export_inputs(program: Program) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Example inputs and dynamic shapes for re-exporting a causal-LM graph (sizes > 1: no specialisation)."""
    from torch.export import Dim

    from fxpress.capture import EXPORT_BATCH, EXPORT_PAST, EXPORT_SEQ, MAX_BATCH, MAX_SEQ

    info = program.info
    ids = torch.randint(0, info.vocab_size or 2, (EXPORT_BATCH, EXPORT_SEQ), generator=torch.Generator().manual_seed(0))
    keys = torch.zeros(info.num_layers, EXPORT_BATCH, info.key_shape[0], EXPORT_PAST, info.key_shape[1])
    values = torch.zeros(info.num_layers, EXPORT_BATCH, info.value_shape[0], EXPORT_PAST, info.value_shape[1])
    batch, seq, past = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=MAX_SEQ), Dim("past", min=0, max=MAX_SEQ)
    names = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    shapes = {names[0]: {0: batch, 1: seq}, names[1]: {1: batch, 3: past}, names[2]: {1: batch, 3: past}}
    return (ids, keys, values), shapes


def retrace(program: Program) -> None:
    """Re-export the rewritten module so it is plain ATen again, with shapes on every node."""
    args, shapes = export_inputs(program)
    try:
        exported = torch.export.export(program.module, args, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # export raises many error types
        raise CaptureError(f"prune_tokens: the pruned graph no longer exports: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from err
    program.module = exported.module()


def ensure_meta(program: Program) -> None:
    """Shapes are read from node metadata; re-export first if an earlier pass left nodes without it."""
    skip = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}
    missing = [n for n in program.graph.nodes if n.op == "call_function" and n.target not in skip and "val" not in n.meta]
    if missing:
        retrace(program)
