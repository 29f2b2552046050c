"""One check of a model's inputs, in front of every way to run it (Program, CompiledModel, runners, generate).

Runtimes disagree on bad input (TVM clamps ids, ONNX Runtime returns zeros, torch raises a guard
assertion), so everything the graph assumes about its inputs is checked here first, with a
ConfigError that names the input and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fxpress.errors import ConfigError

if TYPE_CHECKING:
    from fxpress.program import ModelInfo

CACHE_NAMES = ("past_keys", "past_values")


def sequence_limit(info: ModelInfo) -> int:
    """The longest sequence (past plus new tokens) the captured graph and the model's positions allow."""
    from fxpress.capture import MAX_SEQ  # lazily: capture imports the Program, which imports this module

    limit = getattr(info, "max_positions", None)
    return min(limit, MAX_SEQ) if limit else MAX_SEQ


def check_token_ids(ids: Any, vocab_size: int | None, name: str = "input_ids",
                    fix: str = "use the tokenizer the model was compiled with") -> None:
    """Raise ConfigError unless `ids` is an integer tensor with every id in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise ConfigError(f"{name} must be a torch tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ConfigError(f"{name} must be an integer tensor (a LongTensor of token ids), got {ids.dtype}: pass tokenizer output")
    if not vocab_size or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ConfigError(
            f"{name}: token id {bad} is outside the model's vocabulary [0, {vocab_size}): {fix}"
        )


def check_lm_ids(info: ModelInfo, ids: Any, past: int = 0, name: str = "input_ids") -> None:
    """Token ids for a causal LM: [batch, seq] integers in the vocabulary, past + seq within the sequence limit."""
    from fxpress.capture import MAX_BATCH

    check_token_ids(ids, info.vocab_size, name)
    if ids.dim() != 2:
        raise ConfigError(
            f"{name} must have shape [batch, seq], got {ids.dim()}-D shape {tuple(ids.shape)}: "
            "add the batch dimension (ids[None]) or use tokenizer(..., return_tensors='pt')"
        )
    batch, seq = ids.shape
    if seq < 1 or batch < 1:
        raise ConfigError(f"{name} has shape {tuple(ids.shape)}: give at least one sequence of at least one token")
    if batch > MAX_BATCH:
        raise ConfigError(f"{name} has a batch of {batch}, more than the {MAX_BATCH} the graph was captured for: split it")
    check_length(info, seq, past, name)


def check_length(info: ModelInfo, seq: int, past: int = 0, name: str = "input_ids", fix: str = "shorten the input") -> None:
    """`past` cached plus `seq` new positions must fit the graph's and the model's position limit."""
    limit = sequence_limit(info)
    if past + seq > limit:
        raise ConfigError(
            f"{name} needs {past + seq} positions ({past} cached + {seq} new), more than this model's limit of "
            f"{limit}: {fix}"
        )


def check_cache(info: ModelInfo, keys: Any, values: Any, batch: int, dtype: torch.dtype | None = None) -> int:
    """past_keys/past_values of the captured layout (layers, batch, heads, past, dim); returns the past length.

    `dtype`: the one float type the runtime accepts (artifacts do not convert), None for any float.
    """
    pasts = []
    for name, cache, per_row in zip(CACHE_NAMES, (keys, values), (info.key_shape, info.value_shape)):
        if not isinstance(cache, torch.Tensor):
            raise ConfigError(f"{name} must be a tensor (layers, batch, heads, past, dim), got {type(cache).__name__}")
        if not cache.is_floating_point() or (dtype is not None and cache.dtype != dtype):
            want = dtype or "a float type"
            raise ConfigError(
                f"{name} is {cache.dtype}, this model's cache is {want}: start from empty_cache(batch) and pass on the "
                "cache each call returns"
            )
        expected = (info.num_layers, batch, *(per_row or (None, None)))
        got = tuple(cache.shape)
        if cache.dim() != 5 or any(e is not None and g != e for g, e in zip(got[:3] + got[4:], expected)):
            want = f"({expected[0]}, {batch}, {expected[2]}, past, {expected[3]})"
            raise ConfigError(
                f"{name} has shape {got}, this model needs {want}: start from empty_cache(batch) and pass on the "
                "cache each call returns"
            )
        pasts.append(got[3])
    if pasts[0] != pasts[1] or keys.dtype != values.dtype:
        raise ConfigError(
            f"past_keys and past_values disagree (past {pasts[0]} vs {pasts[1]}, {keys.dtype} vs {values.dtype}): "
            "pass the pair one call returned"
        )
    return pasts[0]


def check_inputs(info: ModelInfo, inputs: Sequence[Any], examples: Sequence[Any] | None = None,
                 cache_dtype: torch.dtype | None = None) -> None:
    """Check `inputs` against what the model was captured with, before anything runs.

    Causal LMs take `input_ids` alone or with the KV cache (of `cache_dtype` when given); other models take as
    many tensors as they were captured with, of the examples' rank and dtype kind when `examples` are known.
    """
    if info.kind == "causal_lm":
        if len(inputs) not in (1, 3):
            raise ConfigError(f"a causal LM takes input_ids or (input_ids, past_keys, past_values), got {len(inputs)} inputs")
        check_lm_ids(info, inputs[0])
        if len(inputs) == 3:
            check_length(info, inputs[0].shape[1], check_cache(info, inputs[1], inputs[2], inputs[0].shape[0], cache_dtype))
        return
    names = info.input_names or tuple(f"input_{i}" for i in range(len(examples or inputs)))
    if len(inputs) != len(names):
        raise ConfigError(f"this model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    for i, (name, value) in enumerate(zip(names, inputs)):
        _check_like(name, value, examples[i] if examples is not None and i < len(examples) else None)


def _check_like(name: str, value: Any, example: Any) -> None:
    """A generic model's input: a tensor of the example's rank and of its dtype kind (integer or float)."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{name} must be a torch tensor, got {type(value).__name__}")
    if not isinstance(example, torch.Tensor):
        return
    if value.dim() != example.dim():
        raise ConfigError(
            f"{name} has {value.dim()}-D shape {tuple(value.shape)}, the model was captured with {example.dim()}-D "
            f"inputs like {tuple(example.shape)}"
        )
    if value.is_floating_point() != example.is_floating_point():
        raise ConfigError(f"{name} is {value.dtype}, the model was captured with {example.dtype}: convert it")
