"""FoldHadamard: online Hadamards where a rotation cannot be folded away (R4 before down projections, R3 on q/k).

R4: before every MLP down projection (dense, shared expert, every routed expert, fused 3-D experts)
insert `fxpress::hadamard` on its input and fold H into the projection's input columns (W -> W H), so
the down projection sees outlier-free inputs at the same output. R3: after RoPE, apply the head_dim
Hadamard to queries and to the new keys before they enter the KV cache (q H . k H = q . k), so the
cached keys are in the rotated basis that KV quantization wants. Sizes n = K * 2^m use the Hadamard
constructions of `fxpress.runtime.hadamard`; a size none covers uses the documented fallback and is
reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.passes.base import HADAMARD_FREE, UNCOMPRESSED, Pass, check_choice, register_pass
from fxpress.program import Program
from fxpress.runtime.hadamard import FALLBACKS, HadamardPlan, apply_rows, base_matrix, plan

if TYPE_CHECKING:
    from fxpress.program import Program

HADAMARD_OP = torch.ops.fxpress.hadamard.default


class _Bases:
    """One base-matrix buffer per transform size, shared by every online Hadamard of that size."""

    def __init__(self, gm: GraphModule, fallback: str, seed: int) -> None:
        self.gm, self.fallback, self.seed = gm, fallback, seed
        self.plans: dict[int, HadamardPlan] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        self.targets: dict[int, Node] = {}  # size -> the first get_attr of its base (its target and value)

    def get(self, n: int) -> tuple[HadamardPlan, torch.Tensor]:
        if n not in self.plans:
            p = plan(n, self.fallback)
            self.plans[n] = p
            self.tensors[n] = base_matrix(p, self.seed)
        return self.plans[n], self.tensors[n]

    def node(self, n: int, before: Node) -> Node:
        """A get_attr of the float32 base for size n placed before `before`."""
        _, base = self.get(n)
        if n not in self.targets:
            attr = G.add_param(self.gm, f"hadamard_base_{n}", base.to(torch.float32), before=before, buffer=True)
            self.targets[n] = attr
            return attr
        first = self.targets[n]
        with self.gm.graph.inserting_before(before):
            attr = self.gm.graph.get_attr(first.target)
        attr.meta["val"] = first.meta["val"]  # the placeholder of a stored base: no read from the store
        return attr


def _online(gm: GraphModule, bases: _Bases, user: Node, arg: Node, n: int) -> Node:
    """Insert hadamard(arg) just before `user` and make `user` read it."""
    return G.insert_before_use(gm, user, arg, HADAMARD_OP, (bases.node(n, user),))


def _down_projections_by_weight(blocks: list[G.Block]) -> dict[str, list[G.LinearUse]]:
    """MLP down projections grouped by weight (a fused expert tensor or per-expert slices share one)."""
    by_target: dict[str, list[G.LinearUse]] = {}
    for use in G.down_projections(blocks):
        if G.last_dim(use.input) != use.in_features():
            raise G.GraphPatternError(
                f"down projection '{use.node.name}' reads {G.last_dim(use.input)} features, not {use.in_features()}")
        by_target.setdefault(str(use.weight.target), []).append(use)
    return by_target


def _rotatable_attentions(blocks: list[G.Block]) -> list[G.Attention]:
    """Every attention, checked to share one head dim between queries and keys (R3 needs q H . k H = q . k)."""
    atts = G.attentions(blocks)
    for att in atts:
        hd = G.last_dim(att.q_in)
        if hd is None or hd != G.last_dim(att.k_in):
            raise G.GraphPatternError(
                f"attention '{att.sdpa.name}': query and key head dims differ ({hd} vs {G.last_dim(att.k_in)})")
    return atts


@register_pass
@dataclass
class FoldHadamard(Pass):
    """Insert online Hadamards (R4 before down projections, R3 on queries/keys) and fold their inverse offline."""

    name: ClassVar[str] = "fold_hadamard"
    version: ClassVar[int] = 1
    preserves_function: ClassVar[bool] = True
    requires: ClassVar[frozenset[str]] = UNCOMPRESSED
    invalidates: ClassVar[frozenset[str]] = frozenset({HADAMARD_FREE})
    tolerance: ClassVar[float] = 1e-4
    runtime_modules: ClassVar[tuple[str, ...]] = ("tvm",)  # the online Hadamards' generated kernel

    r4: bool = True
    r3: bool = True
    fallback: str = "orthogonal"  # for sizes no Hadamard construction covers: "orthogonal", "block" or "error"
    seed: int = 0  # only used by the orthogonal fallback

    def validate(self) -> None:
        check_choice(self.name, "fallback", self.fallback, FALLBACKS)
        for field_name in ("r3", "r4"):
            if not isinstance(getattr(self, field_name), bool):
                raise ConfigError(f"fold_hadamard.{field_name} = {getattr(self, field_name)!r} must be True or False")
        if not (self.r3 or self.r4):
            raise ConfigError("fold_hadamard with r3=False and r4=False does nothing: enable at least one")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"fold_hadamard.seed = {self.seed!r} must be an integer")

    def run(self, program: Program) -> dict[str, Any]:
        gm = program.module
        blocks = G.decoder_blocks(gm)
        bases = _Bases(gm, self.fallback, self.seed)
        downs = _down_projections_by_weight(blocks) if self.r4 else {}
        atts = _rotatable_attentions(blocks) if self.r3 else []
        for n in {uses[0].in_features() for uses in downs.values()} | {G.last_dim(a.q_in) for a in atts}:
            bases.get(n)  # every size planned (and a fallback="error" raised) before the graph changes
        stats: dict[str, Any] = {}
        if self.r4:
            stats.update(self._r4(gm, downs, bases))
        if self.r3:
            stats.update(self._r3(gm, atts, bases))
        gm.recompile()
        G.reset_order_cache(gm.graph)
        return self._record(program, bases, stats)

    def _record(self, program: Program, bases: _Bases, stats: dict[str, Any]) -> dict[str, Any]:
        """Sizes and fallbacks into the stats; the online nodes into the program's metadata (lowerings read them)."""
        sizes = {n: p.describe() for n, p in sorted(bases.plans.items())}
        stats["sizes"] = sizes
        fallbacks = [p.describe() for p in bases.plans.values() if p.fallback]
        if fallbacks:
            stats["fallbacks"] = fallbacks
            stats["warnings"] = [f"no Hadamard construction for {d}; used the {self.fallback} fallback" for d in fallbacks]
        r3_nodes, r4_nodes = stats.pop("r3_online_nodes", []), stats.pop("r4_online_nodes", [])
        program.metadata["fold_hadamard"] = {"r3": self.r3, "r4": self.r4, "sizes": sizes,
                                             "r3_nodes": r3_nodes, "r4_nodes": r4_nodes}
        stats["online_hadamards"] = len(r3_nodes) + len(r4_nodes)
        if not stats["online_hadamards"]:
            stats["modified"] = False
            stats.setdefault("warnings", []).append("no down projection or attention block to rotate")
        return stats

    def _r4(self, gm: GraphModule, by_target: dict[str, list[G.LinearUse]], bases: _Bases) -> dict[str, Any]:
        """Online Hadamard on every down projection's input, H folded into its input columns."""
        nodes, experts = [], 0
        for uses in by_target.values():
            n = uses[0].in_features()
            p, base = bases.get(n)
            rotated = apply_rows(G.get_param(gm, uses[0].weight), p, base, axis=uses[0].in_axis)
            G.set_param(gm, uses[0].weight, rotated)  # written back (to the store, which spills) before the next one
            del rotated
            for use in uses:
                nodes.append(_online(gm, bases, use.node, use.input, n).name)
            experts += int(uses[0].fused_experts) or int(uses[0].expert is not None)
        return {"r4_down_projections": len(by_target), "r4_expert_tensors": experts, "r4_online_nodes": nodes}

    def _r3(self, gm: GraphModule, atts: list[G.Attention], bases: _Bases) -> dict[str, Any]:
        """Hadamard on queries (SDPA input) and new keys (before the cache concat, else SDPA input)."""
        count, in_cache, nodes = 0, 0, []
        for att in atts:
            hd = G.last_dim(att.q_in)
            nodes.append(_online(gm, bases, att.sdpa, att.q_in, hd).name)
            if att.k_cache is not None and att.k_new is not None and G.last_dim(att.k_new) == hd:
                nodes.append(_online(gm, bases, att.k_cache, att.k_new, hd).name)
                in_cache += 1
            else:
                nodes.append(_online(gm, bases, att.sdpa, att.k_in, hd).name)
            count += 1
        return {"r3_attention_layers": count, "r3_keys_rotated_in_cache": in_cache, "r3_online_nodes": nodes}
