"""fxpress::linear_nbit and fxpress::quantize_act: packing, reference kernels, error bounds, GPTQ vs RTN."""

from __future__ import annotations

import pytest
import torch

import fxpress.runtime  # noqa: F401  (registers the ops)
from fxpress.passes.quantize.gptq import (
    QuantizedWeight,
    WeightSpec,
    find_params,
    gptq,
    gram,
    hessian,
    layer_loss,
    rtn,
)
from fxpress.runtime.quant import dequantize_weight, pack_codes, pack_weight, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 5, 8, 13, 64, 576])
def test_packing_round_trips_exactly(bits, length):
    codes = torch.randint(0, 1 << bits, (3, length), generator=torch.Generator().manual_seed(bits * 1000 + length))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, -(-length * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, length), codes)


def test_packing_matches_matmulnbits_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack_codes(codes, 8).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.mark.parametrize("bits,k,block", [(4, 576, 128), (4, 576, 32), (2, 64, 16), (8, 100, 64), (3, 80, 32), (6, 576, 576)])
def test_pack_weight_has_matmulnbits_shape(bits, k, block):
    codes = torch.randint(0, 1 << bits, (7, k))
    packed = pack_weight(codes, bits, block)
    blocks = -(-k // block)
    assert packed.shape == (7, blocks, block * bits // 8)
    flat = unpack_codes(packed, bits, block).reshape(7, blocks * block)
    assert torch.equal(flat[:, :k], codes)
    assert int(flat[:, k:].abs().sum()) == 0  # the partial last block is padded with code 0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, -1), (2, 32), (8, 64), (6, 128), (3, 32)])
def test_linear_nbit_equals_dequantized_matmul(bits, group, symmetric):
    gen = torch.Generator().manual_seed(bits + group)
    weight = torch.randn(48, 576, generator=gen) * 0.05
    bias = torch.randn(48, generator=gen)
    x = torch.randn(2, 5, 576, generator=gen)
    qw = rtn(weight, WeightSpec(bits, group, symmetric))
    qweight, scales, zeros = qw.packed()
    assert (zeros is None) == symmetric
    deq = dequantize_weight(qweight, scales, zeros, bits, qw.block_size, 576)
    assert torch.equal(deq, qw.dequantize())
    y = torch.ops.fxpress.linear_nbit(x, qweight, scales, zeros, bias, bits, qw.block_size, 576)
    torch.testing.assert_close(y, x @ qw.dequantize().T + bias, rtol=1e-5, atol=1e-5)
    y0 = torch.ops.fxpress.linear_nbit(x, qweight, scales, zeros, None, bits, qw.block_size, 576)
    torch.testing.assert_close(y0 + bias, y, rtol=1e-5, atol=1e-5)


def test_rtn_error_shrinks_with_bits_and_groups():
    weight = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    err = {}
    for bits in (2, 4, 8):
        for group in (32, 128, -1):
            qw = rtn(weight, WeightSpec(bits, group, False, clip_search=False))
            err[bits, group] = float((qw.dequantize() - weight).norm() / weight.norm())
    assert err[8, 128] < 0.01 < err[4, 128] < err[2, 128]
    assert err[4, 32] < err[4, 128] < err[4, -1]


def test_clipping_search_never_increases_error():
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    w[:, 0] *= 10  # outliers make clipping worthwhile
    for symmetric in (False, True):
        errs = []
        for search in (False, True):
            spec = WeightSpec(3, 64, symmetric, clip_search=search)
            scale, zero = find_params(w, spec)
            q = (torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, spec.maxq) - zero[:, None]) * scale[:, None]
            errs.append((q - w).square().sum(1))
        assert bool((errs[1] <= errs[0] + 1e-6).all()) and float(errs[1].sum()) < float(errs[0].sum())


def test_zero_rows_get_finite_scales():
    qw = rtn(torch.zeros(4, 64), WeightSpec(4, 32, False))
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    assert torch.equal(qw.dequantize(), torch.zeros(4, 64))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_act_per_token_error_bound(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 7, 96, generator=gen) * torch.rand(3, 7, 1, generator=gen) * 10
    x[0, 0] = 0.0  # an all-zero token passes through
    y = torch.ops.fxpress.quantize_act(x, bits, 1.0, symmetric)
    assert y.shape == x.shape and torch.equal(y[0, 0], x[0, 0])
    if symmetric:
        step = x.abs().amax(-1, keepdim=True) / ((1 << (bits - 1)) - 1)
    else:
        step = (x.amax(-1, keepdim=True).clamp_min(0) - x.amin(-1, keepdim=True).clamp_max(0)) / ((1 << bits) - 1)
    assert bool(((y - x).abs() <= step / 2 + 1e-5).all())  # every token within half its own step
    levels = max(len(torch.unique(y[i, j])) for i in range(3) for j in range(7))
    assert levels <= 1 << bits


def test_quantize_act_clip_ratio_clips_the_extremes():
    x = torch.linspace(-4, 4, 64).reshape(1, 64)
    y = torch.ops.fxpress.quantize_act(x, 4, 0.5, True)
    step = 0.5 * 4 / 7
    assert float(y.max()) <= 2.0 + 1e-6 and float(y.min()) >= -2.0 - step - 1e-6  # codes -8..7
    torch.testing.assert_close(y[:, 24:40], x[:, 24:40], atol=step / 2 + 1e-6, rtol=0)


def test_ops_have_fake_kernels_for_reexport():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 64)
        y = torch.ops.fxpress.linear_nbit(x, torch.empty(10, 2, 16, dtype=torch.uint8), torch.empty(10, 2),
                                          None, None, 4, 32, 64)
        z = torch.ops.fxpress.quantize_act(x, 4, 1.0, True)
    assert tuple(y.shape) == (2, 3, 10) and tuple(z.shape) == (2, 3, 64)


def _correlated_inputs(k: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.eye(k)
    x = torch.randn(n, k, generator=gen) @ mix
    x[:, :4] *= 8  # a few outlier channels, as in real activations
    return x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [64, -1])
def test_gptq_error_below_rtn_on_a_layer(act_order, group):
    x = _correlated_inputs(192, 1024, 3)
    weight = torch.randn(96, 192, generator=torch.Generator().manual_seed(4)) * 0.05
    h, n = hessian(x)
    assert n == 1024
    spec = WeightSpec(4, group, False)
    r = rtn(weight, spec)
    g = gptq(weight, h, spec, act_order=act_order)
    assert isinstance(g, QuantizedWeight) and g.codes.shape == weight.shape and int(g.codes.max()) <= 15
    out_rtn = float((x @ (r.dequantize() - weight).T).square().mean())
    out_gptq = float((x @ (g.dequantize() - weight).T).square().mean())
    assert layer_loss(weight, g.dequantize(), h) < 0.7 * layer_loss(weight, r.dequantize(), h)
    assert out_gptq < 0.7 * out_rtn
    qweight, scales, zeros = g.packed()
    torch.testing.assert_close(dequantize_weight(qweight, scales, zeros, 4, g.block_size, 192), g.dequantize())


@pytest.mark.parametrize("width,bands", [(48, 4), (600, 4), (600, 3), (1030, 5)])
def test_gram_is_the_exact_symmetric_product(width, bands):
    """Only the bands on and above the diagonal are multiplied (from GRAM_MIN_WIDTH up): the mirror makes it exactly
    symmetric, and it equals X^T X to float32 rounding, uneven bands included."""
    x = _correlated_inputs(width, 300, 7)
    product = gram(x, bands)
    assert torch.equal(product, product.T)
    exact = x.double().T @ x.double()
    assert float((product.double() - exact).abs().max() / exact.abs().max()) < 1e-6


def test_gptq_handles_dead_inputs():
    x = _correlated_inputs(64, 256, 5)
    x[:, 10] = 0.0
    weight = torch.randn(16, 64)
    g = gptq(weight, hessian(x)[0], WeightSpec(4, 32, True))
    assert torch.isfinite(g.scales).all()
    assert torch.all(g.dequantize()[:, 10] == 0)
