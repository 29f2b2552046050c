"""Token-by-token generation over any runner (PyTorch, ONNX Runtime, TVM) with the KV cache.

One prefill call over the prompt (empty past), then one call per new token that feeds only that token
and the cache the previous call returned: the artifact's own decode path, not a re-run of the prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from fxpress.errors import ConfigError
from fxpress.inputs import check_length, check_lm_ids
from fxpress.runtime.runners import Runner, load_runner


def _validate(max_new_tokens: Any, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens = {max_new_tokens!r} must be a non-negative integer")
    if not temperature > 0:
        raise ConfigError(f"temperature = {temperature!r} must be > 0 (use do_sample=False for greedy decoding)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k = {top_k!r} must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p = {top_p!r} must be in (0, 1] or None")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (rows of [batch, vocab])."""
    out = logits.clone()
    if top_k is not None and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        drop_sorted = before >= top_p  # always keeps the best token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from last-position logits [batch, vocab]."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    runner: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Prompt [batch, seq] -> prompt plus up to `max_new_tokens` tokens, greedy or sampled, via the KV cache.

    `runner` is a Runner, a Program / compiled model, or an artifact path. Sampling with the same seed
    gives the same tokens. Rows that produced `eos_token_id` keep emitting it; generation stops early
    when every row has.
    """
    _validate(max_new_tokens, temperature, top_k, top_p)
    runner = runner if isinstance(runner, Runner) else load_runner(runner)
    if not runner.is_causal_lm:
        raise ConfigError(f"generate needs a causal language model; this {runner.kind} artifact is not one")
    check_lm_ids(runner.info, input_ids)  # the same check every step makes, but before the first one
    if max_new_tokens > 0:
        check_length(runner.info, input_ids.shape[1] + max_new_tokens - 1, name="input_ids with max_new_tokens",
                     fix="shorten the prompt or lower max_new_tokens")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = input_ids
    keys, values = runner.empty_cache(input_ids.shape[0])
    feed = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits, keys, values = runner.step(feed, keys, values)
        nxt = next_tokens(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        feed = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return tokens
