"""Pruning baselines to measure `prune_tokens` against, at the same FLOPs.

- ShortGPT (Men et al., 2024): drop whole decoder blocks with the lowest Block Influence,
  BI = 1 - mean cos(block input, block output) over calibration tokens.
- Sub-block pruning (in the spirit of BlockPruner): drop attention or MLP sub-blocks separately,
  ranked by their own BI (BlockPruner ranks by perplexity, which costs one forward per candidate;
  BI needs a single forward, and says so in the report).

Both are graph rewrites on a Program (the residual stream bypasses what is dropped); FLOPs are
counted from the graph; a dropped block's k/v projections still run (they fill the KV cache), as in
`prune_tokens`, so they are not counted as saved.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxpress import graph as G
from fxpress.calibration import for_each_activation
from fxpress.errors import ConfigError
from fxpress.passes.prune_tokens.router import BlockRegion, _drop_orphans, find_blocks, matmul_macs


def _cosine_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    cos = F.cosine_similarity(a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float(), dim=-1)
    return float((1.0 - cos).sum()), cos.numel()


def _stream_value(node: torch.fx.Node) -> torch.fx.Node:
    """The cast of a residual add that the next sub-block reads, if there is one."""
    for user in node.users:
        if G.is_cast(user):
            return user
    return node


def influence(program, samples: torch.Tensor) -> dict[tuple[int, str], float]:
    """Block Influence per block ("block") and per sub-block ("attn", "mlp") on `samples`."""
    blocks = find_blocks(program.module)
    pairs: dict[tuple[int, str], tuple[str, str]] = {}
    for b in blocks:
        mid = b.residual_adds[0]
        pairs[(b.index, "block")] = (b.h_in.name, b.h_out.name)
        pairs[(b.index, "attn")] = (b.h_in.name, mid.name)
        if len(b.residual_adds) > 1:
            pairs[(b.index, "mlp")] = (_stream_value(mid).name, b.h_out.name)
    wanted = {name for pair in pairs.values() for name in pair}
    seen: dict[str, torch.Tensor] = {}
    sums = {key: [0.0, 0] for key in pairs}

    def record(name: str, value: torch.Tensor) -> None:
        seen[name] = value
        for key, (first, second) in pairs.items():
            if name in (first, second) and first in seen and second in seen:
                gap, count = _cosine_gap(seen[first], seen[second])
                sums[key][0] += gap
                sums[key][1] += count

    for batch in samples.split(2):
        seen.clear()
        for_each_activation(program, wanted, record, [batch])
    return {key: total / max(count, 1) for key, (total, count) in sums.items()}


def sub_block_macs(block: BlockRegion, seq: int) -> dict[str, float]:
    """Multiply-adds of one prefill of `seq` tokens a dropped attention / MLP sub-block saves (its k/v
    projections are not counted: the graph still runs them, their output fills the KV cache)."""
    mid = block.residual_adds[0]
    region = set(block.region)
    attn_nodes = G.ancestors(mid, within=region) & set(block.query_side)  # k/v projections still run: they fill the cache
    q = block.sdpa.args[0].meta["val"]
    attention = 2 * int(q.shape[1]) * int(q.shape[-1]) * seq * seq
    attn = seq * sum(matmul_macs(n) for n in block.region if n in attn_nodes) + attention
    mlp = seq * sum(matmul_macs(n) for n in block.region if n not in G.ancestors(mid, within=region))
    return {"attn": float(attn), "mlp": float(mlp), "block": float(attn + mlp)}


def drop(program, items: list[tuple[int, str]]) -> None:
    """Bypass whole blocks ("block") or sub-blocks ("attn", "mlp") in the residual stream, in place."""
    blocks = find_blocks(program.module)
    for index, part in sorted(items, reverse=True):
        if not 0 <= index < len(blocks) or part not in ("block", "attn", "mlp"):
            raise ConfigError(f"cannot drop {part!r} of block {index}: the model has {len(blocks)} blocks")
        b = blocks[index]
        mid = b.residual_adds[0]
        if part == "block":
            b.h_out.replace_all_uses_with(b.h_in)
        elif part == "attn":
            mid.replace_all_uses_with(b.h_in)
        else:
            b.h_out.replace_all_uses_with(_stream_value(mid))
    _drop_orphans(program.graph)
    program.graph.lint()
    program.module.recompile()


def choose_at_flops(scores: dict[tuple[int, str], float], costs: dict[tuple[int, str], float], budget: float,
                    kinds: tuple[str, ...], protect: set[int] = frozenset()) -> tuple[list[tuple[int, str]], float]:
    """Lowest-influence units of `kinds` until their cost reaches `budget` (closest, never far below)."""
    chosen, saved = [], 0.0
    ranked = sorted((s, key) for key, s in scores.items() if key[1] in kinds and key[0] not in protect)
    for _, key in ranked:
        if key[1] != "block" and (key[0], "block") in chosen:
            continue
        if saved >= budget:
            break
        if saved + costs[key] - budget > budget - saved:  # the next unit overshoots more than it closes
            break
        chosen.append(key)
        saved += costs[key]
    return chosen, saved
