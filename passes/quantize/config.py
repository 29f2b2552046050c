"""Quantize's configuration: one small dataclass per thing it quantizes (weights, activations, KV cache, tables)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fxpress.errors import ConfigError
from fxpress.passes.base import check_choice, check_range


@dataclass
class WeightQuant:
    """Linear weights to `bits` (None: stay in float), packed, `group_size` columns per scale (-1: per channel).

    Asymmetric with integer zero points unless `symmetric`; `method` "rtn" or "gptq" (Hessians from the
    calibration set, `act_order` and `damp` as in GPTQ); `clip_search` picks each group's clip; linears whose
    weight name matches a `skip` regex stay in full precision; `seed` fixes GPTQ's randomness. With
    `correct_act_error` GPTQ fits each linear's output on its input before the activation quantizer (not after),
    so the weights also undo part of that quantizer's error (GPTAQ-style; only linears with quantized inputs; it
    pays at 4-bit activations, not at 8, where the small error's fit learns the calibration text's domain);
    `act_error_ridge` (x mean diag H) pulls that fit back towards the float weights (3: chosen on held-out text;
    GPTQ's 0.01 overfits the calibration rows).
    """

    bits: int | None = 4
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    act_order: bool = False
    clip_search: bool = True
    damp: float = 0.01
    skip: tuple[str, ...] = ("lm_head",)
    seed: int = 0
    correct_act_error: bool = False
    act_error_ridge: float = 3.0

    def validate(self) -> None:
        check_bits("weights.bits", self.bits)
        check_group_size("weights.group_size", self.group_size)
        check_choice("quantize", "weights.method", self.method, ("rtn", "gptq"))
        if self.act_order and self.method != "gptq":
            raise ConfigError("quantize.weights.act_order only applies to method='gptq': set method='gptq' or act_order=False")
        if self.correct_act_error and self.method != "gptq":
            raise ConfigError("quantize.weights.correct_act_error only applies to method='gptq': set method='gptq' or "
                              "correct_act_error=False")
        check_flags("weights", self, ("symmetric", "act_order", "clip_search", "correct_act_error"))
        check_range("quantize", "weights.damp", self.damp, 0.0, 1.0)
        check_range("quantize", "weights.act_error_ridge", self.act_error_ridge, 1e-6, 1000.0)
        _check_skip(self.skip)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"quantize.weights.seed = {self.seed!r} must be an integer")


@dataclass
class ActQuant:
    """Dynamic per-token activations into the quantized linears, to `bits` (None: stay in float).

    Symmetric unless `symmetric` is False (then [min(x, 0), max(x, 0)] with an integer zero point: one
    more level, no half of the grid wasted on skewed rows), clipped at `clip_ratio`; `clip_search` picks
    each quantizer's own ratio (at most `clip_ratio`) on the calibration set. `avg_bits` (None: every quantizer
    at `bits`) makes them mixed precision: the quantizers whose `bits` error costs their linears most, measured
    on the calibration set, go to `high_bits` while the average over quantized activation elements stays within
    `avg_bits` (e.g. bits=4, avg_bits=4.5).
    """

    bits: int | None = None
    symmetric: bool = True
    clip_ratio: float = 1.0
    clip_search: bool = False
    avg_bits: float | None = None
    high_bits: int = 8

    def validate(self) -> None:
        check_bits("activations.bits", self.bits)
        check_bits("activations.high_bits", self.high_bits)
        check_flags("activations", self, ("symmetric", "clip_search"))
        check_range("quantize", "activations.clip_ratio", self.clip_ratio, 0.05, 1.0)
        if self.avg_bits is None:
            return
        if self.bits is None:
            raise ConfigError("quantize.activations.avg_bits needs activations.bits: set bits (e.g. 4) or avg_bits=None")
        if self.high_bits <= self.bits:
            raise ConfigError(f"quantize.activations.high_bits = {self.high_bits} must be above bits = {self.bits} "
                              "for a mixed-precision budget: e.g. bits=4, high_bits=8")
        check_range("quantize", "activations.avg_bits", self.avg_bits, float(self.bits), float(self.high_bits))


@dataclass
class KVQuant:
    """Keys (after RoPE and any online Hadamard) and values written to the cache: asymmetric per token and head."""

    bits: int | None = None
    clip_ratio: float = 1.0

    def validate(self) -> None:
        check_bits("kv_cache.bits", self.bits)
        check_range("quantize", "kv_cache.clip_ratio", self.clip_ratio, 0.05, 1.0)


@dataclass
class TableQuant:
    """Token embedding tables (`embedding_bits`) and the linears making the logits (`lm_head_bits`), RTN.

    `group_size` None uses the weights' group size. A table tied between the two is stored once when both
    get the same bits.
    """

    embedding_bits: int | None = None
    lm_head_bits: int | None = None
    group_size: int | None = None

    def validate(self) -> None:
        check_bits("tables.embedding_bits", self.embedding_bits)
        check_bits("tables.lm_head_bits", self.lm_head_bits)
        if self.group_size is not None:
            check_group_size("tables.group_size", self.group_size)


def check_bits(path: str, value: Any) -> None:
    if not (value is None or (isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 8)):
        raise ConfigError(f"quantize.{path} = {value!r} is not allowed: use an integer from 2 to 8, or None to leave it in float")


def check_group_size(path: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or (value >= 8 and value % 8 == 0)):
        raise ConfigError(
            f"quantize.{path} = {value!r} is not allowed: use -1 (one group per output channel) or a "
            "multiple of 8 (a power of two >= 16, e.g. 32, 64, 128, maps directly to ONNX MatMulNBits)"
        )


def check_flags(group: str, config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"quantize.{group}.{name} = {getattr(config, name)!r} must be True or False")


def _check_skip(skip: Any) -> None:
    if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
        raise ConfigError(f"quantize.weights.skip = {skip!r} must be a list of regular expressions, e.g. ['lm_head']")
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"quantize.weights.skip pattern {pattern!r} is not a valid regular expression: {err}") from err


# Version 1 recipes held all 18 fields flat; version 2 groups them. Old name -> (group, new name).
V1_FIELDS: dict[str, tuple[str, str]] = {
    "w_bits": ("weights", "bits"), "group_size": ("weights", "group_size"), "symmetric": ("weights", "symmetric"),
    "method": ("weights", "method"), "act_order": ("weights", "act_order"), "clip_search": ("weights", "clip_search"),
    "damp": ("weights", "damp"), "skip": ("weights", "skip"), "seed": ("weights", "seed"),
    "a_bits": ("activations", "bits"), "act_symmetric": ("activations", "symmetric"),
    "clip_ratio": ("activations", "clip_ratio"), "act_clip_search": ("activations", "clip_search"),
    "kv_bits": ("kv_cache", "bits"), "kv_clip_ratio": ("kv_cache", "clip_ratio"),
    "embedding_bits": ("tables", "embedding_bits"), "lm_head_bits": ("tables", "lm_head_bits"),
    "table_group_size": ("tables", "group_size"),
}


def regroup_fields(fields: dict[str, Any], moves: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Flat recipe fields moved into config groups (`moves`: old name -> (group, new name)); other names
    pass through, so build_config names any unknown one."""
    grouped: dict[str, Any] = {}
    for name, value in fields.items():
        if name in moves:
            group, new_name = moves[name]
            grouped.setdefault(group, {})[new_name] = value
        else:
            grouped[name] = value
    return grouped
