"""`fxpress::embedding_nbit`: an embedding lookup from packed low-bit rows.

The table is stored exactly as a `fxpress::linear_nbit` weight (ONNX Runtime's `MatMulNBits` layout,
see `fxpress.runtime.quant`), with the vocabulary as the N axis and the embedding as the K axis:

- `qweight`: uint8 `(V, k_blocks, block_size * bits / 8)`,
- `scales`: float `(V, k_blocks)`,
- `zero_points`: optional uint8 `(V, ceil(k_blocks * bits / 8))` (absent: symmetric, `2^(bits-1)`),

and `out[..., :] = (code[id, :] - zero[id, :]) * scale[id, :]`. Sharing the layout is the point:
a tied embedding and LM head keep ONE packed tensor, read by this gather and by the head's
`linear_nbit`. The ONNX lowering maps the op to `com.microsoft::GatherBlockQuantized` (same bytes) or
to Gather + DequantizeLinear; the TVM lowering to a TensorIR kernel that unpacks the gathered rows.
"""

from __future__ import annotations

import torch

from fxpress.runtime.ops import define_op
from fxpress.runtime.quant import dequantize_weight


def _embedding_nbit(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block_size: int,
    embedding_dim: int,
) -> torch.Tensor:
    """Gather the packed rows first, then dequantize only those (never the whole table)."""
    flat = ids.reshape(-1).to(torch.int64)
    rows = dequantize_weight(
        qweight.index_select(0, flat),
        scales.index_select(0, flat),
        None if zero_points is None else zero_points.index_select(0, flat),
        bits,
        block_size,
        embedding_dim,
    )
    return rows.reshape(*ids.shape, embedding_dim)


def _embedding_nbit_fake(ids, qweight, scales, zero_points, bits, block_size, embedding_dim):
    return scales.new_empty((*ids.shape, embedding_dim))


EMBEDDING_NBIT = define_op(
    "embedding_nbit",
    "(Tensor ids, Tensor qweight, Tensor scales, Tensor? zero_points, int bits, int block_size, "
    "int embedding_dim) -> Tensor",
    _embedding_nbit,
    _embedding_nbit_fake,
    "Embedding lookup from a table packed as fxpress::linear_nbit (MatMulNBits layout, vocabulary = N): "
    "out[..., k] = (code[id, k] - zero[id, k // block]) * scale[id, k // block], in the scales' dtype. " + (__doc__ or ""),
)
