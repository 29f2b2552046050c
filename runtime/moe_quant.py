"""`fxpress::grouped_linear_nbit`: the grouped (MoE) matmul with per-expert bit widths and packed weights.

It replaces transformers 5's `grouped_mm(x, W[E].T, offsets)` over fused 3-D experts. Rows of `x` are
sorted by expert; expert `e` owns rows `[offsets[e-1], offsets[e])` (`offsets[-1]` = 0), as in
`grouped_mm`. Rows past `offsets[E-1]` get zeros. Each expert's weight is stored in the packed layout
of `fxpress::linear_nbit` (ONNX Runtime's `MatMulNBits`, see `fxpress.runtime.quant`) at its own bit
width `bits[e]`:

- `qweights[e]`: uint8 `(N, k_blocks, block_size * bits[e] / 8)`
- `scales`: float `(E, N, k_blocks)` (one tensor: every expert has the same block grid)
- `zero_points[e]`: uint8 `(N, ceil(k_blocks * bits[e] / 8))`

so expert `e` is exactly `linear_nbit(x_e, qweights[e], scales[e], zero_points[e], None, bits[e],
block_size, in_features)`, and a lowering emits one `MatMulNBits` per expert (or per bit-width group).
"""

from __future__ import annotations

import torch

from fxpress.runtime.ops import define_op
from fxpress.runtime.quant import dequantize_weight


def _grouped_linear_nbit(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qweights: list[torch.Tensor],
    scales: torch.Tensor,
    zero_points: list[torch.Tensor],
    bits: list[int],
    block_size: int,
    in_features: int,
) -> torch.Tensor:
    out = x.new_zeros((x.shape[0], scales.shape[1]))
    ends = offsets.to(torch.int64).tolist()
    start = 0
    for e, end in enumerate(ends):
        end = min(int(end), x.shape[0])
        if end > start:
            weight = dequantize_weight(qweights[e], scales[e], zero_points[e], bits[e], block_size, in_features)
            out[start:end] = x[start:end] @ weight.to(x.dtype).T
        start = max(start, end)
    return out


def _grouped_linear_nbit_fake(x, offsets, qweights, scales, zero_points, bits, block_size, in_features):
    return x.new_empty((x.shape[0], scales.shape[1]))


GROUPED_LINEAR_NBIT = define_op(
    "grouped_linear_nbit",
    "(Tensor x, Tensor offsets, Tensor[] qweights, Tensor scales, Tensor[] zero_points, int[] bits, "
    "int block_size, int in_features) -> Tensor",
    _grouped_linear_nbit,
    _grouped_linear_nbit_fake,
    "Grouped MoE matmul over rows sorted by expert with per-expert bit widths: rows [offsets[e-1], "
    "offsets[e]) get x @ dequant(qweights[e]).T, each expert packed as fxpress::linear_nbit (MatMulNBits "
    "layout) at bits[e]; scales (E, N, k_blocks) shared grid. " + (__doc__ or ""),
)
