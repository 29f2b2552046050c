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


def test_gradient_flows_through_the_op_as_its_transpose():
    """Backward is the transform by Q^T (a non-symmetric orthogonal base too): gradcheck in float64."""
    base = H.random_orthogonal(12, torch.Generator().manual_seed(0))
    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.fxpress.hadamard(t, base), (x,))
    dense = H.hadamard_transform(torch.eye(48, dtype=torch.float64), base)
    grad = torch.randn(3, 48, dtype=torch.float64)
    (torch.ops.fxpress.hadamard(x, base) * grad).sum().backward()
    torch.testing.assert_close(x.grad, grad @ dense.T)


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


# ----------------------------------------------------------------------------------------------
# the fast paths: generated kernel (PyTorch and TVM), PyTorch fallback, ONNX function
# ----------------------------------------------------------------------------------------------

FAST_SIZES = [576, 1536, 4096, 14336, 96, 12]  # 36*16, 12*128, 2^12, 28*512, 12*8 (V > M), 12*1


def _reference(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The radix-2 butterfly per segment, then the base: independent of every fast path."""
    rows, n = x.shape
    k = base.shape[0]
    seg = HK.fwht_radix2(x.double().reshape(rows, k, n // k)) / math.sqrt(n // k)
    return torch.einsum("rkm,kl->rlm", seg, base.double()).reshape(rows, n)


@pytest.mark.parametrize("n", FAST_SIZES)
def test_generated_kernel_equals_the_butterfly_in_float32_and_float64(n):
    pytest.importorskip("tvm")
    p = H.plan(n)
    base = H.base_matrix(p)
    x = torch.randn(3, n, dtype=torch.float64)
    want = _reference(x, base)
    y64 = HK.run_kernel(x, base, p.m)
    y32 = HK.run_kernel(x.float(), base.float(), p.m)
    assert y64 is not None and y32 is not None  # the kernel ran, not the fallback
    assert (y64 - want).abs().max() < 1e-12
    assert (y32.double() - want).abs().max() < 1e-5
    assert (H.hadamard_transform(x.float(), base.float()) - y32).abs().max() == 0  # the float32 op runs the kernel
    assert (H.hadamard_transform(x, base) - want).abs().max() < 1e-12  # float64 (offline) runs the GEMM path


@pytest.mark.parametrize("n", FAST_SIZES)
def test_pytorch_fallback_equals_the_butterfly(n):
    p = H.plan(n)
    base = H.base_matrix(p)
    x = torch.randn(4, n, dtype=torch.float64)
    assert (HK.factored(x, base, p.m) - _reference(x, base)).abs().max() < 1e-12


def test_kernel_takes_unaligned_strided_and_empty_inputs():
    pytest.importorskip("tvm")
    base = H.base_matrix(H.plan(1536)).float()
    big = torch.randn(5 * 1536 + 3)
    x = big[3:].view(5, 1536)  # 12 bytes past an aligned address
    assert x.data_ptr() % 64
    assert torch.allclose(torch.ops.fxpress.hadamard(x, base), _reference(x, base).float(), atol=1e-5)
    strided = torch.randn(1536, 4).t()  # not contiguous
    assert torch.allclose(torch.ops.fxpress.hadamard(strided, base), _reference(strided, base).float(), atol=1e-5)
    assert torch.ops.fxpress.hadamard(torch.empty(0, 1536), base).shape == (0, 1536)


@pytest.mark.parametrize("n", [576, 4096, 14336])
def test_onnx_function_matches_the_op_in_onnx_runtime(n):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    import onnx.helper as oh
    from onnx import numpy_helper

    from fxpress.lowering.onnx.builder import DOMAIN
    from fxpress.lowering.onnx.ops.hadamard import _hadamard_function

    p = H.plan(n)
    base = H.base_matrix(p).float()
    fn = _hadamard_function(p.k, p.m, onnx.TensorProto.FLOAT, 18)
    graph = oh.make_graph([oh.make_node(fn.name, ["x", "base"], ["y"], domain=DOMAIN)], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(base.numpy(), "base")])
    model = oh.make_model(graph, functions=[fn], opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, n)
    (y,) = session.run(None, {"x": x.numpy()})
    assert y.shape == (2, 3, n)
    assert abs(y - _reference(x.reshape(6, n), base).reshape(2, 3, n).numpy()).max() < 1e-5
    assert {node.op_type for node in fn.node} <= {"Shape", "Constant", "Reshape", "MatMul", "Mul", "Cast", "Transpose"}
