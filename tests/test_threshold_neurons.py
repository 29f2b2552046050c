"""The threshold_neurons pass and the fxpress::threshold_linear op, on scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxpress.capture import capture
from fxpress.data import digits_split
from fxpress.errors import ConfigError, PassError
from fxpress.evaluate import accuracy
from fxpress.passes import ThresholdNeurons, pass_from_dict, run_passes
from fxpress.passes.threshold_neurons import FineTuning
from fxpress.runtime.threshold import threshold_linear
from fxpress.zoo import train_mlp

pytest.importorskip("sklearn")

DENSITY = 0.5  # the accuracy choice: within 1 point of the conventional network over 8 seeds


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.fixture(scope="module")
def mlp(digits):
    xtr, ytr, _, _ = digits
    return train_mlp(xtr, ytr)


@pytest.fixture(scope="module")
def converted(digits, mlp):
    """The digits MLP with its hidden layer fine-tuned as threshold neurons, and the pass's stats."""
    xtr, ytr, xte, yte = digits
    program = _program(mlp, xtr, ytr)
    program.metadata["eval_data"] = (xte, yte)
    stats = run_passes(program, [ThresholdNeurons(density=DENSITY)], verify=False)[0].stats
    return program, stats


def _program(model, xtr, ytr=None):
    program = capture(model, (xtr[:4],))
    program.metadata["train_data"] = (xtr, ytr) if ytr is not None else xtr
    return program


def test_threshold_linear_is_excitatory_minus_inhibitory_minus_threshold():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (5, 12), generator=gen).float()
    conn = torch.randint(-1, 2, (7, 12), generator=gen).to(torch.int8)
    theta = torch.randint(-20, 20, (7,), generator=gen).float()
    out = threshold_linear(x, conn, theta, relu=False)
    for j in range(7):
        exc = x[:, conn[j] == 1].sum(1)
        inh = x[:, conn[j] == -1].sum(1)
        assert torch.equal(out[:, j], exc - inh - theta[j])
    assert torch.equal(threshold_linear(x, conn, theta, relu=True), out.clamp_min(0))


def test_threshold_linear_exports_again():
    conn = torch.tensor([[1, -1, 0], [0, 1, 1]], dtype=torch.int8)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("conn", conn)
            self.register_buffer("theta", torch.tensor([1.0, -2.0]))

        def forward(self, x):
            return threshold_linear(x, self.conn, self.theta, True)

    ep = torch.export.export(M(), (torch.ones(2, 3),))
    assert any("threshold_linear" in str(n.target) for n in ep.graph.nodes)
    x = torch.tensor([[3.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
    assert torch.equal(ep.module()(x), torch.tensor([[1.0, 8.0], [0.0, 2.0]]))


def test_threshold_network_within_two_points_of_conventional(digits, mlp, converted):
    xtr, ytr, xte, yte = digits
    acc_fp = accuracy(mlp, xte, yte)
    program, stats = converted
    acc_tn = accuracy(program, xte, yte)
    assert acc_fp > 0.95
    assert acc_tn >= acc_fp - 0.02, (acc_fp, acc_tn)
    assert stats["eval_accuracy_after"] == pytest.approx(acc_tn)
    (row,) = stats["layers"]
    assert row["layer"] == "0" and stats["kept"] == ["2"]
    assert stats["multiplications_removed"] == 64 * 32
    assert row["excitatory"] + row["inhibitory"] == 32 * 32  # half of the 64 inputs per neuron
    assert row["input_range"] == [0, 31] and row["input_scale"] == 1.0  # digits are exact 5-bit codes
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.fxpress.threshold_linear.default in ops
    assert sum(1 for t in ops if t == torch.ops.aten.linear.default) == 1  # the classifier is kept
    assert stats["loss_last"] < stats["loss_first"]


def test_fine_tuning_beats_initialisation(digits, mlp, converted):
    xtr, ytr, xte, yte = digits
    init = _program(mlp, xtr, ytr)
    run_passes(init, [ThresholdNeurons(density=DENSITY, fine_tune=FineTuning(steps=0))], verify=False)
    assert accuracy(converted[0], xte, yte) > accuracy(init, xte, yte) + 0.05


def test_distillation_without_labels(digits, mlp):
    xtr, _, xte, yte = digits
    program = _program(mlp, xtr)  # inputs only: the pass distils the original outputs
    run_passes(program, [ThresholdNeurons(density=0.5, fine_tune=FineTuning(steps=300))], verify=False)
    assert accuracy(program, xte, yte) > 0.9


def test_chained_threshold_layers_stay_integer(digits):
    xtr, ytr, xte, yte = digits
    model = train_mlp(xtr, ytr, sizes=(64, 24, 16, 10), steps=150)
    program = _program(model, xtr, ytr)
    stats = run_passes(program, [ThresholdNeurons(density=0.5, fine_tune=FineTuning(steps=60), keep_last=False)], verify=False)[0].stats
    nodes = [n for n in program.graph.nodes if n.target == torch.ops.fxpress.threshold_linear.default]
    assert len(nodes) == 3 and len(stats["layers"]) == 3
    assert nodes[1].args[0] is nodes[0] and nodes[2].args[0] is nodes[1]  # no rescaling between them
    assert [r["relu"] for r in stats["layers"]] == [True, True, False]
    assert accuracy(program, xte, yte) > 0.5


def test_layer_patterns_and_multiplication_injection(digits, mlp):
    xtr, ytr, _, _ = digits
    program = _program(mlp, xtr, ytr)
    result = run_passes(program, [ThresholdNeurons(keep=["0"], fine_tune=FineTuning(steps=0))], verify=False)[0]
    assert not result.modified and "no linear layer matched" in result.warnings[0]


def test_bad_configuration_is_refused_before_work(digits, mlp):
    with pytest.raises(ConfigError, match="density"):
        ThresholdNeurons(density=0.0).validate()
    with pytest.raises(ConfigError, match="layers"):
        ThresholdNeurons(layers="0").validate()
    program = capture(mlp, (digits[0][:4],))
    with pytest.raises(PassError, match="train_data"):
        run_passes(program, [ThresholdNeurons(fine_tune=FineTuning(steps=10))], verify=False)
    assert "threshold_linear" not in str(program.graph)


def test_recipe_round_trip():
    p = ThresholdNeurons(layers=["fc*"], keep=["fc3"], density=0.3, fine_tune=FineTuning(steps=5))
    assert pass_from_dict(p.to_dict()) == p


def test_version_1_recipe_loads_into_the_same_grouped_config():
    flat = {"layers": ["fc*"], "keep": ["fc3"], "keep_last": False, "density": 0.3, "input_bits": 6, "steps": 5,
            "lr": 0.01, "kept_lr": 0.0, "distill": 2.0, "batch_size": 64, "seed": 3}
    loaded = pass_from_dict({"type": "threshold_neurons", "version": 1, "fields": flat})
    assert loaded == ThresholdNeurons(
        layers=["fc*"], keep=["fc3"], keep_last=False, density=0.3, input_bits=6, seed=3,
        fine_tune=FineTuning(steps=5, lr=0.01, kept_lr=0.0, distill=2.0, batch_size=64),
    )
    assert loaded.to_dict()["fields"]["fine_tune"]["steps"] == 5  # version 2 writes the group nested
    assert pass_from_dict({"type": "threshold_neurons", "version": 1, "fields": {"steps": 0}}).fine_tune.steps == 0
