"""Quantize: packed low-bit linear weights (RTN or GPTQ), dynamic per-token activations, and the KV cache.

find the linears (graph.linear_uses) and cache writes (graph.cache_writes) → insert
`fxpress::quantize_act` before quantized linears and on keys/values written to the cache → quantize
each weight (RTN, or GPTQ with Hessians from the real inputs each linear sees, layer after layer)
→ replace `aten.linear` by `fxpress::linear_nbit` over packed uint8 storage → report bytes and skips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.passes.base import FLOAT_EXPERTS, FLOAT_LINEARS, Pass, check_choice, check_range, register_pass
from fxpress.passes.quantize.gptq import QuantizedWeight, WeightSpec, gptq, hessian, rtn
from fxpress.program import Program
from fxpress.runtime import embedding, quant  # noqa: F401  (define the fxpress ops)

LINEAR_NBIT = torch.ops.fxpress.linear_nbit.default
EMBEDDING_NBIT = torch.ops.fxpress.embedding_nbit.default
QUANTIZE_ACT = torch.ops.fxpress.quantize_act.default


def _bits_ok(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 8)


@register_pass
@dataclass
class Quantize(Pass):
    """Weights to `w_bits` (packed for real), activations to `a_bits` per token, KV cache to `kv_bits`.

    `group_size` columns share a scale (-1: one per output channel); the last group of a row may be
    partial (K not a multiple of group_size), as MatMulNBits allows. Weights are asymmetric with
    integer zero points unless `symmetric`. Activations are per token with `clip_ratio`, symmetric unless
    `act_symmetric` is False (then [min(x, 0), max(x, 0)] with an integer zero point: one more level,
    and no half of the grid wasted on skewed rows); `act_clip_search` picks each activation quantizer's own clip ratio (at
    most `clip_ratio`) on the calibration set, minimising the output error of the linears that read it;
    keys (after RoPE and any online Hadamard) and values are asymmetric per token and head with
    `kv_clip_ratio`. Linears whose weight name matches a `skip` regex stay in full precision.

    `embedding_bits` packs the token embedding tables (`fxpress::embedding_nbit`) and `lm_head_bits` the
    linears that produce the logits (whatever `skip` says), both RTN with `table_group_size` (None: the
    blocks' `group_size`) and `symmetric` (RTN: a tied table serves two uses, and GPTQ's Hessian would
    fit only one). A table shared by the embedding and the LM head (tied, as in SmolLM2 before `rotate`
    unties it) is stored ONCE when both get the same bits; different bits store it twice, with a warning.
    """

    name = "quantize"
    version = 1
    requires = frozenset({FLOAT_LINEARS})
    invalidates = frozenset({FLOAT_LINEARS, FLOAT_EXPERTS})  # it packs expert weights too

    w_bits: int | None = 4
    a_bits: int | None = None
    kv_bits: int | None = None
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    act_order: bool = False
    clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    clip_search: bool = True
    act_clip_search: bool = False
    act_symmetric: bool = True
    damp: float = 0.01
    skip: tuple[str, ...] = ("lm_head",)
    seed: int = 0
    embedding_bits: int | None = None
    lm_head_bits: int | None = None
    table_group_size: int | None = None

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return (self.method == "gptq" and self.w_bits is not None) or (self.act_clip_search and self.a_bits is not None)

    # -- configuration ------------------------------------------------------------------------
    def validate(self) -> None:
        for field_name in ("w_bits", "a_bits", "kv_bits", "embedding_bits", "lm_head_bits"):
            value = getattr(self, field_name)
            if not _bits_ok(value):
                raise ConfigError(
                    f"quantize.{field_name} = {value!r} is not allowed: use an integer from 2 to 8, or None to leave it in float"
                )
        if all(getattr(self, f) is None for f in ("w_bits", "a_bits", "kv_bits", "embedding_bits", "lm_head_bits")):
            raise ConfigError(
                "quantize has nothing to do: set at least one of w_bits, a_bits, kv_bits, embedding_bits, lm_head_bits")
        for field_name in ("group_size", "table_group_size"):
            gs = getattr(self, field_name)
            if field_name == "table_group_size" and gs is None:
                continue
            if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or (gs >= 8 and gs % 8 == 0)):
                raise ConfigError(
                    f"quantize.{field_name} = {gs!r} is not allowed: use -1 (one group per output channel) or a "
                    "multiple of 8 (a power of two >= 16, e.g. 32, 64, 128, maps directly to ONNX MatMulNBits)"
                )
        check_choice(self.name, "method", self.method, ("rtn", "gptq"))
        if self.act_order and self.method != "gptq":
            raise ConfigError("quantize.act_order only applies to method='gptq': set method='gptq' or act_order=False")
        for field_name in ("symmetric", "act_order", "clip_search", "act_clip_search", "act_symmetric"):
            if not isinstance(getattr(self, field_name), bool):
                raise ConfigError(f"quantize.{field_name} = {getattr(self, field_name)!r} must be True or False")
        check_range(self.name, "clip_ratio", self.clip_ratio, 0.05, 1.0)
        check_range(self.name, "kv_clip_ratio", self.kv_clip_ratio, 0.05, 1.0)
        check_range(self.name, "damp", self.damp, 0.0, 1.0)
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigError(f"quantize.skip = {self.skip!r} must be a list of regular expressions, e.g. ['lm_head']")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"quantize.skip pattern {pattern!r} is not a valid regular expression: {err}") from err
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"quantize.seed = {self.seed!r} must be an integer")

    def spec(self) -> WeightSpec:
        return WeightSpec(self.w_bits or 8, self.group_size, self.symmetric, self.clip_search)

    # -- the pass -------------------------------------------------------------------------------
    def run(self, program: Program) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        gm = program.module
        tables, heads = self._select_tables(gm)
        targets, skipped = self._select_linears(gm)
        if self.lm_head_bits is not None:  # the LM head gets its own bits, not w_bits, whatever skip says
            targets = [u for u in targets if u.node not in {h.node for h in heads}]
            for head in heads:
                skipped.pop(head.name, None)
        sites = G.cache_writes(gm) if self.kv_bits is not None else []
        if self.kv_bits is not None and not sites:
            raise ConfigError(
                "quantize.kv_bits is set but the graph has no KV cache (a causal LM captured by fxpress.capture "
                "returns present keys/values): set kv_bits=None for this model"
            )
        if self.needs_calibration and program.calibration is None:
            raise ConfigError("quantize with method='gptq' or act_clip_search=True needs calibration data: pass "
                              "calibration=... to fxpress.compile")
        warnings = [f"{name} left in full precision: {why}" for name, why in skipped.items()]
        act_nodes = self._quantize_activations(gm, targets) if self.a_bits is not None else []
        for site in sites:
            G.insert_before_use(gm, site.cat, site.new, QUANTIZE_ACT, (self.kv_bits, float(self.kv_clip_ratio), False))
        stats: dict[str, Any] = {
            "w_bits": self.w_bits, "a_bits": self.a_bits, "kv_bits": self.kv_bits, "method": self.method,
            "activation_quantizers": len(act_nodes), "kv_quantizers": len(sites), "skipped": skipped,
        }
        if self.act_clip_search and act_nodes:
            stats["act_clip_ratios"] = self._search_act_clips(program, act_nodes)
        if self.w_bits is not None and targets:
            if self.method == "gptq":
                weights, gptq_stats = self._gptq_weights(program, targets)
                warnings += gptq_stats.pop("warnings")
                stats.update(gptq_stats)
            else:
                weights = {u.name: rtn(G.get_param(gm, u.weight), self.spec()) for u in tqdm(targets, desc="rtn", leave=False)}
            stats.update(self._rewrite(gm, targets, weights))
        stats["linears_quantized"] = len(targets) if self.w_bits is not None else 0
        if tables or heads:
            table_stats = self._rewrite_tables(gm, tables, heads)
            warnings += table_stats.pop("warnings")
            stats.update(table_stats)
        stats["warnings"] = warnings
        return stats

    def _select_linears(self, gm: GraphModule) -> tuple[list[G.LinearUse], dict[str, str]]:
        """Plain 2-D aten.linear uses not matched by `skip`; everything else is listed with the reason."""
        targets, skipped = [], {}
        for use in G.linear_uses(gm.graph):
            pattern = next((p for p in self.skip if re.search(p, use.name)), None)
            if pattern is not None:
                skipped[use.name] = f"matches skip pattern {pattern!r}"
            elif use.kind != "linear" or use.expert is not None or G.val(use.weight).dim() != 2:
                skipped[use.name] = f"{use.kind} on a {G.val(use.weight).dim()}-D weight (fused experts: use quantize_experts)"
            elif G.param_source(use.node.args[1])[1]:
                skipped[use.name] = "the weight reaches the linear through a view or cast"
            else:
                targets.append(use)
        return targets, skipped

    def _quantize_activations(self, gm: GraphModule, targets: list[G.LinearUse]) -> list[Node]:
        """One quantize_act per distinct input, read only by the quantized linears (not the residual)."""
        made: dict[Node, Node] = {}
        for use in targets:
            x = use.node.args[0]
            if x not in made:
                args = (x, self.a_bits, float(self.clip_ratio), self.act_symmetric)
                made[x] = G.insert_after(gm, x, QUANTIZE_ACT, args, reroute=False)
            use.node.replace_input_with(x, made[x])
        return list(made.values())

    def _search_act_clips(self, program, act_nodes: list[Node]) -> dict[str, float]:
        """Per activation quantizer, the clip ratio (from `clip_ratio` down to 0.5) that minimises the output
        error of the linears reading it, on the calibration set, earlier quantizers already at their choice."""
        from fxpress.calibration import program_inputs

        gm = program.module
        mats: dict[Node, torch.Tensor] = {}
        for node in act_nodes:  # its readers are still aten.linear here: weights are quantized after the search
            weights = [G.get_param(gm, u.args[1]).detach().float() for u in node.users]
            mats[node] = sum(w.T @ w for w in weights)
        grid = _clip_grid(self.clip_ratio)
        batches = program.calibration.batches.split(16)
        searcher = _ActClipSearch(gm, mats, grid, max_rows=-(-SEARCH_ROWS // len(batches)))
        with torch.no_grad():
            for batch in batches:
                searcher.run(*program_inputs(program, batch))
        chosen = {}
        for node, errors in searcher.errors.items():
            best = grid[int(torch.tensor(errors).argmin())]
            node.args = (node.args[0], node.args[1], best, node.args[3])
            chosen[node.name] = best
        gm.recompile()
        return chosen

    # -- weights ------------------------------------------------------------------------------
    def _gptq_weights(self, program, targets: list[G.LinearUse]) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
        """Run the calibration set through the graph once; each group of linears that read the same
        input is quantized when the run reaches it, so later layers see earlier layers' quantized outputs."""
        from fxpress.calibration import program_inputs

        samples = program.calibration.batches
        runner = _GPTQRunner(program.module, targets, self)
        with torch.no_grad():
            try:
                runner.run(*program_inputs(program, samples))
            except _Done:
                pass
        stats = {"calibration_samples": int(samples.shape[0]), "calibration_tokens": int(samples.numel()),
                 "gptq_groups": runner.groups_done, "warnings": runner.warnings}
        return runner.results, stats

    def _rewrite(self, gm: GraphModule, targets: list[G.LinearUse], weights: dict[str, QuantizedWeight]) -> dict[str, Any]:
        """aten.linear(x, W, b) → fxpress.linear_nbit(x, packed, scales, zeros, b, bits, block, K)."""
        bytes_fp, bytes_packed, partial = 0, 0, set()
        packed_nodes: dict[str, tuple[Node, Node, Node | None]] = {}
        first_use: dict[str, Node] = {}
        for use in targets:
            first_use.setdefault(use.name, use.node)
        for use in targets:
            qw = weights[use.name]
            n, k = qw.codes.shape
            if use.name not in packed_nodes:
                qweight, scales, zeros = qw.packed()
                before = first_use[use.name]
                base = f"{use.name}_q{self.w_bits}"
                packed_nodes[use.name] = (
                    G.add_param(gm, base + "_packed", qweight, before, buffer=True),
                    G.add_param(gm, base + "_scales", scales.to(G.val(use.weight).dtype), before, buffer=True),
                    None if zeros is None else G.add_param(gm, base + "_zeros", zeros, before, buffer=True),
                )
                w = G.val(use.weight)
                bytes_fp += w.numel() * w.element_size()
                bytes_packed += sum(t.numel() * t.element_size() for t in (qweight, scales, zeros) if t is not None)
                if k % qw.block_size:
                    partial.add((k, qw.block_size))
            G.replace_with_call(gm, use.node, LINEAR_NBIT, (use.node.args[0], *packed_nodes[use.name], _bias(use.node),
                                                      self.w_bits, qw.block_size, k))
            if not use.weight.users:
                G.drop_param(gm, use.weight)
        G.reset_order_cache(gm.graph)
        notes = [
            f"in_features {k} is not a multiple of block {b}: the last group of each row has {k % b} columns "
            "(zero-padded in storage, as MatMulNBits allows)"
            for k, b in sorted(partial)
        ]
        return {"linear_bytes_fp": bytes_fp, "linear_bytes_packed": bytes_packed,
                "linear_compression": round(bytes_fp / max(bytes_packed, 1), 2), "group_notes": notes,
                "block_sizes": sorted({w.block_size for w in weights.values()})}


    # -- embedding tables and the LM head ------------------------------------------------------------
    def _select_tables(self, gm: GraphModule) -> tuple[list[tuple[Node, Node]], list[G.LinearUse]]:
        """(embedding node, table get_attr) pairs when embedding_bits is set, and the LM heads when lm_head_bits
        is; a ConfigError, before any work, when the model has none."""
        tables: list[tuple[Node, Node]] = []
        if self.embedding_bits is not None:
            tables = [(n, a) for n, a in G._find_embeddings(gm.graph) if n.args[0] is a and G.val(a).dim() == 2]
            if not tables:
                raise ConfigError("quantize.embedding_bits is set but the graph has no embedding lookup in a weight "
                                  "table (aten.embedding): set embedding_bits=None for this model")
        heads = _lm_heads(gm) if self.lm_head_bits is not None else []
        if self.lm_head_bits is not None and not heads:
            raise ConfigError("quantize.lm_head_bits is set but no plain linear produces the model's first output "
                              "(the logits): set lm_head_bits=None for this model")
        return tables, heads

    def _rewrite_tables(self, gm: GraphModule, tables: list[tuple[Node, Node]], heads: list[G.LinearUse]) -> dict[str, Any]:
        """Pack each table once per bit width asked of it (RTN): aten.embedding -> fxpress.embedding_nbit,
        the LM head's aten.linear -> fxpress.linear_nbit, a tied table's two uses reading the same packed nodes."""
        groups: dict[str, list[tuple[int, Node, Node]]] = {}  # table -> [(bits, node, get_attr)]
        for emb, attr in tables:
            groups.setdefault(str(attr.target), []).append((self.embedding_bits, emb, attr))
        for head in heads:
            groups.setdefault(str(head.weight.target), []).append((self.lm_head_bits, head.node, head.weight))
        warnings: list[str] = []
        bytes_fp = bytes_packed = shared = 0
        for name, uses in groups.items():
            attrs = list(dict.fromkeys(a for _, _, a in uses))
            weight = G.get_param(gm, attrs[0])
            bytes_fp += weight.numel() * weight.element_size()
            widths = sorted({b for b, _, _ in uses})
            for bits in widths:
                group = self.group_size if self.table_group_size is None else self.table_group_size
                qw = rtn(weight, WeightSpec(bits, group, self.symmetric, self.clip_search))
                qweight, scales, zeros = qw.packed()
                bytes_packed += sum(t.numel() * t.element_size() for t in (qweight, scales, zeros) if t is not None)
                base = f"{name}_q{bits}"
                packed = (G.add_param(gm, base + "_packed", qweight, attrs[0], buffer=True),
                          G.add_param(gm, base + "_scales", scales.to(weight.dtype), attrs[0], buffer=True),
                          None if zeros is None else G.add_param(gm, base + "_zeros", zeros, attrs[0], buffer=True))
                mine = [node for b, node, _ in uses if b == bits]
                shared += len(mine) > 1
                for node in mine:
                    if G.is_op(node, torch.ops.aten.embedding):
                        G.replace_with_call(gm, node, EMBEDDING_NBIT, (node.args[1], *packed, bits, qw.block_size, weight.shape[1]))
                    else:
                        G.replace_with_call(gm, node, LINEAR_NBIT, (node.args[0], *packed, _bias(node), bits, qw.block_size,
                                                              weight.shape[1]))
            if len(widths) > 1:
                warnings.append(f"{name} is tied (embedding and LM head) but gets {widths[0]} and {widths[-1]} bits: stored "
                                "twice; give embedding_bits and lm_head_bits the same value to store it once")
            readers = sorted({u.name for a in attrs for u in a.users})
            if readers:
                warnings.append(f"{name} is still read in full precision by {', '.join(readers)}, so it is stored both "
                                "packed and in float: set embedding_bits and lm_head_bits both to pack it once")
            for attr in attrs:
                if not attr.users:
                    G.drop_param(gm, attr)
        G.reset_order_cache(gm.graph)
        return {"embedding_bits": self.embedding_bits, "lm_head_bits": self.lm_head_bits, "tables_packed": len(groups),
                "tied_tables_shared": shared, "table_bytes_fp": bytes_fp, "table_bytes_packed": bytes_packed,
                "warnings": warnings}


def _bias(node: Node) -> Any:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _lm_heads(gm: GraphModule) -> list[G.LinearUse]:
    """The plain 2-D linear that makes the first graph output (the logits), reached back through one-input
    ops only (casts, views, soft-capping by constants); empty when there is none."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    node = out.args[0]
    while isinstance(node, (tuple, list)):
        node = node[0] if node else None
    for _ in range(12):
        if not isinstance(node, Node) or node.op != "call_function":
            return []
        use = G.linear_use(node)
        if use is not None:
            plain = use.kind == "linear" and use.expert is None and G.val(use.weight).dim() == 2
            return [use] if plain and not G.param_source(node.args[1])[1] else []
        inputs = [a for a in node.args if isinstance(a, Node)]
        if len(inputs) != 1:
            return []
        node = inputs[0]
    return []


SEARCH_ROWS = 1024  # token rows per quantizer that score the clip ratios (the cost is rows x K^2 per ratio)


def _clip_grid(top: float) -> list[float]:
    """Candidate clip ratios: `top`, then down in steps of 0.05 to 0.5 (or just `top` when it is lower)."""
    return [top] + [r / 100 for r in range(95, 45, -5) if r / 100 < top - 1e-9]


class _ActClipSearch(torch.fx.Interpreter):
    """Runs calibration batches; at each searched quantize_act it adds up, per candidate clip ratio, the
    output error tr(E M E^T) of the linears reading it (E = quantized - x, M = sum of W^T W), then
    continues with the best ratio so far, so later quantizers see earlier ones' choices."""

    def __init__(self, gm: GraphModule, mats: dict[Node, torch.Tensor], grid: list[float], max_rows: int = SEARCH_ROWS):
        super().__init__(gm)
        self.mats, self.grid, self.max_rows = mats, grid, max_rows
        self.errors: dict[Node, list[float]] = {node: [0.0] * len(grid) for node in mats}

    def run_node(self, n: Node) -> Any:
        if n not in self.mats:
            return super().run_node(n)
        x, bits, _, symmetric = self.fetch_args_kwargs_from_env(n)[0]
        rows = x.detach().float().reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_rows:  # an even subsample keeps the cost per batch bounded
            rows = rows[torch.linspace(0, rows.shape[0] - 1, self.max_rows).long()]
        errors = self.errors[n]
        for i, ratio in enumerate(self.grid):
            e = QUANTIZE_ACT(rows, bits, ratio, symmetric) - rows
            errors[i] += float(((e @ self.mats[n]) * e).sum())
        best = self.grid[min(range(len(self.grid)), key=errors.__getitem__)]
        return QUANTIZE_ACT(x, bits, best, symmetric)


class _Done(Exception):
    """Raised by the GPTQ runner after the last quantized linear: the rest of the graph is not needed."""


class _GPTQRunner(torch.fx.Interpreter):
    """Interprets the graph on the calibration set; at each group of linears sharing an input it builds
    the Hessian from that input, quantizes the group's weights together (one GPTQ over stacked rows,
    they share H) and continues with the dequantized weights."""

    def __init__(self, gm: GraphModule, targets: list[G.LinearUse], cfg: Quantize):
        super().__init__(gm)
        self.cfg = cfg
        self.by_node = {u.node: u for u in targets}
        self.groups: dict[Node, list[G.LinearUse]] = {}
        for u in targets:
            self.groups.setdefault(u.node.args[0], []).append(u)
        self.last = targets[-1].node if targets else None
        self.results: dict[str, QuantizedWeight] = {}
        self.dequantized: dict[str, torch.Tensor] = {}
        self.warnings: list[str] = []
        self.groups_done = 0
        self.bar = tqdm(total=len(self.groups), desc="gptq", leave=False)

    def run_node(self, n: Node) -> Any:
        use = self.by_node.get(n)
        if use is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        if use.name not in self.results:
            self._quantize_group(self.groups[n.args[0]], x, args)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = F.linear(x, self.dequantized[use.name].to(x.dtype), bias)
        if n is self.last:
            self.bar.close()
            raise _Done
        return out

    def _quantize_group(self, group: list[G.LinearUse], x: torch.Tensor, args: tuple) -> None:
        names, weights = [], []
        for u in group:
            if u.name not in names and u.name not in self.results:
                names.append(u.name)
                weights.append(G.get_param(self.module, u.weight).detach().float())
        h, tokens = hessian(x)
        spec = self.cfg.spec()
        if tokens == 0:
            self.warnings.append(f"{', '.join(names)}: no calibration tokens reached these linears; used RTN")
            quantized = [rtn(w, spec) for w in weights]
        else:
            stacked = gptq(torch.cat(weights), h, spec, act_order=self.cfg.act_order, damp=self.cfg.damp)
            quantized = _split_rows(stacked, [w.shape[0] for w in weights])
        for name, qw in zip(names, quantized):
            self.results[name] = qw
            self.dequantized[name] = qw.dequantize()
        self.groups_done += 1
        self.bar.update(1)


def _split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """Undo the row stacking of weights that shared one GPTQ run."""
    out = []
    for codes, scales, zeros in zip(qw.codes.split(rows), qw.scales.split(rows), qw.zeros.split(rows)):
        out.append(QuantizedWeight(codes.contiguous(), scales.contiguous(), zeros.contiguous(), qw.spec, qw.block_size))
    return out
