"""Token routing for `prune_tokens`: find decoder blocks, score tokens with a tiny router, skip the rest.

What a skipped token does in a block (the contract the pass keeps):

- it rides the residual stream unchanged (the block's update is not added);
- it still writes its keys/values for that block: k/v projections (about 6% of a SmolLM2 block)
  run on every token, so the KV cache of a pruned prefill holds every position, and kept
  tokens attend to all earlier tokens. Decoding one token at a time never prunes
  (k = S - floor(s*S) is S when S*s < 1), so a decode step sees the same cache layout as
  an unpruned model;
- the choice is a top-k over the chunk (as in FTP and Mixture-of-Depths), so whether a token
  is kept can depend on later tokens of the same prefill chunk; the logits themselves stay
  causal in everything but that choice;
- position 0 (the attention sink) is never skipped by a router;
- a block at sparsity 1.0 is the limit case, layer dropping: every token (decode steps too)
  bypasses it and it has no router; its k/v projections still fill its cache slot (never read),
  so the cache layout stays that of the unpruned model.

Router inputs (FTP's four factors plus two cheap extras): log position, relative position,
attention the token receives from the last `probes` queries of the block (their query path is
copied for those rows only), that attention's rank, the hidden-state RMS, the block's required
sparsity, and the block depth. One shared two-layer MLP scores every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn

from fxpress import graph as G
from fxpress.errors import ConfigError

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
MATMULS = {aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default}
FEATURES = ("log_position", "relative_position", "attention", "attention_rank", "hidden_norm", "sparsity", "depth")
SPARSITY_SCALE = 1000  # per-block sparsity is baked into the graph as an integer fraction of this
SINK_BONUS = 1e4  # added to the router score of absolute position 0 (never skipped)


# --- graph structure (blocks come from fxpress.graph.decoder_blocks) -------------------------------------

@dataclass
class BlockRegion:
    """What a skipped token bypasses in one decoder block: h_out = h_in + attention(...) + mlp(...)."""

    index: int
    h_in: torch.fx.Node
    h_out: torch.fx.Node
    sdpa: torch.fx.Node
    residual_adds: list[torch.fx.Node]  # attention add, then MLP add(s)
    region: list[torch.fx.Node] = field(default_factory=list)  # nodes between h_in and h_out (topological)
    query_side: list[torch.fx.Node] = field(default_factory=list)  # what only kept tokens need
    query_path: list[torch.fx.Node] = field(default_factory=list)  # h_in -> query (for probe rows)


def find_blocks(gm: torch.fx.GraphModule) -> list[BlockRegion]:
    """The decoder blocks of the graph (one SDPA each) with the regions a skipped token bypasses."""
    regions: list[BlockRegion] = []
    for block in G.decoder_blocks(gm):
        if block.attention is not None:
            part = block.attention
            regions.append(BlockRegion(len(regions), part.residual, part.add, part.attention.sdpa, [part.add]))
        elif not regions:
            continue  # an MLP before the first attention belongs to no block a router could skip
        if block.mlp is not None:
            regions[-1].residual_adds.append(block.mlp.add)
            regions[-1].h_out = block.mlp.add
    if not regions:
        raise ConfigError(
            "prune_tokens found no aten.scaled_dot_product_attention in the graph: capture the model with "
            "attn_implementation='sdpa' (the transformers default)"
        )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [_fill_region(region, order) for region in regions]


def _fill_region(block: BlockRegion, order: dict[torch.fx.Node, int]) -> BlockRegion:
    after_in = {n for n in G.descendants(block.h_in) if order[n] <= order[block.h_out]}
    region = G.ancestors(block.h_out, within=after_in)
    query_path = G.ancestors(block.sdpa.args[0], within=region)
    post = (G.descendants(block.sdpa) | {block.sdpa}) & region
    block.region = sorted(region, key=order.__getitem__)
    block.query_path = [n for n in block.region if n in query_path]
    block.query_side = [n for n in block.region if n in query_path or n in post]
    if len(block.sdpa.args) < 4 or not isinstance(block.sdpa.args[3], torch.fx.Node):
        raise ConfigError(f"prune_tokens needs an explicit attention mask on {block.sdpa.name} (is_causal is not supported)")
    return block


def matmul_macs(node: torch.fx.Node) -> int:
    """Multiply-adds per token of a matmul-like node: in_features * out_features (0 when unknown)."""
    is_fxpress = "fxpress" in str(node.target) and "linear" in str(node.target)
    if node.target not in MATMULS and not is_fxpress:
        return 0
    out = node.meta.get("val")
    first = node.args[0] if node.args else None
    inp = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return 0
    try:
        return int(inp.shape[-1]) * int(out.shape[-1])
    except (TypeError, RuntimeError):
        return 0


def block_costs(block: BlockRegion) -> dict[str, int]:
    """Per-token multiply-adds of a block, split into what every token pays and what kept tokens pay."""
    query_side = set(block.query_side)
    kept = sum(matmul_macs(n) for n in block.query_side)
    every = sum(matmul_macs(n) for n in block.region if n not in query_side)
    query = sum(matmul_macs(n) for n in block.query_path)
    q = block.sdpa.args[0].meta["val"]
    return {"kept_macs": kept, "every_macs": every, "query_macs": query,
            "heads": int(q.shape[1]), "head_dim": int(q.shape[-1])}


# --- runtime helpers (plain ATen ops: gather, scatter, topk) -----------------------------------------

def _flat_rows(idx: torch.Tensor, batch, seq) -> torch.Tensor:
    """Row numbers [B*k] of tokens `idx` [B, k] in a [batch*seq, ...] view (batch 1 broadcasts)."""
    if isinstance(batch, int) and batch == 1:
        return idx.reshape(-1)
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(-1) * seq
    return (idx + offsets).reshape(-1)


def take_rows(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows `idx` [B, k] of `t` along its sequence dimension `dim` (batch is dim 0).

    Whole rows are read through a flat [batch*seq, ...] view with one index per row (ONNX Gather,
    a row copy), not an element-wise gather with an index expanded to the full output size.
    """
    if dim != 1:
        return take_rows(t.movedim(dim, 1), idx, 1).movedim(1, dim)
    batch, seq, rest = t.shape[0], t.shape[1], t.shape[2:]
    flat = t.reshape(batch * seq, *rest).index_select(0, _flat_rows(idx, batch, seq))
    return flat.reshape(idx.shape[0], idx.shape[1], *rest)


def put_rows(h: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The residual stream with rows `idx` replaced by the block's outputs; other tokens ride unchanged.

    One row index per token (ONNX ScatterND over rows), not an element-wise scatter."""
    batch, seq, width = h.shape
    flat = h.reshape(batch * seq, width).index_put((_flat_rows(idx, batch, seq),), rows.reshape(-1, width))
    return flat.reshape(batch, seq, width)


def probe_rows(h: torch.Tensor, probes: int) -> torch.Tensor:
    """Indices [B, probes] of the last `probes` tokens (clamped at 0 for short chunks)."""
    seq = h.shape[1]
    idx = (torch.arange(probes, device=h.device) + (seq - probes)).clamp(min=0)
    return idx.unsqueeze(0).expand(h.shape[0], probes)


def keep_count(seq, permille: int):
    """Tokens kept out of `seq` at a sparsity of permille/1000: never 0, all of them for one token."""
    return seq - (seq * permille) // SPARSITY_SCALE


def select_tokens(score: torch.Tensor, permille: int) -> torch.Tensor:
    """Top-k token indices [B, k], k from the (dynamic) sequence length.

    k goes through a tensor and back (an unbacked size for torch.export), so export does not
    specialise it to "never 1": one-token decoding keeps k = 1.
    """
    seq = score.shape[1]
    k = torch.scalar_tensor(keep_count(seq, permille), dtype=torch.long).item()
    torch._check(k >= 1)
    torch._check(k <= seq)
    return torch.topk(score, k, dim=1).indices


def probe_attention(q: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Mean attention probability each key position receives from the probe queries: [B, keys]."""
    if key.shape[1] != q.shape[1]:
        key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)
    logits = torch.matmul(q, key.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(-1).mean(dim=(1, 2))


def keep_sink(score: torch.Tensor, past) -> torch.Tensor:
    """Position 0 always ranks first: it is the attention sink (massive activations form on it in
    early blocks), and a sink that skips a block changes every later token's attention."""
    seq = score.shape[1]
    first = ((torch.arange(seq, device=score.device) + past) == 0).to(score.dtype)
    return score + SINK_BONUS * first


# --- the router --------------------------------------------------------------------------------------

class TokenRouter(nn.Module):
    """One shared two-layer MLP (features -> hidden -> 1) that scores tokens in every block, plus, when
    `width` > 0, one learned direction per block read from the RMS-normalised hidden state (a rank-1
    factor: `width` multiply-adds per token, ~0.02% of a SmolLM2 block)."""

    def __init__(self, num_blocks: int, hidden: int = 64, seed: int = 0, width: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        nf = len(FEATURES)
        self.w1 = nn.Parameter(torch.randn(hidden, nf, generator=gen) / math.sqrt(nf))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(1, hidden, generator=gen) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(1))
        self.register_buffer("sparsity", torch.zeros(num_blocks))
        self.register_buffer("shift", torch.zeros(nf))
        self.register_buffer("scale", torch.ones(nf))
        self.num_blocks = num_blocks
        self.proj = nn.Parameter(torch.zeros(num_blocks, width)) if width else None
        self.trace: dict[int, dict[str, torch.Tensor]] | None = None  # filled while training/searching

    def features(self, block: int, h: torch.Tensor, q_probe: torch.Tensor, key: torch.Tensor,
                 mask_probe: torch.Tensor | None, scale: float) -> torch.Tensor:
        """[B, S, len(FEATURES)] raw (un-normalised) router inputs."""
        batch, seq = h.shape[0], h.shape[1]
        total = key.shape[2]
        past = total - seq
        pos = (torch.arange(seq, device=h.device) + past).to(h.dtype).unsqueeze(0).expand(batch, seq)
        attn = probe_attention(q_probe, key, mask_probe, scale)[:, past:]
        rank = attn.argsort(dim=1, descending=True).argsort(dim=1).to(h.dtype) / seq
        norm = 0.5 * h.pow(2).mean(-1).add(1e-6).log()
        sparsity = self.sparsity[block].to(h.dtype).expand(batch, seq)
        depth = torch.full_like(pos, block / max(self.num_blocks - 1, 1))
        return torch.stack([pos.log1p(), (pos + 1) / total, (attn * total + 1e-6).log(), rank, norm, sparsity, depth], -1)

    def score_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Router logits [B, S] from raw features; matmuls (not nn.Linear) keep it out of weight passes."""
        x = (feats - self.shift) / self.scale
        hidden = torch.relu(torch.matmul(x, self.w1.t()) + self.b1)
        return (torch.matmul(hidden, self.w2.t()) + self.b2).squeeze(-1)

    def forward(self, block: int, h: torch.Tensor, q_probe: torch.Tensor, key: torch.Tensor,
                mask_probe: torch.Tensor | None, scale: float) -> torch.Tensor:
        feats = self.features(block, h, q_probe, key, mask_probe, scale)
        score = self.score_features(feats)
        unit = None
        if self.proj is not None:
            unit = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            score = score + torch.matmul(unit, self.proj[block])
        if self.trace is not None:
            self.trace[block] = {"features": feats.detach(), "score": score}
            if unit is not None:
                self.trace[block]["hidden"] = unit.detach()
        return keep_sink(score, key.shape[2] - h.shape[1])


class HeuristicRouter(TokenRouter):
    """A fixed token score in place of the learned MLP: one router input (e.g. the hidden-state RMS or the
    attention a token receives), times `sign`. The same top-k, sink rule and graph rewrite as the
    learned router, so a row with it isolates what the training adds."""

    def __init__(self, num_blocks: int, feature: str, sign: float = 1.0):
        if feature not in FEATURES:
            raise ConfigError(f"HeuristicRouter feature must be one of {FEATURES}, got {feature!r}")
        super().__init__(num_blocks, hidden=1, width=0)
        self.column, self.sign = FEATURES.index(feature), float(sign)

    def score_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.sign * feats[..., self.column]


class MaskGate(nn.Module):
    """Training/search form of the skip: every token runs the block, skipped ones get no update.

    Forward equals the gather/scatter form exactly (same top-k, same K/V); gradients reach the
    router through a straight-through sigmoid around the top-k threshold.
    """

    def __init__(self, router: TokenRouter, temperature: float = 1.0):
        super().__init__()
        object.__setattr__(self, "router", router)  # shared, not a second registration
        self.temperature = temperature

    def forward(self, block: int, score: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        router = self.router
        seq = score.shape[1]
        keep = seq - torch.floor(seq * router.sparsity[block] + 1e-6)
        order = score.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        hard = (rank < keep).to(h_in.dtype)
        gate = hard
        if torch.is_grad_enabled() and score.requires_grad:
            ranked = score.gather(1, order)
            last = (keep.long() - 1).clamp(0, seq - 1).expand(score.shape[0], 1)
            first_out = (last + 1).clamp(max=seq - 1)
            thr = 0.5 * (ranked.gather(1, last) + ranked.gather(1, first_out)).detach()
            soft = torch.sigmoid((score - thr) / self.temperature)
            gate = hard + soft - soft.detach()
            if router.trace is not None:
                router.trace[block]["soft"] = soft
        update = h_out - h_in
        if router.trace is not None:
            size = update.detach().norm(dim=-1)  # what skipping the token removes from the block output
            size[:, 0] = size.max() + 1.0  # training chunks start at position 0: the sink is always kept
            router.trace[block]["importance"] = size
            router.trace[block]["cos"] = torch.cosine_similarity(h_in.detach(), h_out.detach(), dim=-1)
        return h_in + gate.unsqueeze(-1) * update


# --- the rewrite -------------------------------------------------------------------------------------

def _seq_symbol(gm: torch.fx.GraphModule):
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    size = first.meta["val"].shape[1]
    if not isinstance(size, torch.SymInt):
        raise ConfigError("prune_tokens needs a graph captured with a dynamic sequence length")
    return size.node.expr


class _RowCopier:
    """Copies a block's nodes so they compute only rows `idx`: inputs with a sequence dim are gathered."""

    def __init__(self, graph: torch.fx.Graph, seq, idx: torch.fx.Node, count):
        self.graph, self.seq, self.idx, self.count = graph, seq, idx, count
        self.env: dict[torch.fx.Node, object] = {}

    def arg(self, a: torch.fx.Node):
        if a in self.env:
            return self.env[a]
        val = a.meta.get("val")
        new: object = a
        if isinstance(val, torch.SymInt):
            expr = val.node.expr
            if expr == self.seq:
                new = self.count
            elif self.seq in getattr(expr, "free_symbols", ()) and a.op == "call_function":
                new = self.graph.node_copy(a, self.arg)
        elif isinstance(val, torch.Tensor) and a.op != "get_attr":
            dims = [i for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt) and d.node.expr == self.seq]
            if len(dims) > 1:
                raise ConfigError(f"prune_tokens: {a.name} has the sequence length in several dims {dims}")
            if dims:
                new = self.graph.call_function(take_rows, (a, self.idx, dims[0]))
        self.env[a] = new
        return new

    def copy(self, nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, object]:
        for n in nodes:
            self.env[n] = self.graph.node_copy(n, self.arg)
        return self.env


def _sdpa_scale(sdpa: torch.fx.Node) -> float:
    scale = sdpa.kwargs.get("scale")
    if scale is None and len(sdpa.args) > 6:
        scale = sdpa.args[6]
    return float(scale) if scale is not None else 1.0 / math.sqrt(int(sdpa.args[0].meta["val"].shape[-1]))


def route_blocks(gm: torch.fx.GraphModule, router: TokenRouter, mode: str, schedule: list[float],
                 probes: int = 16, gate: MaskGate | None = None) -> list[BlockRegion]:
    """Insert the router before every block with sparsity > 0 and skip tokens ("gather" or "mask" mode)."""
    blocks = find_blocks(gm)
    if len(schedule) != len(blocks):
        raise ConfigError(f"prune_tokens: schedule has {len(schedule)} entries for {len(blocks)} blocks")
    seq = _seq_symbol(gm)
    graph = gm.graph
    gm.add_submodule("prune_router", router)
    if mode == "mask":
        gm.add_submodule("prune_gate", gate or MaskGate(router))
    for block, sparsity in zip(blocks, schedule):
        permille = int(round(sparsity * SPARSITY_SCALE))
        if mode == "gather" and permille <= 0:
            continue
        if mode == "gather" and permille >= SPARSITY_SCALE:  # every token skips: the block is dropped, no router
            block.h_out.replace_all_uses_with(block.h_in)
            continue
        _route_block(graph, block, mode, permille, seq, probes)
    _drop_orphans(graph)
    graph.lint()
    gm.recompile()
    return blocks


def _route_block(graph: torch.fx.Graph, block: BlockRegion, mode: str, permille: int, seq, probes: int) -> None:
    sdpa, h_in, h_out = block.sdpa, block.h_in, block.h_out
    with graph.inserting_before(h_out):
        probe_idx = graph.call_function(probe_rows, (h_in, probes))
        probe = _RowCopier(graph, seq, probe_idx, probes).copy(block.query_path)
        mask = sdpa.args[3]
        mask_probe = graph.call_function(take_rows, (mask, probe_idx, 2))
        score = graph.call_module("prune_router", (block.index, h_in, probe[sdpa.args[0]], sdpa.args[1],
                                                   mask_probe, _sdpa_scale(sdpa)))
        if mode != "mask":
            idx = graph.call_function(select_tokens, (score, permille))
            count = graph.call_function(aten.sym_size.int, (idx, 1))
            env = _RowCopier(graph, seq, idx, count).copy(block.query_side)
            new = graph.call_function(put_rows, (h_in, idx, env[h_out]))
    if mode == "mask":
        with graph.inserting_after(h_out):
            new = graph.call_module("prune_gate", (block.index, score, h_in, h_out))
    h_out.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _drop_orphans(graph: torch.fx.Graph) -> None:
    """Remove what would keep the replaced dense computation alive: metadata asserts and unused
    attention (FX's dead-code pass keeps SDPA, whose dropout makes it count as impure)."""
    dead = {aten._assert_tensor_metadata.default, SDPA}
    while True:
        graph.eliminate_dead_code()
        orphans = [n for n in graph.nodes if n.op == "call_function" and n.target in dead and not n.users]
        if not orphans:
            return
        for node in orphans:
            graph.erase_node(node)
