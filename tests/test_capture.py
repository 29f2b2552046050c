"""Capture: every listed family exports with dynamic batch/sequence/past and matches eager PyTorch."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from fxpress.capture import capture
from fxpress.errors import CaptureError
from fxpress.zoo import FAMILIES, tiny_causal_lm, tiny_encoder


@cache
def _captured(family: str):
    """One capture per family for the whole module: capture is the slow part."""
    model = tiny_causal_lm(family)
    return model, capture(model)


def _ids(batch: int, seq: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_matches_eager_with_new_batch_and_length(family):
    model, program = _captured(family)
    ids = _ids(3, 37)  # captured at 2 x 16
    with torch.no_grad():
        expected = model(ids).logits
    assert program.info.kind == "causal_lm"
    torch.testing.assert_close(program(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mixtral", "deepseek_v3"])
def test_decoding_with_kv_cache_matches_full_sequence(family):
    model, program = _captured(family)
    ids = _ids(2, 24)
    keys, values = program.empty_cache(2)
    _, keys, values = program.run(ids[:, :20], keys, values)
    logits = []
    for t in range(20, 24):
        step, keys, values = program.run(ids[:, t : t + 1], keys, values)
        logits.append(step)
    with torch.no_grad():
        expected = model(ids).logits[:, 20:]
    assert keys.shape[3] == 24
    torch.testing.assert_close(torch.cat(logits, 1), expected, rtol=1e-4, atol=1e-5)


def test_capture_bert_encoder_dynamic_batch_and_length():
    model = tiny_encoder("bert")
    program = capture(model, (_ids(2, 16),))
    ids = _ids(3, 37)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(program(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model, example",
    [
        (torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)), torch.randn(2, 8)),
        (
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2)),
            torch.randn(2, 3, 8, 8),
        ),
    ],
    ids=["mlp", "cnn"],
)
def test_capture_plain_modules_with_dynamic_batch(model, example):
    program = capture(model.eval(), (example,))
    x = torch.randn(5, *example.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))


def test_capture_error_names_the_construct_and_a_fix():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum().item() > 0:  # Python control flow on data: cannot be captured
                return x * 2
            return x

    with pytest.raises(CaptureError, match=r"DataDependent.*(torch\.cond|torch\.where)"):
        capture(DataDependent(), (torch.randn(2, 3),))


def test_capture_rejects_batch_of_one_with_a_fix():
    with pytest.raises(CaptureError, match="batch of at least 2"):
        capture(torch.nn.Linear(3, 3), (torch.randn(1, 3),))


@pytest.mark.slow
def test_capture_smollm2_equals_model_and_runs_new_shapes(smollm2, smollm2_program):
    model, _ = smollm2
    ids = _ids(3, 37, vocab=model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(smollm2_program(ids), expected, rtol=1e-4, atol=1e-4)
    assert smollm2_program.info.hidden_size == 576 and smollm2_program.info.num_layers == 30
