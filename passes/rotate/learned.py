"""Learned rotations (SpinQuant, arXiv 2405.16406): R1 and per-layer R2 trained by Cayley optimisation.

Why a training copy of the graph and no weight rewriting: with the norm scales already folded, a rotated
model computes the same as the unrotated one except where activations are quantized. So the loss the final
W?A4KV4 model will have is the loss of the unrotated graph in which every quantized linear input is
replaced by `Q(x R) R^T` (R1 on stream readers, block-diagonal R2 on o_proj inputs) and every value vector
written to the cache by `Q(v R2) R2^T`. The copy shares the frozen fp32 weights; only the rotations
(`torch.nn.utils.parametrizations.orthogonal`, Cayley map, trivialised at the random-Hadamard start) get
gradients, through a straight-through rounding. The online Hadamards FoldHadamard adds later (R3 after RoPE,
R4 before down_proj) do not depend on R1/R2, so the training graph leaves them and the quantizers behind
them (key cache, down_proj input) out: training sees exactly the error R1/R2 can change.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.nn.utils import parametrizations, parametrize

from fxpress import graph as G
from fxpress.runtime.quant import QuantSpec, fake_quant_ste


class Orthogonal(nn.Module):
    """An n x n rotation kept exactly orthogonal: `base @ cayley(A)` (torch's orthogonal parametrization with
    trivialization), starting at `base` = the given matrix with A = 0."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.holder = nn.Linear(start.shape[0], start.shape[0], bias=False)
        parametrizations.orthogonal(self.holder, orthogonal_map="cayley", use_trivialization=True)
        with torch.no_grad():
            self.holder.weight = start.to(torch.float32)  # right_inverse: base <- start, A <- 0

    def matrix(self) -> torch.Tensor:
        return self.holder.weight

    def exact(self) -> torch.Tensor:
        """The learned matrix in float64, projected to the nearest orthogonal one (polar factor): the fp32
        Cayley solve is orthogonal to ~1e-6, the rewrite of the weights wants it to ~1e-15."""
        u, _, vh = torch.linalg.svd(self.matrix().detach().to(torch.float64))
        return u @ vh


class RotatedQuant(nn.Module):
    """x -> Q(x R) R^T, with R block-diagonal (the same rotation on every `size`-wide slice) when the last
    axis is wider than R; `quant_width` > 0 quantizes per slice of that width (per head), else per row."""

    def __init__(self, rotation: Orthogonal, spec: QuantSpec, quant_width: int = 0):
        super().__init__()
        self.rotation, self.spec, self.quant_width = rotation, spec, quant_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rotation.matrix()
        n = r.shape[0]
        shape = x.shape
        y = x.reshape(*shape[:-1], -1, n) @ r
        if self.quant_width:
            y = fake_quant_ste(y.reshape(*shape[:-1], -1, self.quant_width), self.spec)
        else:
            y = fake_quant_ste(y.reshape(shape), self.spec)
        return (y.reshape(*shape[:-1], -1, n) @ r.T).reshape(shape)


@dataclass
class Options:
    steps: int
    lr: float
    act: QuantSpec
    kv: QuantSpec | None
    skip: tuple[str, ...] = ("lm_head",)


def training_graph(gm: GraphModule, stream: G.ResidualStream, r1: Orthogonal, r2: dict[int, Orthogonal],
                   opts: Options) -> tuple[GraphModule, dict[str, int]]:
    """A GraphModule sharing `gm`'s weights whose quantized linears see their inputs through the rotations."""
    graph = Graph()
    remap: dict[Node, Node] = {}
    out = graph.graph_copy(gm.graph, remap)
    graph.output(out)
    train = GraphModule(gm, graph)
    train.add_submodule("spin_r1", RotatedQuant(r1, opts.act))
    counts = {"r1_inputs": 0, "r2_o_inputs": 0, "r2_values": 0}
    for use in stream.readers:
        if any(re.search(p, use.name) for p in opts.skip):
            continue
        node, x = remap[use.node], remap[use.input]
        with graph.inserting_before(node):
            q = graph.call_module("spin_r1", (x,))
        node.replace_input_with(x, q)
        counts["r1_inputs"] += 1
    for block in G.decoder_blocks(gm, stream):
        att = block.attention.attention if block.attention else None
        if att is None or block.index not in r2:
            continue
        hd = att.v_head_dim
        train.add_submodule(f"spin_r2_o{block.index}", RotatedQuant(r2[block.index], opts.act))
        node, x = remap[att.o_proj.node], remap[att.o_proj.input]
        with graph.inserting_before(node):
            q = graph.call_module(f"spin_r2_o{block.index}", (x,))
        node.replace_input_with(x, q)
        counts["r2_o_inputs"] += 1
        if opts.kv is not None:
            train.add_submodule(f"spin_r2_v{block.index}", RotatedQuant(r2[block.index], opts.kv, quant_width=hd))
            v = remap[att.v_proj[0].node]
            users = list(v.users)
            with graph.inserting_after(v):
                q = graph.call_module(f"spin_r2_v{block.index}", (v,))
            for user in users:
                user.replace_input_with(v, q)
            counts["r2_values"] += 1
    train.recompile()
    return train, counts


def _loss(train: GraphModule, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids = inputs[0]
    logits = train(*inputs)[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def learn(gm: GraphModule, stream: G.ResidualStream, r1_start: torch.Tensor, r2_start: dict[int, torch.Tensor],
          batches: list[tuple[torch.Tensor, ...]], opts: Options, seed: int) -> dict:
    """Train R1 and every block's R2 to minimise next-token cross-entropy on `batches` (graph inputs) with the
    quantizers in the loop; returns the float64 rotations, the loss before/after on all batches and timing.

    Adam on the Cayley parameters (the skew-symmetric A of R = base @ (I + A/2)^-1 (I - A/2)), the rate
    decaying linearly to 0: every step is a rotation, exactly, whatever the step size.
    """
    torch.manual_seed(seed)
    r1 = Orthogonal(r1_start)
    r2 = {i: Orthogonal(m) for i, m in r2_start.items()}
    train, counts = training_graph(gm, stream, r1, r2, opts)
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = list(r1.parameters()) + [p for m in r2.values() for p in m.parameters()]
    optim = torch.optim.Adam(params, lr=opts.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0 - step / max(opts.steps, 1))  # as SpinQuant
    try:
        loss_start = _mean_loss(train, batches)
        start, losses = time.perf_counter(), []
        for step in range(opts.steps):
            with parametrize.cached():
                loss = _loss(train, batches[step % len(batches)])
                optim.zero_grad(set_to_none=True)
                loss.backward()
            optim.step()
            decay.step()
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - start
        loss_end = _mean_loss(train, batches)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    rotations = [r1, *r2.values()]
    exact = [m.exact() for m in rotations]
    return {"r1": exact[0], "r2": dict(zip(r2, exact[1:])), "loss_start": loss_start, "loss_end": loss_end,
            "step_losses": losses, "seconds_per_step": seconds / max(opts.steps, 1), **counts,
            "orthogonality_fp32": max(_off_identity(m.matrix().detach()) for m in rotations),
            "orthogonality_f64": max(_off_identity(e) for e in exact),
            "projection_change": max(float((e - m.matrix().detach().double()).abs().max()) for e, m in zip(exact, rotations)),
            "r1_change": float((exact[0] - r1_start.double()).norm())}


def _off_identity(r: torch.Tensor) -> float:
    """max |R^T R - I|: how far R is from orthogonal."""
    return float((r.T @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())


def _mean_loss(train: GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> float:
    with torch.no_grad(), parametrize.cached():
        return sum(float(_loss(train, b)) for b in batches) / len(batches)


def calibration_batches(samples: torch.Tensor, batch: int,
                        inputs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Graph inputs for `batch` calibration windows at a time (`inputs`: ids -> the graph's full inputs)."""
    for chunk in samples.split(batch):
        yield inputs(chunk)
