"""Weight quantization math: RTN and GPTQ with groups, act-order, dampening and a clipping search.

Everything works on one weight matrix `W` (N out, K in) and, for GPTQ, the Hessian of the layer's
reconstruction loss `H = 2/n * X^T X` over n calibration rows of its input. Results are integer
codes plus per-(row, group) scales and integer zero points, the storage `fxpress::linear_nbit` reads.
Groups run along K (`group_size` columns, the last group may be partial); `group_size=-1` means one
group per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpress.errors import ConfigError, FxpressError
from fxpress.runtime.quant import pack_codes, pack_weight, round_clamped, round_clamped_

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))  # shrink factors 1.0 .. 0.55 for the clipping search
GRAM_BANDS, GRAM_MIN_WIDTH = 4, 512  # `gram` multiplies only the upper bands of a Hessian this wide or wider
RTN_SLICE_BYTES = 16 * 2**20  # fp32 rows quantized at a time by `rtn`: its float temporaries stay this size


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is quantized: bits, group size (-1 = per channel), symmetry, clipping search."""

    bits: int
    group_size: int = 128
    symmetric: bool = False
    clip_search: bool = True

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def block_size(self, in_features: int) -> int:
        """Columns per stored block: the group size, or K rounded up to a multiple of 8 for per channel
        (and when a group would be wider than the row, so storage is never mostly padding)."""
        whole_row = -(-in_features // 8) * 8
        return min(self.group_size, whole_row) if self.group_size > 0 else whole_row


@dataclass
class QuantizedWeight:
    """Integer codes (N, K), scales and integer-valued zero points (N, k_blocks) of one weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: WeightSpec
    block_size: int

    def to(self, device: str | torch.device) -> QuantizedWeight:
        """The same weight with its tensors on `device` (results of a GPU calibration come back to the CPU)."""
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.spec,
                               self.block_size)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        group = torch.arange(k, device=self.codes.device) // self.block_size
        return (self.codes.to(self.scales.dtype) - self.zeros[:, group]) * self.scales[:, group]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, zero_points) in the MatMulNBits layout; symmetric weights carry no zero points."""
        qweight = pack_weight(self.codes, self.spec.bits, self.block_size)
        zero_points = None if self.spec.symmetric else pack_codes(self.zeros.to(torch.int64), self.spec.bits)
        return qweight, self.scales.contiguous(), zero_points


# --- scales and zero points -------------------------------------------------------------------------
def _params_for_range(low: torch.Tensor, high: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.symmetric:
        scale = (high - low) / spec.maxq
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        scale = (high - low) / spec.maxq
        zero = round_clamped(-low / scale, 0, spec.maxq)
    return scale, zero


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round `w` to the grid (code - zero) * scale, codes clamped to [0, maxq]; scale/zero broadcast."""
    return round_clamped_((w / scale).add_(zero), 0, maxq).sub_(zero).mul_(scale)


def find_params(w: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for rows of `w` (R, G): min/max range, then shrink it where that lowers the error.

    The range always contains 0 (so zero padding of a partial group is exact), a row of zeros gets
    the range [-1, 1] (never a zero or NaN scale), and the clipping search tries shrink factors
    1.0, 0.95 .. 0.55 per row, keeping the one with the smallest squared error.
    """
    w = w.float()
    low = w.amin(1).clamp_max(0)
    high = w.amax(1).clamp_min(0)
    if spec.symmetric:
        high = torch.maximum(-low, high)
        low = -high
    empty = (high - low) == 0
    low = torch.where(empty, torch.full_like(low, -1.0), low)
    high = torch.where(empty, torch.full_like(high, 1.0), high)
    best_scale, best_zero = _params_for_range(low, high, spec)
    if not spec.clip_search:
        return best_scale, best_zero
    best_err = torch.full_like(low, float("inf"))
    for ratio in CLIP_GRID:
        scale, zero = _params_for_range(low * ratio, high * ratio, spec)
        q = fake_quant(w, scale.unsqueeze(1), zero.unsqueeze(1), spec.maxq)
        err = (q - w).square().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_params(w: torch.Tensor, spec: WeightSpec, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (N, k_blocks) for every group of `w` at once; the last group is zero-padded."""
    n, k = w.shape
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(w.float(), (0, blocks * block - k))
    scale, zero = find_params(padded.reshape(n * blocks, block), spec)
    return scale.reshape(n, blocks), zero.reshape(n, blocks)


def _sweep_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, diagonal: float,
                  code: torch.Tensor, err: torch.Tensor) -> None:
    """One GPTQ step, written into `code` and `err` in place (a handful of kernels, no temporaries): the
    column's codes, and its error (w - dequantized) / H^-1[i, i] that the caller spreads onto later columns."""
    torch.div(w, scale, out=code)
    round_clamped_(code.add_(zero), 0, maxq)
    torch.sub(code, zero, out=err)
    torch.sub(w, err.mul_(scale), out=err)
    err.div_(diagonal)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return round_clamped(w / scale + zero, 0, maxq)


# --- RTN --------------------------------------------------------------------------------------------
def rtn(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """Round-to-nearest: each group's codes from its own (clip-searched) scale and zero point."""
    n, k = weight.shape
    block = spec.block_size(k)
    group = torch.arange(k, device=weight.device) // block
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    step = max(1, RTN_SLICE_BYTES // (4 * k))  # rows are independent: slices bound the clip search's copies
    for start in range(0, n, step):
        w = weight.detach()[start:start + step].float()
        scale, zero = _group_params(w, spec, block)
        codes[start:start + step] = _codes(w, scale[:, group], zero[:, group], spec.maxq)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, torch.cat(scales), torch.cat(zeros), spec, block)


# --- GPTQ -------------------------------------------------------------------------------------------
def hessian(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(2/n) X^T X over every row of `x` (..., K) and n; n = 0 gives a zero matrix.

    The product runs in float32 (a float64 one costs twice as much for no gain at these sizes);
    the result is float64, which the Cholesky factorisations in `gptq` use.
    """
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    n = rows.shape[0]
    h = gram(rows).to(torch.float64)
    return (h * (2.0 / n) if n else h), n


def gram(rows: torch.Tensor, bands: int = GRAM_BANDS) -> torch.Tensor:
    """X^T X of `rows` [n, K], exactly symmetric: only the blocks on and above the diagonal are multiplied
    (`bands` bands of columns, each against itself and the columns after it; the rest is the mirror), so a wide
    Hessian costs (bands + 1) / (2 bands) of a full product (K >= GRAM_MIN_WIDTH; narrower ones are one GEMM)."""
    width = rows.shape[1]
    if width < GRAM_MIN_WIDTH:
        return rows.T @ rows
    edges = [width * i // bands for i in range(bands + 1)]
    out = torch.empty(width, width, dtype=rows.dtype, device=rows.device)
    for start, stop in zip(edges, edges[1:]):
        band = rows[:, start:stop].T @ rows[:, start:]
        out[start:stop, start:] = band
        out[stop:, start:stop] = band[:, stop - start:].T
    return out


def float_input_target(weight: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """The weights W* whose output on the quantized inputs X~ best matches W's on the float inputs X.

    GPTQ minimises ||X~ (W* - Q)^T||^2, which equals ||X W^T - X~ Q^T||^2 up to a constant when W* is the
    least-squares fit W* = W C H^-1 (H = X~^T X~, C = X^T X~), so the quantized weights also undo part of their own
    input's activation quantization error (as GPTAQ does). The fit is a ridge regression towards W, with weight
    `ridge` x mean(diag H): a direction the calibration rows hardly reach keeps W's weights.

    `cross` is C (K x K), or, for a weight with fewer rows N than inputs K, C^T W^T (K x N, `cross_statistic`):
    the fit then reads C only through that product, which is cheaper to sum over the calibration rows.
    The solve is float64; the products with W are float32 (the ridge keeps the system well conditioned, and
    what they round is ~5e-5 of the correction W* - W). With more output rows than inputs (q/k/v, gate/up) the
    K x K map (H + lam I)^-1 (C + lam I)^T is solved first and W applied to it after, which is cheaper.
    """
    lam = ridge * float(torch.diagonal(h).mean())
    lower = torch.linalg.cholesky(_plus_diagonal(h, lam))
    w = weight.detach().float()
    if w.shape[0] > w.shape[1]:
        mapping = torch.cholesky_solve(_plus_diagonal(cross.T, lam), lower)
        return (w @ mapping.float().T).to(weight.dtype)
    if cross.shape[1] == w.shape[0] != w.shape[1]:  # C^T W^T already: (C + lam I)^T W^T = C^T W^T + lam W^T
        rhs = cross.to(torch.float64) + lam * w.T.to(torch.float64)
    else:
        rhs = (_plus_diagonal(cross, lam).float().T @ w.T).to(torch.float64)
    return torch.cholesky_solve(rhs, lower).T.to(weight.dtype)


def cross_statistic(x: torch.Tensor, quantized: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """One chunk's share of what `float_input_target` reads of C = X^T X~ (float32 rows [n, K]; the weights
    that GPTQ will stack, [N_i, K]): C itself, or X~^T (X W^T) = C^T W^T when N = sum N_i < K (down_proj: 576
    rows for K = 1536, 2 n N K multiply-adds instead of n K^2, and a K x N sum instead of K x K)."""
    if sum(w.shape[0] for w in weights) < x.shape[1]:
        return quantized.T @ torch.cat([x @ w.T.to(x.dtype) for w in weights], dim=1)
    return x.T @ quantized


def _plus_diagonal(m: torch.Tensor, value: float) -> torch.Tensor:
    """A float64 copy of `m` with `value` added to its diagonal."""
    out = m.to(torch.float64, copy=True)
    out.diagonal().add_(value)
    return out


def layer_loss(weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer output error GPTQ minimises (up to the 2/n factor in H)."""
    d = (weight.double() - quantized.double())
    return float(((d @ h.double()) * d).sum())


def _check_finite(name: str, weight: torch.Tensor, h: torch.Tensor) -> None:
    """NaN/inf in the weight or the Hessian make Cholesky fail: name the layer and which one is bad."""
    bad = ~torch.isfinite(weight)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise FxpressError(
            f"GPTQ on {name}: its weight has {int(bad.sum())} NaN/inf values (first at row {row}, column {col}): "
            "the checkpoint is corrupt or an earlier pass broke it; reload the model (or check it with torch.isfinite)"
        )
    if not torch.isfinite(h).all():
        raise FxpressError(
            f"GPTQ on {name}: the Hessian of its calibration inputs has NaN/inf values: the activations reaching it "
            "overflow or are NaN; check the calibration data, or compile in float32 (dtype=torch.float32)"
        )


def _inverse_cholesky(h: torch.Tensor, name: str, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float32, as the reference GPTQ); a failure suggests a larger damp.

    With J the reversal (flip of both axes), J H J = L L^T gives H = A A^T for the upper A = J L J, so H^-1 =
    A^-T A^-1 and A^-1 (upper, positive diagonal) is the factor: one Cholesky and one triangular solve instead of
    a Cholesky, an inverse and a second Cholesky (0.66x the time at K = 1536).
    """
    try:  # each intermediate freed as soon as the next exists: two K x K float32 matrices at a time
        factor = h.flip(0, 1)  # J H J, factorised in place
        del h
        torch.linalg.cholesky(factor, out=factor)
        upper = factor.flip(0, 1)  # A = J L J
        del factor
        inverse = torch.eye(upper.shape[0], dtype=upper.dtype, device=upper.device)
        return torch.linalg.solve_triangular(upper, inverse, upper=True, out=inverse)
    except RuntimeError as err:  # torch.linalg.LinAlgError: not positive definite
        larger = min(1.0, damp * 10) if damp > 0 else 0.01
        raise ConfigError(
            f"GPTQ on {name}: the dampened Hessian is not positive definite ({type(err).__name__}), so Cholesky "
            f"failed: raise quantize.weights.damp (now {damp}, e.g. {larger}) or calibrate on more samples"
        ) from err


def _dampened(h: torch.Tensor, diagonal: torch.Tensor, perm: torch.Tensor, damp: float) -> torch.Tensor:
    """float32 H[perm][:, perm] + damp * mean(diag) I, the diagonal added in float64 and rounded once, and the
    caller's float64 H left as it is: float32 copies only (a float64 copy of a 14k-wide Hessian is 1.5 GB, and
    memory budgets count each one)."""
    h32 = h.detach().float().index_select(0, perm).index_select(1, perm)
    h32.diagonal().copy_(diagonal + damp * diagonal.mean())
    return h32


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    h: torch.Tensor,
    spec: WeightSpec,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    name: str = "a linear",
) -> QuantizedWeight:
    """GPTQ (Frantar et al.): quantize columns one by one and push each error onto the columns left.

    act_order visits columns by decreasing Hessian diagonal; groups then take their scales from the
    original weights up front ("static groups") so the stored layout stays contiguous along K.
    Without act_order a group's scale is found from the already-updated weights when the sweep
    reaches its first column. Columns whose input is always zero (dead) are quantized as zero.
    `name` (the layer's weights) is named in the errors.
    """
    _check_finite(name, weight, h)
    w = weight.detach().float().clone()
    n, k = w.shape
    diagonal = torch.diagonal(h.detach()).to(torch.float64).clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w[:, dead] = 0.0
    gsize = spec.block_size(k)
    static = act_order or gsize >= k
    if static:
        scales, zeros = _group_params(w, spec, gsize)
    else:
        blocks = -(-k // gsize)
        scales = torch.zeros(n, blocks, device=w.device)
        zeros = torch.zeros(n, blocks, device=w.device)
    perm = torch.argsort(diagonal, descending=True) if act_order else torch.arange(k, device=w.device)
    hinv = _inverse_cholesky(_dampened(h, diagonal[perm], perm, damp), name, damp)
    # Columns as rows ([K, N], permuted): each step reads and writes contiguous memory, not a strided column
    wt = w[:, perm].T.contiguous()
    codes = torch.empty_like(wt)
    # the loop runs once per column: its views and pivots are taken up front or per block, not per column
    scale_rows = scales[:, perm // gsize].T.contiguous().unbind(0) if static else ()
    zero_rows = zeros[:, perm // gsize].T.contiguous().unbind(0) if static else ()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        rows, err = wt[i1:i2], torch.empty(i2 - i1, n, device=w.device)
        hinv1 = hinv[i1:i2, i1:i2]
        row, error, code, hinv_row = rows.unbind(0), err.unbind(0), codes[i1:i2].unbind(0), hinv1.unbind(0)
        pivots = hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                scale, zero = scale_rows[col], zero_rows[col]
            else:  # no act_order, so columns in order: a group's first column takes its scale from the updated weights
                g = col // gsize
                if col % gsize == 0:
                    scales[:, g], zeros[:, g] = find_params(wt[col:col + gsize].T, spec)
                scale, zero = scales[:, g], zeros[:, g]
            _sweep_column(row[i], scale, zero, spec.maxq, pivots[i], code[i], error[i])
            rows[i + 1:].addr_(hinv_row[i][i + 1:], error[i], alpha=-1)
        wt[i2:].sub_(hinv[i1:i2, i2:].T @ err)
    codes = codes.T[:, torch.argsort(perm)].to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, spec, gsize)
