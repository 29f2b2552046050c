"""Small programs that use every fxpress op directly, shared by the ONNX and TVM lowering tests."""

from __future__ import annotations

import torch

import fxpress.runtime  # noqa: F401  (defines the ops)
from fxpress.capture import capture
from fxpress.program import Program
from fxpress.runtime.hadamard import base_matrix, plan
from fxpress.runtime.moe_quant import GROUPED_LINEAR_NBIT  # noqa: F401  (defines fxpress::grouped_linear_nbit)
from fxpress.runtime.quant import pack_codes, pack_weight


def _packed(n: int, k: int, bits: int, block: int, generator: torch.Generator, zeros: bool = True):
    blocks = -(-k // block)
    qweight = pack_weight(torch.randint(0, 1 << bits, (n, k), generator=generator), bits, block)
    scales = torch.rand(n, blocks, generator=generator) * 0.05 + 0.01
    zp = pack_codes(torch.randint(0, 1 << bits, (n, blocks), generator=generator), bits) if zeros else None
    return qweight, scales, zp


class OpsModule(torch.nn.Module):
    """hadamard -> quantize_act (sym) -> linear_nbit -> quantize_act (asym) -> threshold_linear."""

    def __init__(self, k: int = 576, n: int = 96, block: int = 64, bits: int = 4, zeros: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        qweight, scales, zp = _packed(n, k, bits, block, g, zeros)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zp)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.register_buffer("base", base_matrix(plan(k)).float())
        self.register_buffer("conn", torch.randint(-1, 2, (32, n), generator=g).to(torch.int8))
        self.register_buffer("threshold", torch.randint(-3, 4, (32,), generator=g).float())
        self.bits, self.block, self.k = bits, block, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.ops.fxpress.hadamard(x, self.base)
        x = torch.ops.fxpress.quantize_act(x, 4, 0.9, True)
        y = torch.ops.fxpress.linear_nbit(x, self.qweight, self.scales, self.zero_points, self.bias, self.bits,
                                          self.block, self.k)
        y = torch.ops.fxpress.quantize_act(y, 8, 1.0, False)
        return torch.ops.fxpress.threshold_linear(y, self.conn, self.threshold, True)


class GroupedModule(torch.nn.Module):
    """fxpress::grouped_linear_nbit over rows sorted by expert, experts at different bit widths."""

    def __init__(self, k: int = 64, n: int = 48, block: int = 32, bits: tuple[int, ...] = (4, 2, 8, 3), seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.qweights, self.zeros, scales = [], [], []
        for e, b in enumerate(bits):
            qweight, sc, zp = _packed(n, k, b, block, g)
            self.register_buffer(f"qweight{e}", qweight)
            self.register_buffer(f"zero{e}", zp)
            scales.append(sc)
        self.register_buffer("scales", torch.stack(scales))
        self.register_buffer("offsets", torch.tensor([2, 2, 5, 7], dtype=torch.int32))  # expert 1 gets no rows
        self.bits, self.block, self.k, self.experts = list(bits), block, k, len(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweights = [getattr(self, f"qweight{e}") for e in range(self.experts)]
        zeros = [getattr(self, f"zero{e}") for e in range(self.experts)]
        return torch.ops.fxpress.grouped_linear_nbit(x, self.offsets, qweights, self.scales, zeros, self.bits,
                                                     self.block, self.k)


class TiesModule(torch.nn.Module):
    """fxpress::quantize_act on inputs full of rounding ties (multiples of 1/4): symmetric and asymmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxpress.quantize_act(x, 4, 1.0, True) + 10 * torch.ops.fxpress.quantize_act(x, 4, 1.0, False)


def ties_inputs(rows: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(rows, 64, generator=g) * torch.arange(1, rows + 1).unsqueeze(1) * 4) / 4


def ties_program() -> Program:
    return capture(TiesModule(), (ties_inputs(4),))


def ops_program(**kwargs) -> Program:
    module = OpsModule(**kwargs)
    return capture(module, (torch.randn(2, 3, module.k),))


def grouped_program(**kwargs) -> Program:
    module = GroupedModule(**kwargs)
    return capture(module, (torch.randn(8, module.k),))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
