"""Quantize: packed low-bit linear weights (RTN or GPTQ), dynamic per-token activations, and the KV cache.

find the linears (graph.linear_uses) and cache writes (graph.cache_writes) → insert
`fxpress::quantize_act` before quantized linears and on keys/values written to the cache (clip ratios
searched in `act_clip`) → quantize each weight (RTN, or GPTQ with Hessians from the real inputs each
linear sees, layer after layer: `gptq_runner`) → replace `aten.linear` by `fxpress::linear_nbit` over
packed uint8 storage (embedding tables and the LM head: `tables`) → report bytes and skips.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.passes.base import FLOAT_EXPERTS, FLOAT_LINEARS, Pass, register_pass
from fxpress.passes.quantize.act_bits import allocate_act_bits, check_mixed_precision
from fxpress.passes.quantize.act_clip import ClipChooser, search_act_clips
from fxpress.passes.quantize.config import (
    V1_FIELDS,
    ActQuant,
    KVQuant,
    TableQuant,
    WeightQuant,
    regroup_fields,
)
from fxpress.passes.quantize.gptq import QuantizedWeight, rtn
from fxpress.passes.quantize.gptq_runner import gptq_weights, weight_spec
from fxpress.passes.quantize.tables import add_packed, bias_of, packed_bytes, rewrite_tables, select_tables
from fxpress.report import stopwatch
from fxpress.runtime import quant  # noqa: F401  (define the fxpress ops)

if TYPE_CHECKING:
    from fxpress.program import Program

LINEAR_NBIT = torch.ops.fxpress.linear_nbit.default
QUANTIZE_ACT = torch.ops.fxpress.quantize_act.default


@register_pass
@dataclass
class Quantize(Pass):
    """Linear `weights` packed to low bits, `activations` per token, the `kv_cache`, and the `tables`.

    Each group is its own small config (see `fxpress.passes.quantize.config`). The last group of a weight
    row may be partial (K not a multiple of group_size), as MatMulNBits allows. A table shared by the
    embedding and the LM head (tied, as in SmolLM2 before `rotate` unties it) is stored ONCE when both get
    the same bits; different bits store it twice, with a warning.
    """

    name = "quantize"
    version = 2
    requires = frozenset({FLOAT_LINEARS})
    invalidates = frozenset({FLOAT_LINEARS, FLOAT_EXPERTS})  # it packs expert weights too

    weights: WeightQuant = field(default_factory=WeightQuant)
    activations: ActQuant = field(default_factory=ActQuant)
    kv_cache: KVQuant = field(default_factory=KVQuant)
    tables: TableQuant = field(default_factory=TableQuant)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        gptq = self.weights.method == "gptq" and self.weights.bits is not None
        acts = self.activations
        return gptq or (acts.bits is not None and (acts.clip_search or acts.avg_bits is not None))

    # -- configuration ------------------------------------------------------------------------
    @classmethod
    def upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Version 1 held 18 flat fields (w_bits, a_bits, kv_bits, act_clip_search, ...); version 2 groups them
        (`config.V1_FIELDS` maps each old name to its group and new name)."""
        if version == 1:
            return regroup_fields(fields, V1_FIELDS)
        return super().upgrade_fields(version, fields)

    def validate(self) -> None:
        for group in (self.weights, self.activations, self.kv_cache, self.tables):
            group.validate()
        bits = (self.weights.bits, self.activations.bits, self.kv_cache.bits, self.tables.embedding_bits,
                self.tables.lm_head_bits)
        if all(b is None for b in bits):
            raise ConfigError("quantize has nothing to do: set at least one of weights.bits, activations.bits, "
                              "kv_cache.bits, tables.embedding_bits, tables.lm_head_bits")

    # -- the pass -------------------------------------------------------------------------------
    def run(self, program: Program) -> dict[str, Any]:
        torch.manual_seed(self.weights.seed)
        gm = program.module
        lookups, heads = select_tables(gm, self.tables)
        targets, skipped = self._select_linears(gm, heads)
        sites = self._select_cache_writes(gm)
        if self.needs_calibration and program.calibration is None:
            raise ConfigError("quantize with weights.method='gptq', activations.clip_search=True or activations.avg_bits "
                              "needs calibration data: pass calibration=... to fxpress.compile")
        if self.activations.avg_bits is not None:  # validate() made sure bits is set too
            check_mixed_precision(program)
        warnings = [f"{name} left in full precision: {why}" for name, why in skipped.items()]
        act_nodes = self._quantize_activations(gm, targets) if self.activations.bits is not None else []
        for site in sites:
            G.insert_before_use(gm, site.cat, site.new, QUANTIZE_ACT, (self.kv_cache.bits, float(self.kv_cache.clip_ratio), False))
        stats: dict[str, Any] = {
            "w_bits": self.weights.bits, "a_bits": self.activations.bits, "kv_bits": self.kv_cache.bits,
            "method": self.weights.method, "activation_quantizers": len(act_nodes), "kv_quantizers": len(sites),
            "skipped": skipped,
        }
        lap = stopwatch()
        if self.activations.avg_bits is not None and act_nodes:
            stats["mixed_act_bits"] = allocate_act_bits(program, act_nodes, self.activations)
            lap("act_bits_allocation")
        search = self.activations.clip_search and bool(act_nodes)
        clips = ClipChooser(program, act_nodes, self.activations.clip_ratio) if search else None
        in_gptq_run = clips is not None and self._gptq_weights(targets)
        if clips is not None and not in_gptq_run:
            stats["act_clip_ratios"] = search_act_clips(program, clips)
            lap("act_clip_search")
        if self.weights.bits is not None and targets:
            quantized = self._quantized_weights(program, targets, stats, clips if in_gptq_run else None)
            if in_gptq_run:  # searched in GPTQ's run, and timed there
                stats["act_clip_ratios"] = clips.apply(program)
                lap.times["act_clip_search (in the GPTQ run)"] = round(clips.seconds, 3)
            lap(f"weights_{self.weights.method}")
            warnings += stats.pop("warnings", [])
            stats.update(self._rewrite(gm, targets, quantized))
        if clips is not None:
            stats["act_clip_evaluations"] = clips.evaluations  # clip ratios scored (in its own run or GPTQ's)
        stats["linears_quantized"] = len(targets) if self.weights.bits is not None else 0
        if lookups or heads:
            table_stats = rewrite_tables(gm, lookups, heads, self.tables, self.weights)
            warnings += table_stats.pop("warnings")
            stats.update(table_stats)
        if not targets and not sites and not (lookups or heads):  # e.g. a conv net: nothing here is a linear
            stats["modified"] = False
            warnings.append(f"no linear layer, KV cache or embedding table to quantize ({len(skipped)} linears skipped)")
        lap("rewrite")
        stats["warnings"], stats["seconds"] = warnings, lap.times
        return stats

    def _select_linears(self, gm: GraphModule, heads: list[G.LinearUse]) -> tuple[list[G.LinearUse], dict[str, str]]:
        """Plain 2-D aten.linear uses not matched by `skip`; everything else is listed with the reason.
        LM heads packed by `tables.lm_head_bits` are neither (they get their own bits, whatever skip says)."""
        head_nodes = {h.node for h in heads} if self.tables.lm_head_bits is not None else set()
        targets, skipped = [], {}
        for use in G.linear_uses(gm.graph):
            pattern = next((p for p in self.weights.skip if re.search(p, use.name)), None)
            if use.node in head_nodes:
                continue
            if pattern is not None:
                skipped[use.name] = f"matches skip pattern {pattern!r}"
            elif use.kind != "linear" or use.expert is not None or G.val(use.weight).dim() != 2:
                skipped[use.name] = f"{use.kind} on a {G.val(use.weight).dim()}-D weight (fused experts: use quantize_experts)"
            elif G.param_source(use.node.args[1])[1]:
                skipped[use.name] = "the weight reaches the linear through a view or cast"
            else:
                targets.append(use)
        return targets, skipped

    def _select_cache_writes(self, gm: GraphModule) -> list:
        """Where keys and values are written to the KV cache; a ConfigError when kv_cache.bits is set and there are none."""
        if self.kv_cache.bits is None:
            return []
        sites = G.cache_writes(gm)
        if not sites:
            raise ConfigError(
                "quantize.kv_cache.bits is set but the graph has no KV cache (a causal LM captured by fxpress.capture "
                "returns present keys/values): set kv_cache.bits=None for this model"
            )
        return sites

    def _quantize_activations(self, gm: GraphModule, targets: list[G.LinearUse]) -> list[Node]:
        """One quantize_act per distinct input, read only by the quantized linears (not the residual)."""
        made: dict[Node, Node] = {}
        acts = self.activations
        for use in targets:
            x = use.node.args[0]
            if x not in made:
                made[x] = G.insert_after(gm, x, QUANTIZE_ACT, (x, acts.bits, float(acts.clip_ratio), acts.symmetric),
                                         reroute=False)
            use.node.replace_input_with(x, made[x])
        return list(made.values())

    # -- weights ------------------------------------------------------------------------------
    def _gptq_weights(self, targets: list[G.LinearUse]) -> bool:
        return self.weights.method == "gptq" and self.weights.bits is not None and bool(targets)

    def _quantized_weights(self, program: Program, targets: list[G.LinearUse], stats: dict[str, Any],
                           clips: ClipChooser | None) -> Callable[[G.LinearUse], QuantizedWeight]:
        """Each target's quantized weight, asked for once per weight as the rewrite reaches it.

        GPTQ quantizes during its calibration run (its stats and warnings go into `stats`; the activation clip
        search, if any, rides on that run) and hands each result over once; RTN quantizes when asked, so one
        weight's codes are in memory at a time.
        """
        if self.weights.method == "gptq":
            weights, gptq_stats = gptq_weights(program, targets, self.weights, clips)
            stats.update(gptq_stats)
            return lambda use: weights.pop(use.name)
        spec = weight_spec(self.weights)
        return lambda use: rtn(G.get_param(program.module, use.weight), spec)

    def _rewrite(self, gm: GraphModule, targets: list[G.LinearUse],
                 quantized: Callable[[G.LinearUse], QuantizedWeight]) -> dict[str, Any]:
        """aten.linear(x, W, b) → fxpress.linear_nbit(x, packed, scales, zeros, b, bits, block, K), one weight at a
        time: quantized, packed into the store (or module) before its first use, float weight dropped once unread."""
        bytes_fp, bytes_packed = 0, 0
        packed_nodes: dict[str, tuple[Node, Node, Node | None]] = {}
        layout: dict[str, tuple[int, int]] = {}  # weight -> (K, block size)
        for use in tqdm(targets, desc=self.weights.method, leave=False):
            if use.name not in packed_nodes:  # its first use: the packed buffers go right before it
                qw = quantized(use)
                packed = qw.packed()
                w = G.val(use.weight)
                packed_nodes[use.name] = add_packed(gm, f"{use.name}_q{self.weights.bits}", packed, w.dtype, use.node)
                layout[use.name] = (qw.codes.shape[1], qw.block_size)
                bytes_fp += w.numel() * w.element_size()
                bytes_packed += packed_bytes(packed)
                del qw, packed
            k, block = layout[use.name]
            G.replace_with_call(gm, use.node, LINEAR_NBIT, (use.node.args[0], *packed_nodes[use.name], bias_of(use.node),
                                                            self.weights.bits, block, k))
            if not use.weight.users:
                G.drop_param(gm, use.weight)
        G.reset_order_cache(gm.graph)
        notes = [
            f"in_features {k} is not a multiple of block {b}: the last group of each row has {k % b} columns "
            "(zero-padded in storage, as MatMulNBits allows)"
            for k, b in sorted({(k, b) for k, b in layout.values() if k % b})
        ]
        return {"linear_bytes_fp": bytes_fp, "linear_bytes_packed": bytes_packed,
                "linear_compression": round(bytes_fp / max(bytes_packed, 1), 2), "group_notes": notes,
                "block_sizes": sorted({b for _, b in layout.values()})}
