"""Multiply-add accounting for `prune_tokens`: the cost of a schedule and the budget a sparsity allows."""

from __future__ import annotations

from typing import Any

from fxpress.passes.prune_tokens.router import SPARSITY_SCALE, keep_count


def _attention_macs(cost: dict[str, Any], seq: int) -> int:
    """Per query, over every key: scores and the weighted sum."""
    return 2 * cost["heads"] * cost["head_dim"] * seq


def _pruned_block_macs(meta: dict[str, Any], cost: dict[str, Any], seq: int, sparsity: float) -> float:
    """One block's multiply-adds at `sparsity`: dropped blocks still fill the cache, routed ones pay the router."""
    attn = _attention_macs(cost, seq)
    permille = int(round(sparsity * SPARSITY_SCALE))
    if permille >= SPARSITY_SCALE:  # dropped: only the k/v projections still run (they fill the cache)
        return seq * cost["every_macs"]
    if permille == 0:
        return seq * (cost["kept_macs"] + cost["every_macs"] + attn)
    kept = keep_count(seq, permille)
    router = meta.get("probes", 16) * (cost["query_macs"] + attn) + seq * meta.get("router_macs", 1000)
    return kept * (cost["kept_macs"] + attn) + seq * cost["every_macs"] + router


def prune_flops(meta: dict[str, Any], seq: int, schedule: list[float] | None = None) -> dict[str, Any]:
    """Multiply-adds of one prefill of `seq` tokens, dense vs pruned (router and probes included)."""
    schedule = schedule if schedule is not None else meta["schedule"]
    dense_total, pruned_total, saved = 0.0, 0.0, []
    for cost, sparsity in zip(meta["blocks"], schedule):
        dense = _pruned_block_macs(meta, cost, seq, 0.0)
        pruned = _pruned_block_macs(meta, cost, seq, sparsity)
        dense_total += dense
        pruned_total += pruned
        saved.append(1.0 - pruned / dense)
    head = seq * meta.get("head_macs", 0)
    return {"dense": dense_total + head, "pruned": pruned_total + head,
            "ratio": (pruned_total + head) / (dense_total + head), "block_saved": saved}


def flops_budget(meta: dict[str, Any], seq: int, sparsity: float) -> float:
    """Multiply-adds allowed for a token sparsity: the dense count less `sparsity` of what every
    token-block visit could save (its query-side matmuls and attention), with no router cost.
    At 0.3 on equal blocks this is the cost of dropping 30% of the blocks."""
    dense = prune_flops(meta, seq, [0.0] * len(meta["blocks"]))["dense"]
    savable = sum(seq * (c["kept_macs"] + _attention_macs(c, seq)) for c in meta["blocks"])
    return dense - sparsity * savable
