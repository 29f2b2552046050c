"""fxpress::embedding_nbit: packed embedding tables, shared with a tied LM head, in PyTorch, ONNX Runtime and TVM."""

from __future__ import annotations

import copy

import pytest
import torch

from fxpress.capture import capture
from fxpress.errors import ConfigError, PassError
from fxpress.passes import Quantize
from fxpress.passes.manager import run_passes
from fxpress.passes.quantize import TableQuant, WeightQuant
from fxpress.runtime.embedding import EMBEDDING_NBIT  # noqa: F401  (defines fxpress::embedding_nbit)
from fxpress.runtime.quant import dequantize_weight, pack_codes, pack_weight
from fxpress.runtime.runners import TorchRunner
from fxpress.zoo import tiny_causal_lm

CASES = {  # (vocab, dim, bits, block, zero points)
    "w4g128_partial": (100, 576, 4, 128, True),  # 576 = 4.5 blocks: re-blocked to 64 for GatherBlockQuantized
    "w8g64_sym": (100, 576, 8, 64, False),
    "w2g32_partial": (50, 80, 2, 32, True),
    "w3g32": (50, 64, 3, 32, True),  # no GatherBlockQuantized kernel: Gather + DequantizeLinear
}


class TiedTable(torch.nn.Module):
    """One packed table read by the gather and by the LM-head-like linear_nbit (a tied embedding)."""

    def __init__(self, vocab: int, dim: int, bits: int, block: int, zeros: bool, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        blocks = -(-dim // block)
        self.register_buffer("qweight", pack_weight(torch.randint(0, 1 << bits, (vocab, dim), generator=g), bits, block))
        self.register_buffer("scales", torch.rand(vocab, blocks, generator=g) * 0.05 + 0.01)
        zp = pack_codes(torch.randint(0, 1 << bits, (vocab, blocks), generator=g), bits) if zeros else None
        self.register_buffer("zero_points", zp)
        self.vocab, self.dim, self.bits, self.block = vocab, dim, bits, block

    def table(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.zero_points, self.bits, self.block, self.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.ops.fxpress.embedding_nbit(ids, self.qweight, self.scales, self.zero_points, self.bits, self.block,
                                             self.dim)
        return torch.ops.fxpress.linear_nbit(torch.tanh(h), self.qweight, self.scales, self.zero_points, None,
                                             self.bits, self.block, self.dim)


def _tied(name: str):
    module = TiedTable(*CASES[name])
    ids = torch.randint(0, module.vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    return module, capture(module, (ids,))


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", list(CASES))
def test_gather_equals_rows_of_the_dequantized_table(name):
    module, _ = _tied(name)
    ids = torch.randint(0, module.vocab, (3, 7, 2))
    rows = torch.ops.fxpress.embedding_nbit(ids, module.qweight, module.scales, module.zero_points, module.bits,
                                            module.block, module.dim)
    assert rows.shape == (3, 7, 2, module.dim) and rows.dtype == module.scales.dtype
    assert torch.equal(rows, module.table()[ids])


@pytest.mark.parametrize("weights", ["matmulnbits", "dequantizelinear"])
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_gathers_and_the_tied_head_share_one_table(tmp_path, name, weights):
    pytest.importorskip("onnxruntime")
    import onnx

    from fxpress.lowering.onnx import export_onnx
    from fxpress.runtime.runners import OnnxRunner

    module, program = _tied(name)
    stats = export_onnx(program, tmp_path / "t.onnx", weights=weights)
    model = onnx.load(tmp_path / "t.onnx")
    kinds = {n.op_type for n in model.graph.node}
    native = weights == "matmulnbits" and module.bits != 3
    assert ("GatherBlockQuantized" in kinds) == native and stats["gatherblockquantized"] == int(native)
    codes = [i for i in model.graph.initializer if ".qweight" in i.name]
    assert len(codes) == 1  # the table is stored once, read by the gather and the matmul
    runner = OnnxRunner(tmp_path / "t.onnx")
    ids = torch.randint(0, module.vocab, (3, 5), generator=torch.Generator().manual_seed(2))
    assert _rel(runner(ids), program(ids)) < 1e-5


@pytest.mark.parametrize("name", ["w4g128_partial", "w3g32"])
def test_tvm_gather_matches_pytorch(tmp_path, name):
    pytest.importorskip("tvm")
    from fxpress.lowering.tvm import export_tvm
    from fxpress.runtime.runners import TvmRunner

    module, program = _tied(name)
    stats = export_tvm(program, tmp_path / "t")
    assert stats["weight_bytes"] < module.vocab * module.dim * 4 / 3  # packed bytes only, stored once
    ids = torch.randint(0, module.vocab, (3, 5), generator=torch.Generator().manual_seed(2))
    assert _rel(TvmRunner(tmp_path / "t")(ids), program(ids)) < 1e-5


# --- the quantize pass on a tiny Llama with tied embeddings ---


@pytest.fixture(scope="module")
def tied_llama():
    return capture(tiny_causal_lm("llama", tie_word_embeddings=True))


def _packed(program, **tables):
    out = copy.deepcopy(program)
    quantize = Quantize(weights=WeightQuant(bits=4, group_size=32), tables=TableQuant(**tables))
    out.last_result = run_passes(out, [quantize], progress=False)[-1]
    return out


def _table_readers(program) -> dict[str, set]:
    """Per packed-table get_attr target, the fxpress ops reading it."""
    readers: dict[str, set] = {}
    for node in program.module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("fxpress."):
            first = node.args[1]
            if getattr(first, "op", None) == "get_attr" and "lm_head" in str(first.target):
                readers.setdefault(str(first.target), set()).add(str(node.target).split(".")[1])
    return readers


def test_tied_table_is_packed_once_and_read_by_both(tied_llama):
    program = _packed(tied_llama, embedding_bits=8, lm_head_bits=8)
    stats = program.last_result.stats
    assert stats["tied_tables_shared"] == 1 and stats["tables_packed"] == 1 and not program.last_result.warnings
    assert _table_readers(program) == {"model_lm_head_weight_q8_packed": {"embedding_nbit", "linear_nbit"}}
    names = [n for n, _ in program.module.named_buffers()] + [n for n, _ in program.module.named_parameters()]
    assert not any(n.endswith("lm_head.weight") or n == "model_lm_head_weight" for n in names)  # fp table gone
    assert program.weight_bytes() < 0.25 * tied_llama.weight_bytes()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    w4 = _packed(tied_llama)  # w_bits only: the fp table stays
    ref = tied_llama(ids)
    assert _rel(program(ids), ref) < 1.3 * _rel(w4(ids), ref)  # 8-bit table adds little to the W4 error


def test_different_bits_store_a_tied_table_twice_with_a_warning(tied_llama):
    program = copy.deepcopy(tied_llama)
    result = run_passes(program, [Quantize(weights=WeightQuant(bits=None, group_size=32),
                                           tables=TableQuant(embedding_bits=4, lm_head_bits=8))],
                        progress=False)[-1]
    readers = _table_readers(program)
    assert readers == {"model_lm_head_weight_q4_packed": {"embedding_nbit"},
                       "model_lm_head_weight_q8_packed": {"linear_nbit"}}
    assert any("stored twice" in w for w in result.warnings)


def test_embedding_only_keeps_the_fp_head_and_says_so(tied_llama):
    program = copy.deepcopy(tied_llama)
    result = run_passes(program, [Quantize(weights=WeightQuant(bits=None),
                                           tables=TableQuant(embedding_bits=8))], progress=False)[-1]
    assert any("still read in full precision" in w for w in result.warnings)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    assert _rel(program(ids), tied_llama(ids)) < 0.02


@pytest.mark.parametrize("fields,needle", [
    (dict(tables=TableQuant(embedding_bits=1)), "tables.embedding_bits"),
    (dict(tables=TableQuant(lm_head_bits=9)), "tables.lm_head_bits"),
    (dict(tables=TableQuant(embedding_bits=True)), "tables.embedding_bits"),
    (dict(weights=WeightQuant(bits=None)), "nothing to do"),
    (dict(tables=TableQuant(embedding_bits=8, group_size=12)), "tables.group_size"),
])
def test_bad_table_fields_raise_config_errors(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        Quantize(**fields).validate()


def test_embedding_bits_on_a_model_without_embedding_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    program = capture(mlp, (torch.randn(2, 16),))
    with pytest.raises(PassError, match="no embedding lookup"):
        run_passes(program, [Quantize(tables=TableQuant(embedding_bits=8))], progress=False)


def test_packed_tied_llama_exports_to_onnx_with_parity(tmp_path, tied_llama):
    """The whole LM through ONNX Runtime (the TVM kernels are checked on TiedTable above, for test time)."""
    pytest.importorskip("onnxruntime")
    from fxpress.lowering.export import lowering_module
    from fxpress.lowering.onnx import export_onnx
    from fxpress.runtime.generate import generate
    from fxpress.runtime.runners import OnnxRunner

    program = _packed(tied_llama, embedding_bits=8, lm_head_bits=8)
    floats = [p for p in lowering_module(program).parameters() if p.dtype == torch.float32 and p.shape == (256, 64)]
    assert not floats  # the tied table's unread second name does not become an artifact weight
    ref = TorchRunner(program)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = ref(ids)
    stats = export_onnx(program, tmp_path / "m.onnx")
    assert stats["gatherblockquantized"] == 1 and stats["matmulnbits"] == 15
    onnx_runner = OnnxRunner(tmp_path / "m.onnx")
    assert _rel(onnx_runner(ids), expected) < 1e-5
    assert torch.equal(generate(onnx_runner, ids[:, :3], 6), generate(ref, ids[:, :3], 6))
