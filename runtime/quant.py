"""Low-bit ops: `fxpress::linear_nbit` (packed weights) and `fxpress::quantize_act` (dynamic fake quantization).

The packed layout is ONNX Runtime's `com.microsoft::MatMulNBits` layout, so the ONNX lowering is a
reshape and the TVM lowering reads the same bytes:

- `qweight`: uint8 `(N, k_blocks, block_size * bits / 8)`, `k_blocks = ceil(K / block_size)`. Along K,
  each block's codes form one little-endian bit stream: code `i` of a block occupies bits
  `[i*bits, (i+1)*bits)` of the block's bytes ("low bits first"). For 4 bits, code `2j` is the low
  nibble of byte `j`; for 2 bits, code `4j` is bits 0-1 of byte `j`; 8 bits is one code per byte.
  3-, 5-, 6- and 7-bit codes use the same stream and may straddle bytes. A partial last block (K
  not a multiple of block_size) is padded with code 0; the padding never meets an input column.
- `scales`: float `(N, k_blocks)`, the dtype of the input.
- `zero_points`: optional uint8 `(N, ceil(k_blocks * bits / 8))`, each row's k_blocks codes packed the
  same way; absent means the symmetric zero point `2^(bits-1)`.
- weight `W[n, k] = (code[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]`, and
  `y = x @ W.T (+ bias)`.

`block_size` must be a multiple of 8 (so a block fills whole bytes). MatMulNBits itself takes a
power of two >= 16 and runs bits 2, 4, 8 on CPU; per-channel quantization uses block_size = K
rounded up to a multiple of 8, which a lowering re-blocks when K is not a power of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxpress.runtime.ops import define_op

# --- rounding -----------------------------------------------------------------------------------------
_MAGIC = {torch.float32: 1.5 * 2.0**23, torch.float64: 1.5 * 2.0**52}


# float64 activations round halves up with a margin: a value within 2^-30 below a tie goes up (see _quantize_act)
TIE_OFFSET = {torch.float64: 2.0**-30}


def round_clamped(v: torch.Tensor, low: float, high: float, offset: float = 0.0) -> torch.Tensor:
    """clamp(round(v), low, high) for integer bounds, rounding half to even exactly as torch.round / ONNX Round.

    Computed as clamp first, then (v + 1.5*2^23) - 1.5*2^23 (float32; 2^52 for float64): adding the
    magic number pushes the fraction out of the mantissa with the FPU's round-half-to-even. Same
    result as torch.round for |v| < 2^22, and much cheaper than torch.round on small CPU tensors,
    which costs tens of milliseconds per call on a busy 2-core machine (it is called once per
    column in GPTQ).
    """
    return round_clamped_(torch.clamp(v, low, high), low, high, offset)  # in place on the clamped copy


def round_clamped_(v: torch.Tensor, low: float, high: float, offset: float = 0.0) -> torch.Tensor:
    """`round_clamped` in place, the same float operations: for GPTQ's loop, which runs it once per column, and for
    fresh temporaries (a large one allocated per operation costs page faults on every call)."""
    v.clamp_(low, high)
    if offset:
        v.add_(offset)
    magic = _MAGIC.get(v.dtype)
    return v.round_() if magic is None else v.add_(magic).sub_(magic)


# --- bit packing ------------------------------------------------------------------------------------
def _shifts(count: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.arange(count, device=device, dtype=torch.int64) * step


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., L) into uint8 (..., ceil(L*bits/8)), low bits first along the last axis.

    Codes go in groups of eight: eight `bits`-bit codes are exactly `bits` bytes, so any width 1..8
    packs with one shift-and-sum per group (no Python loop over elements).
    """
    length = codes.shape[-1]
    padded = -(-length // 8) * 8
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    if padded != length:
        c = F.pad(c, (0, padded - length))
    groups = c.reshape(*c.shape[:-1], padded // 8, 8)
    word = (groups << _shifts(8, bits, c.device)).sum(-1)  # disjoint bit ranges: sum == or
    out = (word.unsqueeze(-1) >> _shifts(bits, 8, c.device)) & 0xFF
    out = out.reshape(*c.shape[:-1], padded // 8 * bits).to(torch.uint8)
    return out[..., : -(-length * bits // 8)]


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 (..., B) -> codes (..., length) (uint8 for 1/2/4/8 bits, else int64)."""
    if 8 % bits == 0:  # whole codes per byte: shift and mask in uint8, no wide temporaries
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length]
    nbytes = packed.shape[-1]
    padded = -(-nbytes // bits) * bits
    p = packed.to(torch.int64)
    if padded != nbytes:
        p = F.pad(p, (0, padded - nbytes))
    groups = p.reshape(*p.shape[:-1], padded // bits, bits)
    word = (groups << _shifts(bits, 8, p.device)).sum(-1)
    codes = (word.unsqueeze(-1) >> _shifts(8, bits, p.device)) & ((1 << bits) - 1)
    return codes.reshape(*p.shape[:-1], padded // bits * 8)[..., :length]


def pack_weight(codes: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Codes (N, K) -> MatMulNBits `B` uint8 (N, ceil(K/block_size), block_size*bits/8), last block padded with 0."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    padded = F.pad(codes.to(torch.int64), (0, blocks * block_size - k))
    return pack_codes(padded.reshape(n, blocks, block_size), bits)


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    """The float weight (N, K) that `linear_nbit` multiplies by: (code - zero) * scale per block."""
    n, blocks, _ = qweight.shape
    codes = unpack_codes(qweight, bits, block_size).to(scales.dtype)
    if zero_points is None:
        zeros = torch.full((n, blocks, 1), float(1 << (bits - 1)), dtype=scales.dtype, device=scales.device)
    else:
        zeros = unpack_codes(zero_points, bits, blocks).to(scales.dtype).unsqueeze(-1)
    weight = (codes - zeros) * scales.unsqueeze(-1)
    return weight.reshape(n, blocks * block_size)[:, :in_features]


# --- fxpress::linear_nbit --------------------------------------------------------------------------
def _linear_nbit(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    weight = dequantize_weight(qweight, scales, zero_points, bits, block_size, in_features).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _linear_nbit_fake(x, qweight, scales, zero_points, bias, bits, block_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


LINEAR_NBIT_DOC = __doc__ or ""

LINEAR_NBIT = define_op(
    "linear_nbit",
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? zero_points, Tensor? bias, int bits, int block_size, "
    "int in_features) -> Tensor",
    _linear_nbit,
    _linear_nbit_fake,
    "y = x @ dequant(qweight).T + bias with MatMulNBits-packed low-bit weights. " + LINEAR_NBIT_DOC,
)


# --- fxpress::quantize_act -------------------------------------------------------------------------
def _quantize_act(x: torch.Tensor, bits: int, clip_ratio: float, symmetric: bool) -> torch.Tensor:
    """Round every row of the last axis to `bits` bits with its own scale, and back to float.

    In float64 (the Precision pass) the clamped value gets + 2^-30 before rounding: real activations hold exact
    ties (a row whose max is 1.5x its |min| puts |min| exactly on 13.5 at 4 bits), and runtimes that differ
    only in the last bit would round such a tie apart; with the margin every runtime rounds it up, while a
    value must now sit within 1e-14 of k + 0.5 - 2^-30 to flip, which nothing structural does.
    """
    tie = TIE_OFFSET.get(x.dtype, 0.0)
    if symmetric:
        maxq = (1 << (bits - 1)) - 1
        scale = x.abs().amax(-1, keepdim=True) * (clip_ratio / max(maxq, 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return round_clamped_(x / scale, -maxq - 1, maxq, tie).mul_(scale)
    maxq = (1 << bits) - 1
    high = x.amax(-1, keepdim=True).clamp_min(0) * clip_ratio  # (torch.aminmax is 14x slower on CPU)
    low = x.amin(-1, keepdim=True).clamp_max(0) * clip_ratio
    scale = (high - low) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = round_clamped(-low / scale, 0, maxq, tie)
    # one temporary, rewritten in place: the same float operations as (round_clamped(x / s + z) - z) * s
    return round_clamped_((x / scale).add_(zero), 0, maxq, tie).sub_(zero).mul_(scale)


def _quantize_act_fake(x, bits, clip_ratio, symmetric):
    return torch.empty_like(x)


QUANTIZE_ACT = define_op(
    "quantize_act",
    "(Tensor x, int bits, float clip_ratio, bool symmetric) -> Tensor",
    _quantize_act,
    _quantize_act_fake,
    "Dynamic fake quantization, one scale per row of the last axis (per token for activations, per "
    "token and head for the KV cache, whose last axis is head_dim). Symmetric: scale = clip_ratio * "
    "max|x| / (2^(bits-1) - 1), codes in [-2^(bits-1), 2^(bits-1) - 1]. Asymmetric: range [min(x, 0), "
    "max(x, 0)] times clip_ratio, scale = range / (2^bits - 1), integer zero point round(-low / scale). "
    "Returns (code - zero) * scale in the input dtype; an all-zero row passes through unchanged. In float64 "
    "the clamped value gets + 2^-30 before rounding, so exact ties round up in every runtime.",
)


@dataclass(frozen=True)
class QuantSpec:
    """The per-token fake quantizer of the final recipe (the formula of `fxpress::quantize_act`)."""

    bits: int
    clip_ratio: float = 1.0
    symmetric: bool = True
    group: int = 0  # 0: one scale per row of the last axis


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


def fake_quant_ste(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`_quantize_act` (per row, optionally in groups) with straight-through rounding: the forward value is
    the runtime's, the gradient flows through the scale and the unclipped values (SpinQuant's quantizer)."""
    if spec.group and x.shape[-1] % spec.group == 0 and spec.group < x.shape[-1]:
        return fake_quant_ste(x.reshape(*x.shape[:-1], -1, spec.group), QuantSpec(spec.bits, spec.clip_ratio,
                                                                                 spec.symmetric)).reshape(x.shape)
    if spec.symmetric:
        maxq = (1 << (spec.bits - 1)) - 1
        scale = x.abs().amax(-1, keepdim=True) * (spec.clip_ratio / max(maxq, 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(_round_ste(x / scale), -maxq - 1, maxq) * scale
    maxq = (1 << spec.bits) - 1
    high = x.amax(-1, keepdim=True).clamp_min(0) * spec.clip_ratio
    low = x.amin(-1, keepdim=True).clamp_max(0) * spec.clip_ratio
    scale = (high - low) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(_round_ste(-low / scale), 0, maxq)
    return (torch.clamp(_round_ste(x / scale) + zero, 0, maxq) - zero) * scale
