"""Capture by repeated layers: three exported decoder layers grown to all, equal to the full export and to eager."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

from fxpress import repeat_layers
from fxpress.capture import capture, capture_stored
from fxpress.zoo import FAMILIES, tiny_causal_lm

LAYERS = 6
capture_module = importlib.import_module("fxpress.capture")  # the package's `capture` is the function


@pytest.fixture
def grown(monkeypatch):
    """Records whether each capture grew its graph from three layers (True) or exported all of them (False)."""
    calls: list[bool] = []
    grow = repeat_layers.grow
    monkeypatch.setattr(capture_module, "grow", lambda *a: calls.append(grow(*a)) or calls[-1])
    return calls


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _ops(program) -> Counter:
    """Every op and weight read; the empty cache constants are shared by the grown layers, so not counted."""
    return Counter(str(n.target) for n in program.module.graph.nodes
                   if n.op == "call_function" or (n.op == "get_attr" and "lifted_tensor" not in str(n.target)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grown_graph_equals_the_full_export_and_eager_with_a_cache(family, grown, monkeypatch):
    """deepseek_v3's first layer is dense and the others MoE: layer 0 differs, layers 1.. repeat."""
    model = tiny_causal_lm(family, num_hidden_layers=LAYERS)
    program = capture(model)
    assert grown == [True]
    monkeypatch.setattr(capture_module, "repeatable", lambda *a: False)
    full = capture(model)
    assert _ops(program) == _ops(full)  # the same nodes, reading the same weights
    ids = _ids(2, 20, 1)
    keys, values = program.empty_cache(2)
    with torch.no_grad():
        want = model(ids).logits
        prefill, keys, values = program.run(ids[:, :12], keys, values)
        for t in range(12, 14):
            step, keys, values = program.run(ids[:, t:t + 1], keys, values)
        assert keys.shape[0] == LAYERS
        _, full_keys, full_values = full.run(ids[:, :14], *full.empty_cache(2))
    torch.testing.assert_close(prefill, want[:, :12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, want[:, 13:14], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, full_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == LAYERS and model.config.num_hidden_layers == LAYERS  # restored


def test_layers_that_differ_are_exported_whole(grown):
    """Two dense layers then MoE (layer 1 is not layer 2's copy), or one layer with another attribute: no growing."""
    dense_first = tiny_causal_lm("deepseek_v3", num_hidden_layers=LAYERS, first_k_dense_replace=2)
    odd = tiny_causal_lm("llama", num_hidden_layers=LAYERS)
    odd.model.layers[4].self_attn.scaling = 0.5
    for model in (dense_first, odd):
        program = capture(model)
        with torch.no_grad():
            torch.testing.assert_close(program(_ids(1, 9, 2)), model(_ids(1, 9, 2)).logits, rtol=1e-5, atol=1e-5)
    assert grown == []


def test_a_grown_graph_that_computes_otherwise_is_dropped(grown, monkeypatch):
    """The check against eager catches what the structure does not: a layer whose forward reads its index."""
    model = tiny_causal_lm("llama", num_hidden_layers=LAYERS)
    layer = model.model.layers[5].mlp
    forward = type(layer).forward
    monkeypatch.setattr(type(layer), "forward", lambda self, x: forward(self, x) * (2.0 if self is layer else 1.0))
    program = capture(model)
    assert grown == [True]  # grown, then refused by the check: the full export stands
    with torch.no_grad():
        torch.testing.assert_close(program(_ids(1, 9, 3)), model(_ids(1, 9, 3)).logits, rtol=1e-5, atol=1e-5)


def test_a_store_backed_capture_grows_from_placeholders(grown):
    model = tiny_causal_lm("llama", num_hidden_layers=LAYERS)
    program = capture_stored(model)
    assert grown == [True]
    with torch.no_grad():
        torch.testing.assert_close(program(_ids(2, 11, 4)), model(_ids(2, 11, 4)).logits, rtol=1e-5, atol=1e-5)


def test_per_layer_config_that_differs_or_three_layers_are_exported_whole(grown):
    """A config list with one entry per layer (e.g. sliding/full attention) that differs, or nothing to repeat."""
    windowed = tiny_causal_lm("llama", num_hidden_layers=LAYERS)
    windowed.config.layer_types = ["full_attention"] * (LAYERS - 1) + ["sliding_attention"]
    assert not repeat_layers.repeatable(windowed, windowed.model.layers)
    short = tiny_causal_lm("llama", num_hidden_layers=repeat_layers.KEEP)
    program = capture(short)
    with torch.no_grad():
        torch.testing.assert_close(program(_ids(1, 9, 5)), short(_ids(1, 9, 5)).logits, rtol=1e-5, atol=1e-5)
    assert grown == []
