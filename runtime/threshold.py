"""`fxpress::threshold_linear`: a layer of multiplication-free threshold neurons on integer inputs.

fxpress's threshold neuron (after "Threshold Neuron", arXiv 2412.13902, whose exact equation is not
public) replaces the weighted sum by the difference of two plain sums and a learned threshold:

    out[..., j] = sum_{i in E_j} x[..., i]  -  sum_{i in I_j} x[..., i]  -  threshold[j]
    out[..., j] = max(0, out[..., j])          when relu is true

Arguments, exactly:

- `x`: float tensor `(..., in_features)` whose values are integers (fixed-point codes: the pass
  quantizes the layer input to `round(x / input_scale)` clamped to its bit width before this op).
- `conn`: int8 `(out_features, in_features)`, entries in {-1, 0, +1}: `conn[j, i] = +1` puts input i in
  the excitatory set E_j, `-1` in the inhibitory set I_j, `0` leaves it unconnected.
- `threshold`: float `(out_features,)` holding integers (theta_j, in input code units).
- `relu`: true for a hidden layer (the neuron's rectification), false for a layer whose raw
  difference is read by the next layer.

The result is a float tensor `(..., out_features)` of integers, in the dtype of `x`. Every partial
sum is an integer below 2^24 in magnitude (the pass checks the bound), so float32 is exact in any
summation order and the reference kernel below (a matmul with the {-1,0,1} matrix) equals the
adder-tree hardware bit for bit. Lowerings: ONNX `MatMul(x, Cast(conn)^T) - threshold` then `Relu`;
TVM the same with `relax.op.matmul`. The reference kernel multiplies by +-1 only because that is the
fastest way to add on a CPU; the FPGA lowering emits adders and a comparator, no multipliers.
"""

from __future__ import annotations

import torch

from fxpress.runtime.ops import define_op

FLOAT32_EXACT = 2**24  # integers of smaller magnitude are exact in float32


def _threshold_linear(x: torch.Tensor, conn: torch.Tensor, threshold: torch.Tensor, relu: bool) -> torch.Tensor:
    """out = x @ conn^T - threshold (then max(0, .)): the sum over E minus the sum over I minus theta."""
    out = torch.matmul(x, conn.to(x.dtype).t()) - threshold.to(x.dtype)
    return torch.clamp_min(out, 0) if relu else out


def _threshold_linear_fake(x: torch.Tensor, conn: torch.Tensor, threshold: torch.Tensor, relu: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], conn.shape[0]))


THRESHOLD_LINEAR = define_op(
    "threshold_linear",
    "(Tensor x, Tensor conn, Tensor threshold, bool relu) -> Tensor",
    _threshold_linear,
    _threshold_linear_fake,
    "Multiplication-free threshold neurons: out_j = sum_{conn[j,i]=+1} x_i - sum_{conn[j,i]=-1} x_i - threshold_j, "
    "then max(0, out_j) when relu. x holds integer codes (float dtype), conn is int8 in {-1,0,1} of shape "
    "(out, in), threshold is float (out,) of integers; output is float of integers, exact below 2^24.",
)


def threshold_linear(x: torch.Tensor, conn: torch.Tensor, threshold: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Call the op (what graphs contain) from Python."""
    return torch.ops.fxpress.threshold_linear(x, conn, threshold, relu)


def output_bounds(conn: torch.Tensor, threshold: torch.Tensor, lo: float, hi: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron [min, max] of the output when every input lies in [lo, hi] (interval arithmetic, int64)."""
    c = conn.to(torch.int64)
    exc = (c == 1).sum(1)
    inh = (c == -1).sum(1)
    th = threshold.to(torch.int64)
    low = exc * int(lo) - inh * int(hi) - th
    high = exc * int(hi) - inh * int(lo) - th
    if relu:
        low, high = low.clamp_min(0), high.clamp_min(0)
    return low, high
