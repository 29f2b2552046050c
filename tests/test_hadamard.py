"""fxpress::hadamard: constructions of every listed order, the butterfly against dense matrices, fallbacks, export."""

from __future__ import annotations

import math

import pytest
import torch

from fxpress.errors import ConfigError
from fxpress.runtime import hadamard as H
from fxpress.runtime import hadamard_kernel as HK

BUILT = list(H.KNOWN_ORDERS)


@pytest.mark.parametrize("k", BUILT)
def test_every_listed_order_is_a_hadamard_matrix(k):
    h = H.hadamard_order_matrix(k)
    assert h is not None and h.shape == (k, k)
    assert set(h.flatten().tolist()) <= {-1, 1}
    assert (h @ h.T == k * torch.eye(k, dtype=torch.int64).numpy()).all()


def test_constructions_cover_paley_over_prime_and_square_fields():
    assert H.construction(12) == "paley1(q=11)"
    assert H.construction(36) == "paley2(q=17)"
    assert H.construction(52) == "paley2(q=25)"  # GF(5^2)
    assert H.construction(100) == "paley2(q=49)"  # GF(7^2)
    assert H.construction(40).startswith("sylvester(")


def test_uncovered_orders_use_the_reported_fallback():
    for n in (92, 184):  # 92 = 4*23: no construction is built for it
        p = H.plan(n)
        assert p.fallback == "orthogonal" and not p.is_hadamard
        assert "fallback" in p.describe()
        base = H.base_matrix(p)
        assert torch.allclose(base @ base.T, torch.eye(p.k, dtype=torch.float64), atol=1e-12)
    block = H.plan(92, fallback="block")
    base = H.base_matrix(block)
    assert torch.allclose(base @ base.T, torch.eye(block.k, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ConfigError, match="fallback"):
        H.plan(92, fallback="error")


@pytest.mark.parametrize("n,k", [(576, 36), (1536, 12), (4096, 1), (14336, 28), (18944, 148), (29568, 924), (10944, 684)])
def test_plans_pick_the_smallest_known_order(n, k):
    p = H.plan(n)
    assert (p.k, p.k * p.m, p.fallback) == (k, n, None)


@pytest.mark.parametrize("n", [12, 64, 96, 576, 1536])
def test_butterfly_equals_the_dense_normalised_matrix(n):
    p = H.plan(n)
    base = H.base_matrix(p)
    dense = torch.kron(base, _sylvester(p.m) / math.sqrt(p.m))
    x = torch.randn(3, 5, n, dtype=torch.float64)
    y = H.hadamard_transform(x, base)
    assert torch.allclose(y, x @ dense, atol=1e-10)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(dense.abs(), torch.full_like(dense, 1 / math.sqrt(n)), atol=1e-12)  # a true Hadamard


def _sylvester(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_radix16_butterfly_matches_radix2():
    x = torch.randn(4, 2048, dtype=torch.float64)
    assert torch.allclose(HK.fwht(x), HK.fwht_radix2(x), atol=1e-9)
    assert torch.allclose(HK.fwht(x), x @ _sylvester(2048), atol=1e-9)


def test_op_runs_in_half_precision_and_rejects_bad_sizes():
    base = H.base_matrix(H.plan(96)).float()
    x = torch.randn(2, 96)
    y = torch.ops.fxpress.hadamard(x.half(), base)
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), torch.ops.fxpress.hadamard(x, base), atol=2e-2)
    with pytest.raises(ValueError, match="not 12"):
        H.hadamard_transform(torch.randn(2, 100), base)
    with pytest.raises(ConfigError):
        H.plan(0)


def test_op_exports_again_with_a_dynamic_batch():
    base = H.base_matrix(H.plan(576)).float()

    class Rot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("base", base)

        def forward(self, x):
            return torch.ops.fxpress.hadamard(x, self.base) * 2

    x = torch.randn(3, 7, 576)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(Rot(), (x,), dynamic_shapes=({0: batch},))
    assert any("fxpress.hadamard" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(5, 7, 576)
    assert torch.allclose(ep.module()(x2), 2 * H.hadamard_transform(x2, base), atol=1e-6)


def test_rotations_are_orthogonal_and_seeded():
    r = H.random_hadamard_rotation(576, seed=3)
    q = r.dense()
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=torch.float64), atol=1e-10)
    x = torch.randn(4, 576, dtype=torch.float64)
    assert torch.allclose(r.apply(x), x @ q, atol=1e-10)
    assert torch.equal(q, H.random_hadamard_rotation(576, seed=3).dense())
    assert not torch.equal(q, H.random_hadamard_rotation(576, seed=4).dense())
    o = H.random_orthogonal_rotation(64, seed=1).dense()
    assert torch.allclose(o @ o.T, torch.eye(64, dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# orders 156 and 172 from the searched circulants (runtime/hadamard_data.py, tools/find_williamson.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,how", [(156, "goethals-seidel(n=39)"), (172, "williamson(n=43)")])
def test_orders_156_and_172_are_exact_hadamard_matrices(k, how):
    h = H.hadamard_order_matrix(k)
    assert h is not None and h.shape == (k, k)
    assert set(h.flatten().tolist()) == {-1, 1}
    assert (h @ h.T == k * torch.eye(k, dtype=torch.int64).numpy()).all()
    assert H.construction(k) == how
    assert H.plan(k).fallback is None


@pytest.mark.parametrize("n,k", [(156 * 2, 156), (172 * 64, 172)])
def test_op_at_searched_orders_equals_the_dense_hadamard(n, k):
    p = H.plan(n)
    assert (p.k, p.m, p.fallback) == (k, n // k, None)
    base = H.base_matrix(p)
    dense = torch.kron(torch.from_numpy(H.hadamard_order_matrix(k)).to(torch.float64), _sylvester(p.m)) / math.sqrt(n)
    assert torch.equal(dense.abs(), torch.full_like(dense, 1 / math.sqrt(n)))
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(torch.ops.fxpress.hadamard(x, base), x @ dense, atol=1e-10)
