"""TVM's hand-written TensorIR kernels on their own: row-dot (float and packed linears), grouped attention and the
concat copies.

Each kernel is built for the portable target ('llvm', no AVX) and for the host, and compared against PyTorch
on shapes the decoder does not use (rows > 1, output channels not a multiple of the tile, 1/2/8-bit codes).
"""

from __future__ import annotations

import json

import pytest
import torch

tvm = pytest.importorskip("tvm")

from _lowering_cases import _packed, ops_program, relative_error  # noqa: E402

import fxpress.runtime  # noqa: E402, F401  (defines the ops)
from fxpress.lowering.tvm import export_tvm  # noqa: E402
from fxpress.lowering.tvm.attention import attention_kernel, rewrite_attention  # noqa: E402
from fxpress.lowering.tvm.build import host_target  # noqa: E402
from fxpress.lowering.tvm.concat import concat_kernel  # noqa: E402
from fxpress.lowering.tvm.row_dot import dense_kernel, packed_fast_path, packed_kernel  # noqa: E402
from fxpress.runtime.runners import TvmRunner  # noqa: E402

TARGETS = ["llvm", "host"]


def _build(prim_func, target: str):
    config = host_target() if target == "host" else {"kind": "llvm"}
    module = tvm.IRModule({"kernel": prim_func.with_attr("global_symbol", "kernel")})
    return tvm.compile(module, target=tvm.target.Target(config))["kernel"]


def _call(fn, inputs: list[torch.Tensor], out_shape: tuple, dtype=torch.float32) -> torch.Tensor:
    out = tvm.runtime.tensor(torch.zeros(out_shape, dtype=dtype).numpy())
    fn(*[tvm.runtime.tensor(t.contiguous().numpy()) for t in inputs], out)
    return torch.from_numpy(out.numpy())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_kernel_matches_torch_linear(target, dtype):
    g = torch.Generator().manual_seed(0)
    n, k = 70, 96  # 70 output channels: a tile of 2, not 4
    x, w = torch.randn(5, k, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)
    fn = _build(dense_kernel(n, k, str(dtype).removeprefix("torch.")), target)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    assert relative_error(_call(fn, [x, w], (5, n), dtype), x @ w.T) < tolerance


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("bits", "block"), [(4, 32), (2, 64), (8, 16), (1, 64), (4, 576)])
def test_packed_kernel_matches_linear_nbit(target, bits, block):
    g = torch.Generator().manual_seed(bits)
    n, k = 38, 576
    assert packed_fast_path(k, block, bits)
    qweight, scales, zp = _packed(n, k, bits, block, g)
    x = torch.randn(3, k, generator=g)
    expected = torch.ops.fxpress.linear_nbit(x, qweight, scales, zp, None, bits, block, k)
    zeros = zp.reshape(n, 1, -1)
    fn = _build(packed_kernel(n, k, k // block, block, bits, zeros.shape[-1]), target)
    assert relative_error(_call(fn, [x, qweight, scales, zeros], (3, n)), expected) < 1e-6


def test_packed_fast_path_leaves_straddling_codes_and_partial_blocks_to_the_scalar_kernel():
    assert not packed_fast_path(576, 32, 3)
    assert not packed_fast_path(80, 32, 4)
    assert packed_fast_path(96, 32, 4)


@pytest.mark.parametrize("target", TARGETS)
def test_concat_kernel_concatenates_and_stacks_like_torch(target):
    g = torch.Generator().manual_seed(0)
    past, new = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    cat = _build(concat_kernel(2, 4, 2, False, "float32"), target)
    assert torch.equal(_call(cat, [past, new], (2, 3, 6, 8)), torch.cat([past, new], 2))
    layers = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    for axis in (0, 1, 3):
        stacked = torch.stack(layers, axis)
        stack = _build(concat_kernel(3, 3, axis, True, "float32"), target)
        assert torch.equal(_call(stack, layers, tuple(stacked.shape)), stacked)


@pytest.mark.parametrize("target", TARGETS)
def test_concat_kernel_reads_a_picked_entry_of_a_stacked_input_in_place(target):
    g = torch.Generator().manual_seed(1)
    cache, new = torch.randn(4, 2, 3, 5, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    cat = _build(concat_kernel(2, 4, 2, False, "float32", (2, None)), target)
    assert torch.equal(_call(cat, [cache, new], (2, 3, 6, 8)), torch.cat([cache[2], new], 2))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "queries", "mask_heads"),
                         [(2, 6, 2, 3, 1), (1, 4, 4, 1, 4), (2, 3, 1, 5, 1)])
def test_attention_kernel_matches_sdpa_over_repeated_kv_heads(target, batch, heads, kv_heads, queries, mask_heads):
    g = torch.Generator().manual_seed(heads)
    d, dv, keys = 32, 16, 7
    q = torch.randn(batch, heads, queries, d, generator=g)
    k, v = torch.randn(batch, kv_heads, keys, d, generator=g), torch.randn(batch, kv_heads, keys, dv, generator=g)
    allowed = torch.rand(batch, mask_heads, queries, keys, generator=g) > 0.3
    allowed[..., 0] = True  # every query sees a key
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    group = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=0.3)
    fn = _build(attention_kernel(heads, kv_heads, d, dv, 0.3, "float32"), target)
    assert relative_error(_call(fn, [q, k, v, mask], (batch, heads, queries, dv)), expected) < 1e-6


def test_attention_rewrite_reads_the_kv_heads_before_repeat_kv_and_keeps_the_values():
    """transformers' repeat_kv (unsqueeze -> expand -> reshape) before SDPA is replaced; the graph computes the same."""
    from torch.export import Dim, export

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, allowed):
            b, kv_heads, t, d = k.shape
            wide = [x[:, :, None].expand(b, kv_heads, 3, t, d).reshape(b, kv_heads * 3, t, d) for x in (k, v)]
            return torch.nn.functional.scaled_dot_product_attention(q, *wide, attn_mask=allowed, scale=0.25)

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 6, 4, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g),
              torch.randn(1, 2, 9, 16, generator=g), torch.rand(1, 1, 4, 9, generator=g) > 0.2)
    inputs[3][..., 0] = True
    seq, total = Dim("seq", max=64), Dim("total", max=64)
    dims = ({2: seq}, {2: total}, {2: total}, {2: seq, 3: total})
    gm = export(Attend(), inputs, dynamic_shapes=dims).module()
    expected = gm(*inputs)
    assert rewrite_attention(gm) == 1
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "fxpress_tvm.grouped_attention.default" in ops
    assert not {"aten.expand.default", "aten.scaled_dot_product_attention.default"} & ops
    assert relative_error(gm(*inputs), expected) < 1e-6


def test_export_targets_the_host_by_default_and_llvm_stays_portable(tmp_path):
    program = ops_program(k=64, n=32, block=16)
    x = torch.randn(4, 3, 64)
    for name, target in (("host", "host"), ("portable", "llvm")):
        export_tvm(program, tmp_path / name, **({} if target == "host" else {"target": target}))
        recorded = json.loads((tmp_path / name / "fxpress.json").read_text())["target"]
        assert ("mcpu" in recorded) == (target == "host")
        assert relative_error(TvmRunner(tmp_path / name)(x), program(x)) < 1e-5


def test_an_artifact_built_for_instructions_this_cpu_lacks_is_refused_before_loading(tmp_path):
    from fxpress.errors import ArtifactError

    path = tmp_path / "ops"
    export_tvm(ops_program(k=64, n=32, block=16), path)
    manifest = json.loads((path / "fxpress.json").read_text())
    host = tvm.target.codegen.llvm_get_system_cpu()
    foreign = "znver5" if host != "znver5" else "emeraldrapids"  # each has instructions the other lacks
    manifest["target"] = str(tvm.target.Target({"kind": "llvm", "mcpu": foreign}))
    (path / "fxpress.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"built for CPU '{foreign}'"):
        TvmRunner(path)
