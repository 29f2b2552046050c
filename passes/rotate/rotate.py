"""Rotate: fold norm scales, untie embeddings, rotate the residual stream (R1) and each head's values (R2).

QuaRot / SpinQuant / DFRot as one graph pass: the residual stream, its readers and writers are found
in the graph (`fxpress.graph.residual_stream`), so the same code serves dense and MoE models
(routers, shared experts, fused 3-D or per-expert experts). With an orthogonal Q (H x H):
readers W -> W Q, writers W -> Q^T W (and biases), embedding rows E -> E Q; RMSNorm commutes with Q
once its scale is folded into the readers. R2 (head_dim) rotates v_proj outputs and o_proj inputs.

Modes: "hadamard" (random signs times a Hadamard, the default), "orthogonal" (Haar random, QR with
sign fix) and "dfrot" (start from the random Hadamard, then alternate B = quant(A R) and the
orthogonal Procrustes step R = U V^T from svd(A^T W B), rows of massive-activation tokens weighted
by alpha, on the RMSNorm outputs of calibration text) and "learned" (SpinQuant: R1 and one R2 per layer
start from the random Hadamards and are trained by Cayley optimisation to minimise the next-token loss on
calibration text with the activation and value-cache quantizers in the loop; `learned.py`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from fxpress import graph as G
from fxpress.budget import REWRITE_SLICE_BYTES
from fxpress.errors import ConfigError
from fxpress.passes.base import ROTATED, UNCOMPRESSED, Pass, check_choice, check_range, register_pass
from fxpress.program import Program
from fxpress.runtime.hadamard import (
    FALLBACKS,
    Rotation,
    random_hadamard_rotation,
    random_orthogonal_rotation,
)

MODES = ("hadamard", "orthogonal", "dfrot", "learned")


def quantize_rtn(x: torch.Tensor, bits: int, group_size: int = 0, clip_ratio: float = 1.0,
                 symmetric: bool = True) -> torch.Tensor:
    """Round-to-nearest fake quantization per row of the last axis (or per `group_size` columns).

    DFRot's default activation quantizer (per token, dynamic, like `fxpress::quantize_act`).
    """
    from fxpress.runtime.quant import _quantize_act

    if group_size and x.shape[-1] % group_size == 0 and group_size < x.shape[-1]:
        shape = x.shape
        return _quantize_act(x.reshape(*shape[:-1], -1, group_size), bits, clip_ratio, symmetric).reshape(shape)
    return _quantize_act(x, bits, clip_ratio, symmetric)


@register_pass
@dataclass
class Rotate(Pass):
    """Fold norm scales, untie embeddings, apply R1 (residual stream) and R2 (per head) offline.

    `with_quantizer(fn)` (not a field, so not in recipes) sets a callable `x -> fake_quant(x)` that
    DFRot uses in place of `quantize_rtn(x, dfrot_bits, dfrot_group, dfrot_clip_ratio)`.
    """

    name: ClassVar[str] = "rotate"
    version: ClassVar[int] = 1
    preserves_function: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = UNCOMPRESSED
    establishes: ClassVar[frozenset[str]] = frozenset({ROTATED})
    tolerance: ClassVar[float] = 1e-4

    mode: str = "hadamard"
    seed: int = 0
    r2: bool = True
    fallback: str = "orthogonal"  # for hidden sizes no Hadamard construction covers
    dfrot_steps: int = 100
    dfrot_alpha: float = 100.0
    dfrot_bits: int = 4
    dfrot_group: int = 0  # 0 = per token
    dfrot_clip_ratio: float = 1.0
    dfrot_samples: int = 1
    dfrot_massive_ratio: float = 20.0  # a token is "massive" when its max |h| exceeds this x the median
    learned_steps: int = 100
    learned_lr: float = 2e-3  # Adam on the Cayley parameters
    learned_samples: int = 32  # calibration windows trained on (one per step, cycled)
    learned_batch: int = 1  # windows per step
    learned_act_bits: int = 4
    learned_act_group: int = 0  # 0 = per token
    learned_act_clip: float = 1.0
    learned_act_asym: bool = False
    learned_kv_bits: int = 4  # 0 = values not quantized in training
    learned_kv_clip: float = 1.0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.mode in ("dfrot", "learned")

    def validate(self) -> None:
        check_choice(self.name, "mode", self.mode, MODES)
        check_choice(self.name, "fallback", self.fallback, FALLBACKS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"rotate.seed = {self.seed!r} must be an integer")
        if not isinstance(self.r2, bool):
            raise ConfigError(f"rotate.r2 = {self.r2!r} must be True or False")
        check_range(self.name, "dfrot_steps", self.dfrot_steps, 0, 10_000)
        check_range(self.name, "dfrot_alpha", self.dfrot_alpha, 1.0, 1e6)
        check_range(self.name, "dfrot_bits", self.dfrot_bits, 2, 8)
        check_range(self.name, "dfrot_group", self.dfrot_group, 0, 1 << 20)
        check_range(self.name, "dfrot_clip_ratio", self.dfrot_clip_ratio, 0.05, 1.0)
        check_range(self.name, "dfrot_samples", self.dfrot_samples, 1, 1 << 16)
        check_range(self.name, "dfrot_massive_ratio", self.dfrot_massive_ratio, 1.0, 1e6)
        for name in ("learned_steps", "learned_samples", "learned_batch", "learned_act_group", "learned_act_bits",
                     "learned_kv_bits"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"rotate.{name} = {getattr(self, name)!r} must be an integer")
        check_range(self.name, "learned_steps", self.learned_steps, 0, 100_000)
        check_range(self.name, "learned_lr", self.learned_lr, 1e-7, 10.0)
        check_range(self.name, "learned_samples", self.learned_samples, 1, 1 << 16)
        check_range(self.name, "learned_batch", self.learned_batch, 1, 1 << 10)
        check_range(self.name, "learned_act_bits", self.learned_act_bits, 2, 8)
        check_range(self.name, "learned_act_group", self.learned_act_group, 0, 1 << 20)
        check_range(self.name, "learned_act_clip", self.learned_act_clip, 0.05, 1.0)
        if not isinstance(self.learned_act_asym, bool):
            raise ConfigError(f"rotate.learned_act_asym = {self.learned_act_asym!r} must be True or False")
        if self.learned_kv_bits != 0:
            check_range(self.name, "learned_kv_bits", self.learned_kv_bits, 2, 8)
        check_range(self.name, "learned_kv_clip", self.learned_kv_clip, 0.05, 1.0)
        if self.mode == "learned" and self.learned_batch > self.learned_samples:
            raise ConfigError(f"rotate.learned_batch = {self.learned_batch} is more than learned_samples = "
                              f"{self.learned_samples}: a step cannot use more windows than there are")

    def run(self, program: Program) -> dict[str, Any]:
        gm = program.module
        before = G.residual_stream(gm, strict=True, allow_scales=True)  # every structural error before any change
        check_rotatable(before)
        calib = self._dfrot_activations(program, before) if self.mode == "dfrot" else None
        if self.mode == "learned":
            self._check_learnable(program)
        weights = WeightPlan(gm)
        untied = untie_embeddings(gm, before)
        folded = fold_norm_scales(gm, before, weights)
        stream = G.residual_stream(gm, strict=True)
        stats: dict[str, Any] = {"mode": self.mode, "seed": self.seed, "hidden": stream.hidden,
                                 "untied_embeddings": untied, "norms_folded": folded}
        learned_r2 = None
        if self.mode == "learned":
            weights.apply()  # train on the folded weights (the norm scales must sit before the rotation)
            gm.recompile()
            rotation, learned_r2, stats["learned"] = self._learn(program, stream)
            stats["r1"] = f"learned (Cayley, {self.learned_steps} steps) from {stats['learned'].pop('start')}"
        else:
            rotation, stats["r1"] = self._rotation(stream.hidden, calib, stats)
        stats.update(apply_r1(stream, rotation, weights))
        if self.r2:
            stats.update(self._apply_r2(gm, stream, weights, learned_r2))
        stats["weights_rewritten"] = weights.apply()
        gm.recompile()
        G.reset_order_cache(gm.graph)
        program.metadata["rotate"] = {"mode": self.mode, "seed": self.seed, "hidden": stream.hidden, "r1": stats["r1"],
                                      "r2_head_dim": stats.get("r2_head_dim")}
        if rotation.plan is not None and rotation.plan.fallback:
            stats["r1_fallback"] = rotation.plan.fallback
            stats.setdefault("warnings", []).append(f"R1: no Hadamard of size {stream.hidden}: {rotation.describe()}")
        return stats

    # -- R1 -------------------------------------------------------------------------------------
    def _rotation(self, n: int, calib: tuple[torch.Tensor, torch.Tensor] | None,
                  stats: dict[str, Any]) -> tuple[Rotation, str]:
        """R1 and its description: random orthogonal, random Hadamard, or DFRot refined from the Hadamard."""
        if self.mode == "orthogonal":
            rotation = random_orthogonal_rotation(n, self.seed)
            return rotation, f"random orthogonal {n}x{n}"
        rotation = random_hadamard_rotation(n, self.seed, self.fallback)
        if self.mode == "dfrot":
            a, weight = calib
            r, losses = dfrot_refine(a, weight, rotation.dense(), self._act_quantizer(), self.dfrot_steps)
            stats["dfrot"] = {"rows": int(a.shape[0]), "massive_rows": int((weight > 1).sum()), "steps": self.dfrot_steps,
                              "loss_start": losses[0], "loss_end": min(losses)}
            return Rotation(n, matrix=r, plan=rotation.plan), f"DFRot-refined {rotation.describe()}"
        return rotation, rotation.describe()

    def _dfrot_activations(self, program: Program, stream: G.ResidualStream) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm outputs (before the scale) of calibration text, and per-row weights (alpha on massive tokens)."""
        from fxpress.calibration import collect_activations

        if program.calibration is None:
            raise ConfigError("rotate(mode='dfrot') needs calibration data: pass calibration=... to fxpress.compile")
        norms = [n for n in stream.norms if n.kind == "rms"]
        names = {n.normalized.name for n in norms} | {n.input.name for n in norms}
        acts = collect_activations(program, names, program.calibration.chunks(limit=self.dfrot_samples))
        rows, massive = [], []
        for norm in norms:
            rows.append(torch.cat([t.reshape(-1, stream.hidden) for t in acts[norm.normalized.name]]))
            peak = torch.cat([t.reshape(-1, stream.hidden) for t in acts[norm.input.name]]).abs().amax(-1)
            massive.append(peak > self.dfrot_massive_ratio * peak.median().clamp_min(1e-12))
        weight = torch.where(torch.cat(massive), self.dfrot_alpha, 1.0).to(torch.float64)
        return torch.cat(rows).to(torch.float64), weight

    def _act_quantizer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        custom = getattr(self, "_quantizer", None)
        if custom is not None:
            return custom
        bits, group, clip = self.dfrot_bits, self.dfrot_group, self.dfrot_clip_ratio
        return lambda x: quantize_rtn(x, bits, group, clip)

    def with_quantizer(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rotate:
        """Use `fn` (x -> fake-quantized x, per token) as DFRot's activation quantizer; returns self."""
        self._quantizer = fn
        return self

    # -- learned (SpinQuant) ----------------------------------------------------------------------
    def _check_learnable(self, program: Program) -> None:
        if program.calibration is None:
            raise ConfigError("rotate(mode='learned') needs calibration data: pass calibration=... to fxpress.compile")
        if program.weights is not None:
            raise ConfigError("rotate(mode='learned') trains through the graph and needs the weights in memory; "
                              "this program's weights are store-backed: use mode='dfrot' or 'hadamard' for it")
        if not program.is_causal_lm:
            raise ConfigError("rotate(mode='learned') minimises the next-token loss: it needs a causal LM")

    def _learn(self, program: Program, stream: G.ResidualStream) -> tuple[Rotation, dict[int, Rotation], dict]:
        """Train R1 (from the random Hadamard) and one R2 per attention layer (from the shared random head
        Hadamard): per layer because the value/o_proj statistics differ by layer and 64x64 costs nothing."""
        from fxpress.calibration import program_inputs
        from fxpress.passes.rotate import learned as L

        start = random_hadamard_rotation(stream.hidden, self.seed, self.fallback)
        r2_start: dict[int, torch.Tensor] = {}
        head_start: dict[int, Rotation] = {}
        if self.r2:
            for block, att in _r2_attentions(program.module, stream):
                hd = att.v_head_dim
                head_start.setdefault(hd, self._head_rotation(hd))
                r2_start[block] = head_start[hd].dense().to(torch.float32)
        samples = program.calibration.batches[: self.learned_samples]
        batches = list(L.calibration_batches(samples, self.learned_batch, lambda ids: program_inputs(program, ids)))
        opts = L.Options(
            steps=self.learned_steps, lr=self.learned_lr,
            act=L.QuantSpec(self.learned_act_bits, self.learned_act_clip, not self.learned_act_asym, self.learned_act_group),
            kv=L.QuantSpec(self.learned_kv_bits, self.learned_kv_clip, False) if self.learned_kv_bits else None)
        out = L.learn(program.module, stream, start.dense().to(torch.float32), r2_start, batches, opts, self.seed)
        r2 = {i: Rotation(m.shape[0], matrix=m, plan=head_start[m.shape[0]].plan) for i, m in out.pop("r2").items()}
        r1 = Rotation(stream.hidden, matrix=out.pop("r1"), plan=start.plan)
        losses = out.pop("step_losses")
        out.update(start=start.describe(), windows=int(samples.shape[0]), steps=self.learned_steps,
                   loss_first_steps=sum(losses[:5]) / max(len(losses[:5]), 1) if losses else None,
                   loss_last_steps=sum(losses[-5:]) / max(len(losses[-5:]), 1) if losses else None)
        return r1, r2, out

    # -- R2 -------------------------------------------------------------------------------------
    def _apply_r2(self, gm: GraphModule, stream: G.ResidualStream, weights: WeightPlan,
                  learned: dict[int, Rotation] | None = None) -> dict[str, Any]:
        """One R2 per head size shared by every layer, or (learned) each layer's own."""
        done, skipped, head_dim = 0, [], None
        rotations: dict[int, Rotation] = {}
        for block in G.decoder_blocks(gm, stream):
            att = block.attention.attention if block.attention else None
            if att is None:
                continue
            if not _r2_ok(att):
                skipped.append(block.index)
                continue
            hd = head_dim = att.v_head_dim
            if hd not in rotations:
                rotations[hd] = self._head_rotation(hd)
            r2 = learned[block.index] if learned is not None else rotations[hd]
            rotate_heads(att.v_proj[0], att.o_proj, r2, hd, weights)
            done += 1
        out: dict[str, Any] = {"r2_layers": done, "r2_head_dim": head_dim}
        if skipped:
            out["r2_skipped_layers"] = skipped
            out["warnings"] = [f"R2 skipped in blocks {skipped}: values do not come from a plain per-head "
                               "projection (e.g. multi-head latent attention); R1 still applies"]
        return out

    def _head_rotation(self, hd: int) -> Rotation:
        if self.mode == "orthogonal":
            return random_orthogonal_rotation(hd, self.seed + 1)
        return random_hadamard_rotation(hd, self.seed + 1, self.fallback)


def _r2_ok(att: Any) -> bool:
    """Values reach attention by a plain per-head reshape and o_proj reads the heads: R2 can be folded."""
    return bool(att.v_simple and att.o_simple and att.o_proj is not None and att.v_head_dim)


def _r2_attentions(gm: GraphModule, stream: G.ResidualStream) -> list[tuple[int, Any]]:
    """(block index, attention) of every block whose values R2 can rotate."""
    out = []
    for block in G.decoder_blocks(gm, stream):
        att = block.attention.attention if block.attention else None
        if att is not None and _r2_ok(att):
            out.append((block.index, att))
    return out


# ----------------------------------------------------------------------------------------------
# the rewrites (plain functions so other passes and tests can reuse them)
# ----------------------------------------------------------------------------------------------


def _attribute(gm: GraphModule, target: str) -> Any:
    """The module attribute behind a get_attr target: the tensor itself, or its placeholder when stored."""
    return operator.attrgetter(target)(gm)


def untie_embeddings(gm: GraphModule, stream: G.ResidualStream) -> int:
    """Give each embedding its own table when a linear (the LM head) shares it; returns how many.

    Ties are found on the attributes (a stored weight's placeholder), so no weight is read to find them.
    The new table starts as the shared tensor itself, not a copy: rotating replaces it, never edits it.
    """
    targets = {str(use.weight.target) for use in G.linear_uses(gm.graph)}
    count = 0
    for i, (emb, attr) in enumerate(stream.embeddings):
        table = _attribute(gm, str(attr.target))
        if str(attr.target) in targets or any(_attribute(gm, t) is table for t in targets):
            new = G.add_param(gm, f"{emb.name}_weight", G.get_param(gm, attr), before=emb)
            emb.replace_input_with(attr, new)
            stream.embeddings[i] = (emb, new)
            count += 1
    return count


def check_rotatable(stream: G.ResidualStream) -> None:
    """Raise, before anything changes, when folding and rotating this stream could not keep the function."""
    if stream.outputs:
        raise G.GraphPatternError(
            f"the graph returns residual-stream tensors ({', '.join(n.name for n in stream.outputs)}): "
            "a rotation would change those outputs; capture a model whose outputs are read through a linear head"
        )
    norm_outputs = {n.output for n in stream.norms}
    for scale in stream.scales:
        if scale not in norm_outputs:
            raise G.GraphPatternError(f"node '{scale.name}' scales the residual stream per channel outside a norm")
    for norm in stream.norms:
        if norm.weight is None:
            continue
        if norm.kind != "rms":
            raise G.GraphPatternError(
                f"LayerNorm '{norm.output.name}' on the residual stream: rotating LayerNorm models needs mean "
                "centering, which fxpress does not do yet; only RMSNorm models can be rotated"
            )
        readers, others = G.norm_consumers(norm)
        if others or not readers:
            what = ", ".join(o.name for o in others) or "nothing"
            raise G.GraphPatternError(
                f"cannot fold the scale of norm '{norm.output.name}': it is read by {what} as well as by linears"
            )


@dataclass(frozen=True)
class Transform:
    """A float64 rewrite along one axis of a weight (a fold scale or a rotation): the other axes are
    independent, so a weight can be rewritten a slice at a time along any of them."""

    axis: int
    fn: Callable[[torch.Tensor], torch.Tensor]


class WeightPlan:
    """Float64 rewrites of parameters, recorded per weight and applied one weight at a time, a slice at a time.

    Why: holding a working copy of every touched weight until the end costs twice the fp32 model. Here each
    weight is read, put through its transforms in the order they were recorded (fold, R1, R2), rounded once
    and written back (to the store, which spills), then released: the same bits, one tensor in memory. A weight
    whose transforms all act on one axis is rewritten in slices along another axis, so the float64 working copy
    of a vocabulary table never exists (it would be twice the table).
    """

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.steps: dict[str, tuple[Node, list[Transform]]] = {}

    def add(self, node: Node, transform: Transform) -> None:
        """Queue `transform` (float64 tensor -> float64 tensor, never in place) for the weight behind `node`."""
        self.steps.setdefault(str(node.target), (node, []))[1].append(transform)

    def apply(self) -> int:
        """Rewrite every queued weight, one at a time; returns how many."""
        count = len(self.steps)
        while self.steps:
            node, transforms = self.steps.pop(next(iter(self.steps)))  # released once written
            value = G.get_param(self.gm, node).detach()
            G.set_param(self.gm, node, rewrite(value, transforms, G.read_is_private(self.gm, str(node.target))))
        return count


def rewrite(value: torch.Tensor, transforms: list[Transform], in_place: bool = False) -> torch.Tensor:
    """`value` put through `transforms` in float64 and rounded once to its dtype, in slices along an axis no
    transform touches (each slice's rows go through the same float64 arithmetic as the whole would); `in_place`:
    the slices are written back into `value` (a tensor the caller owns), so no second copy of it exists."""
    touched = {t.axis % value.ndim for t in transforms}
    free = [a for a in range(value.ndim) if a not in touched]
    if not free or value.numel() * 8 <= REWRITE_SLICE_BYTES:
        return _through(value.to(torch.float64), transforms).to(value.dtype)
    axis = max(free, key=lambda a: value.shape[a])
    step = max(1, REWRITE_SLICE_BYTES // (8 * value.numel() // value.shape[axis]))
    out = value if in_place else torch.empty_like(value)
    for start in range(0, value.shape[axis], step):
        piece = value.narrow(axis, start, min(step, value.shape[axis] - start)).to(torch.float64)
        out.narrow(axis, start, piece.shape[axis]).copy_(_through(piece, transforms))
    return out


def _through(value: torch.Tensor, transforms: list[Transform]) -> torch.Tensor:
    for transform in transforms:
        value = transform.fn(value)
    return value


def _scale_axis(axis: int, scale: torch.Tensor) -> Transform:
    return Transform(axis, lambda w: (w.movedim(axis, -1) * scale).movedim(-1, axis))


def _rotate_axis(rotation: Rotation, axis: int = -1) -> Transform:
    return Transform(axis, lambda w: rotation.apply(w, axis))


def _rotate_heads_axis(rotation: Rotation, axis: int, head_dim: int) -> Transform:
    """Each head_dim slice of `axis` times R (a bias is the 1-D case)."""
    def transform(w: torch.Tensor) -> torch.Tensor:
        moved = w.movedim(axis, -1)
        shape = moved.shape
        return rotation.apply(moved.reshape(*shape[:-1], -1, head_dim)).reshape(shape).movedim(-1, axis)
    return Transform(axis, transform)


def fold_norm_scales(gm: GraphModule, stream: G.ResidualStream, weights: WeightPlan) -> int:
    """Queue each stream norm's scale into the columns of the linears reading it (float64), drop the scale."""
    folded = 0
    for norm in stream.norms:
        if norm.weight is None:
            continue
        readers, _ = G.norm_consumers(norm)  # check_rotatable made sure these are all its consumers
        scale = norm.scale(gm)
        for use in {str(u.weight.target): u for u in readers}.values():
            weights.add(use.weight, _scale_axis(use.in_axis, scale))
        _drop_norm_scale(gm, norm)
        folded += 1
    G.reset_order_cache(gm.graph)
    return folded


def _drop_norm_scale(gm: GraphModule, norm: G.Norm) -> None:
    """Remove the scale multiply (or a fused rms_norm's weight argument) and the nodes only it read."""
    out, weight = norm.output, norm.weight
    if out is norm.normalized:  # a fused rms_norm op: drop its weight argument
        scale_expr = [out.args[2]] if len(out.args) > 2 else [out.kwargs["weight"]]
        if len(out.args) > 2:
            out.update_arg(2, None)
        else:
            out.update_kwarg("weight", None)
    else:
        out.replace_all_uses_with(norm.normalized)
        scale_expr = [a for a in out.args if isinstance(a, Node) and a is not norm.normalized]
        gm.graph.erase_node(out)
    for node in scale_expr + [weight]:
        if node in gm.graph.nodes and not node.users:
            gm.graph.erase_node(node)


def apply_r1(stream: G.ResidualStream, rotation: Rotation, weights: WeightPlan) -> dict[str, Any]:
    """Queue the rotation of every stream reader's input axis, writer's output axis, embedding and stream bias by Q.

    Readers W -> W Q (input axis times Q); writers W -> Q^T W, which is the output axis times Q, and
    b -> Q^T b; embedding rows E -> E Q.
    """
    roles: dict[str, tuple[str, G.LinearUse]] = {}
    for role, uses in (("reader", stream.readers), ("writer", stream.writers)):
        for use in uses:
            target = str(use.weight.target)
            if target in roles and roles[target][0] != role:
                raise G.GraphPatternError(f"parameter '{target}' both reads and writes the residual stream")
            roles.setdefault(target, (role, use))
    fused = 0
    for role, use in roles.values():
        weights.add(use.weight, _rotate_axis(rotation, use.in_axis if role == "reader" else use.out_axis))
        if role == "writer" and use.bias is not None:
            weights.add(use.bias, _rotate_axis(rotation))
        fused += int(use.fused_experts)
    for _, attr in stream.embeddings:
        weights.add(attr, _rotate_axis(rotation))
    for bias in {b.target: b for b in stream.biases}.values():
        weights.add(bias, _rotate_axis(rotation))
    return {
        "r1_readers": sum(1 for r, _ in roles.values() if r == "reader"),
        "r1_writers": sum(1 for r, _ in roles.values() if r == "writer"),
        "r1_fused_expert_tensors": fused,
        "embeddings": len(stream.embeddings),
    }


def rotate_heads(v_proj: G.LinearUse, o_proj: G.LinearUse, r2: Rotation, head_dim: int, weights: WeightPlan) -> None:
    """R2: each head's v_proj outputs -> R2^T (rows), each head's o_proj inputs -> columns @ R2."""
    weights.add(v_proj.weight, _rotate_heads_axis(r2, v_proj.out_axis, head_dim))
    if v_proj.bias is not None:
        weights.add(v_proj.bias, _rotate_heads_axis(r2, -1, head_dim))
    weights.add(o_proj.weight, _rotate_heads_axis(r2, o_proj.in_axis, head_dim))


def dfrot_refine(a: torch.Tensor, weight: torch.Tensor, r0: torch.Tensor,
                 quant: Callable[[torch.Tensor], torch.Tensor], steps: int) -> tuple[torch.Tensor, list[float]]:
    """Alternate B = quant(A R) and R = U V^T (svd of A^T diag(w) B); return the best R and the losses.

    The loss is sum_i w_i ||A_i R - quant(A_i R)||^2: the quantization error of the rotated rows,
    with massive-activation rows weighted up (DFRot's long-tail weighting).
    """
    a32 = a.to(torch.float32)
    aw = (a * weight.unsqueeze(1)).to(torch.float32)
    best, best_loss, losses = r0.to(torch.float64), float("inf"), []
    r = r0.to(torch.float64)
    for step in range(steps + 1):
        y = a32 @ r.to(torch.float32)
        b = quant(y)
        loss = float(((y - b).pow(2).sum(-1).to(torch.float64) * weight).sum())
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = r, loss
        if step == steps:
            break
        m = (aw.T @ b).to(torch.float64)
        u, _, vh = torch.linalg.svd(m)
        r = u @ vh
    return best, losses
