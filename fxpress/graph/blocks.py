"""Decoder blocks: the residual stream cut at its adds into attention and MLP/MoE parts, the one vocabulary
every pass uses for "a block"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxpress.graph.attention import Attention, attention_at
from fxpress.graph.linears import LinearUse
from fxpress.graph.moe import MoE, moe_at
from fxpress.graph.nodes import ROW_OPS, ancestors, calls, is_cast, is_op, tensor_users
from fxpress.graph.norms import Norm
from fxpress.graph.residual import ResidualStream, residual_stream

aten = torch.ops.aten


@dataclass
class Part:
    """One branch of a decoder block between reading the stream and adding back into it.

    `add` is the residual add closing the part; `residual` the stream value it adds the branch to.
    """

    kind: str  # "attention" | "mlp" | "moe"
    add: Node
    norm: Norm | None
    readers: list[LinearUse]
    writers: list[LinearUse]
    attention: Attention | None = None
    moe: MoE | None = None
    residual: Node | None = None


@dataclass
class Block:
    index: int
    attention: Part | None = None
    mlp: Part | None = None


def _norm_of(stream: ResidualStream, readers: list[LinearUse], segment: int) -> Norm | None:
    """The stream norm of `segment` whose output reaches these readers (through row ops and casts)."""
    inputs = {r.input for r in readers}
    for norm in stream.norms:
        if stream.segment.get(norm.input) != segment:
            continue
        stack, seen = [norm.output], set()
        while stack:
            node = stack.pop()
            if node in inputs:
                return norm
            for user in tensor_users(node):
                if user not in seen and (calls(user, ROW_OPS) or is_cast(user)):
                    seen.add(user)
                    stack.append(user)
    return None


def _part(stream: ResidualStream, index: int, sdpas: list[Node]) -> Part:
    """The part closed by the stream's `index`-th residual add: attention when an SDPA feeds its branch."""
    add = stream.adds[index]
    branch = next(a for a in add.args[:2] if isinstance(a, Node) and a not in stream.nodes)
    residual = next((a for a in add.args[:2] if isinstance(a, Node) and a is not branch), None)
    writers = [w for w in stream.writers if stream.writer_segment.get(w.node) == index]
    # readers of this segment that feed this add's writers (not readers of a later final norm)
    writer_anc = ancestors(branch, stream.nodes)
    readers = [r for r in stream.readers if stream.segment[r.input] == index and r.node in writer_anc]
    norm = _norm_of(stream, readers, index)
    sdpa = next((s for s in sdpas if s in writer_anc), None)
    if sdpa is not None:
        return Part("attention", add, norm, readers, writers, attention=attention_at(sdpa, writers), residual=residual)
    moe = moe_at(readers, writers, stream.nodes)
    return Part("moe" if moe else "mlp", add, norm, readers, writers, moe=moe, residual=residual)


def decoder_blocks(gm: GraphModule, stream: ResidualStream | None = None) -> list[Block]:
    """Split the stream into blocks: each residual add closes one part (attention, MLP or MoE)."""
    stream = stream or residual_stream(gm, strict=False)
    sdpas = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]
    blocks: list[Block] = []
    for index in range(len(stream.adds)):
        part = _part(stream, index, sdpas)
        if part.kind == "attention" or not blocks or blocks[-1].mlp is not None:
            blocks.append(Block(index=len(blocks)))
        if part.kind == "attention":
            blocks[-1].attention = part
        else:
            blocks[-1].mlp = part
    return blocks


def attentions(blocks: list[Block]) -> list[Attention]:
    """The attention of every block that has one, in order."""
    return [b.attention.attention for b in blocks if b.attention and b.attention.attention]


def moe_blocks(gm: GraphModule, stream: ResidualStream | None = None) -> list[MoE]:
    """The MoE of every block whose MLP is one, in order."""
    return [b.mlp.moe for b in decoder_blocks(gm, stream) if b.mlp and b.mlp.moe]


def down_projections(blocks: list[Block]) -> list[LinearUse]:
    """Every MLP down projection (dense, shared expert, each routed expert / fused expert tensor)."""
    return [use for b in blocks if b.mlp is not None for use in b.mlp.writers]
