"""Rotate(mode="learned") (SpinQuant): rotations stay orthogonal, the program stays exact in fp32, the
quantized training loss goes down, bad options fail early, and the result lowers like the other modes."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.errors import ConfigError
from fxpress.passes.base import pass_from_dict
from fxpress.passes.fold_hadamard.fold_hadamard import FoldHadamard
from fxpress.passes.manager import relative_error, run_passes, validate_pipeline
from fxpress.passes.rotate.learned import Orthogonal, QuantSpec, fake_quant_ste
from fxpress.passes.rotate.rotate import Rotate, quantize_rtn
from fxpress.runtime.runners import load_runner
from fxpress.zoo import tiny_causal_lm

TOL = 1e-4  # the other modes' function-preservation tolerance (tests/test_rotate.py)
FAST = {"learned_steps": 10, "learned_samples": 4}


@cache
def _captured(family: str):
    """Weights x4 so the logits are peaked and 4-bit activations cost measurable loss (a fresh tiny
    model predicts near-uniformly, so quantization barely moves its loss); random norm scales to fold."""
    model = (tiny_causal_lm("llama", hidden_size=96, intermediate_size=192) if family == "llama96"
             else tiny_causal_lm(family))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            elif "norm" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    program = capture(model)
    program.calibration = Calibration(_sampled(model, program.info.vocab_size))
    return program


def _sampled(model: torch.nn.Module, vocab: int, n: int = 8, length: int = 32) -> torch.Tensor:
    """Text the model itself would write (sampled at temperature 1): the fp32 model predicts it well, so the
    loss quantization adds, and what training wins back, are measurable (on uniform random tokens a
    rotation can lower the loss just by flattening wrong predictions)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def program(family: str = "llama96"):
    return copy.deepcopy(_captured(family))


def test_straight_through_quantizer_is_the_runtime_formula_with_a_gradient():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    for spec in (QuantSpec(4), QuantSpec(4, 0.9, False), QuantSpec(3, 1.0, True, 16)):
        expected = quantize_rtn(x, spec.bits, spec.group, spec.clip_ratio, spec.symmetric)
        leaf = x.clone().requires_grad_(True)
        out = fake_quant_ste(leaf, spec)
        assert torch.allclose(out, expected, atol=1e-6)
        out.pow(2).sum().backward()
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_cayley_rotation_stays_orthogonal_under_large_steps():
    start = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(0)))[0]
    rot = Orthogonal(start)
    assert torch.allclose(rot.matrix(), start, atol=1e-6)  # the trivialised start is the given matrix
    target = torch.randn(48, 48, generator=torch.Generator().manual_seed(1))
    optim = torch.optim.Adam(rot.parameters(), lr=0.1)
    for _ in range(20):
        loss = (rot.matrix() - target).pow(2).sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
    r = rot.matrix().detach()
    assert (r - start).abs().max() > 0.1  # it moved
    assert (r.T @ r - torch.eye(48)).abs().max() <= 1e-5
    r64 = rot.exact()
    assert (r64.T @ r64 - torch.eye(48, dtype=torch.float64)).abs().max() <= 1e-10
    assert (r64 - r.double()).abs().max() <= 1e-5  # the float64 projection is the learned matrix


@pytest.mark.parametrize("family", ["llama96", "qwen2_moe", "deepseek_v3"])
def test_learned_rotation_is_orthogonal_and_function_preserving(family):
    original, p = program(family), program(family)
    rot, fold = run_passes(p, [Rotate(mode="learned", **FAST), FoldHadamard()], progress=False)
    assert rot.stats["equivalence_rel_error"] < TOL and fold.stats["equivalence_rel_error"] < TOL
    learned = rot.stats["learned"]
    assert learned["orthogonality_fp32"] <= 1e-5 and learned["orthogonality_f64"] <= 1e-10
    assert learned["r1_change"] > 1e-3  # training moved R1 off the Hadamard start
    assert learned["r1_inputs"] >= 3 * original.info.num_layers  # q, k, v and the MLP inputs see Q(x R1) R1^T
    if family == "deepseek_v3":  # latent attention: no R2, as in the other modes
        assert learned["r2_values"] == 0 and rot.stats["r2_layers"] == 0
    else:
        assert learned["r2_values"] == learned["r2_o_inputs"] == original.info.num_layers
    assert rot.stats["r1"].startswith("learned (Cayley, 10 steps) from random Hadamard")
    ids = original.example_inputs[0]
    b = ids.shape[0]
    ref = original.run(ids, *original.empty_cache(b))
    out = p.run(ids, *p.empty_cache(b))
    assert relative_error(out[0], ref[0]) < TOL
    step = ids[:, :2].flip(1)
    assert relative_error(p.run(step, out[1], out[2])[0], original.run(step, ref[1], ref[2])[0]) < TOL


def test_training_lowers_the_quantized_loss_and_is_reproducible():
    p, again = program(), program()
    (result,) = run_passes(p, [Rotate(mode="learned", learned_steps=30, learned_samples=8)], progress=False)
    learned = result.stats["learned"]
    with torch.no_grad():  # the fp32 loss on the same windows: the quantizers really are in the loop
        ids = p.calibration.batches
        logits = p(ids)
        fp = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    # measured with seed 0: fp32 5.168, quantized 5.217 at the Hadamard start, 5.187 after 30 steps
    assert learned["loss_start"] > fp + 0.03
    assert learned["loss_end"] < learned["loss_start"] - 0.015
    run_passes(again, [Rotate(mode="learned", learned_steps=30, learned_samples=8)], progress=False)
    name = next(iter(p.module.state_dict()))
    assert torch.equal(p.module.state_dict()[name], again.module.state_dict()[name])


def test_bad_options_and_missing_calibration_fail_before_any_work():
    for field, value in (("learned_steps", -1), ("learned_lr", 0.0), ("learned_samples", 0),
                         ("learned_act_bits", 1), ("learned_kv_bits", 9), ("learned_act_clip", 1.5),
                         ("learned_act_asym", 1), ("learned_steps", 2.5)):
        with pytest.raises(ConfigError, match=field):
            validate_pipeline([Rotate(mode="learned", **{field: value})])
    with pytest.raises(ConfigError, match="learned_batch"):
        validate_pipeline([Rotate(mode="learned", learned_batch=8, learned_samples=4)])
    with pytest.raises(ConfigError, match="calibration"):
        validate_pipeline([Rotate(mode="learned")], has_calibration=False)
    p = program()
    p.calibration = None
    weights = {k: v.clone() for k, v in p.module.state_dict().items()}
    with pytest.raises(ConfigError, match="calibration"):
        run_passes(p, [Rotate(mode="learned")], progress=False)
    assert all(torch.equal(v, weights[k]) for k, v in p.module.state_dict().items())
    spec = Rotate(mode="learned", learned_steps=7, learned_lr=1e-3).to_dict()
    assert pass_from_dict(spec) == Rotate(mode="learned", learned_steps=7, learned_lr=1e-3)


@pytest.mark.parametrize("target", ["onnx", "tvm"])
def test_learned_rotation_lowers_with_parity(tmp_path, target):
    pytest.importorskip("onnxruntime" if target == "onnx" else "tvm")
    p = program("llama")
    run_passes(p, [Rotate(mode="learned", **FAST), FoldHadamard()], progress=False)
    path = tmp_path / ("m.onnx" if target == "onnx" else "m_tvm")
    if target == "onnx":
        from fxpress.lowering.onnx import export_onnx

        export_onnx(p, path)
    else:
        from fxpress.lowering.tvm import export_tvm

        export_tvm(p, path)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    expected, actual = p(ids), load_runner(path)(ids)
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-5
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
