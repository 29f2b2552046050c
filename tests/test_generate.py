"""generate(): greedy and sampled decoding through the KV cache, on the captured program."""

from __future__ import annotations

import pytest
import torch

from fxpress.capture import capture
from fxpress.errors import ArtifactError, ConfigError
from fxpress.runtime.generate import filter_logits, generate
from fxpress.runtime.runners import TorchRunner, load_runner
from fxpress.zoo import tiny_causal_lm


@pytest.fixture(scope="module")
def llama():
    model = tiny_causal_lm("llama")
    return model, capture(model)


def _prompt(batch: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_greedy_matches_transformers_generate(llama):
    model, program = llama
    prompt = _prompt()
    ours = generate(program, prompt, max_new_tokens=12)
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_greedy_with_the_cache_equals_greedy_without_it(llama):
    _, program = llama
    prompt = _prompt(seed=3)
    tokens = generate(program, prompt, max_new_tokens=8)
    ids = prompt
    for _ in range(8):  # recompute the whole prefix every step: what the cache saves
        ids = torch.cat([ids, program(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids)


@pytest.mark.parametrize("family", ["llama", "mixtral", "deepseek_v3"])
def test_decoding_with_past_matches_the_full_sequence(family):
    runner = TorchRunner(capture(tiny_causal_lm(family)))
    ids = _prompt(seq=12, seed=4)
    full = runner(ids)
    logits1, keys, values = runner.step(ids[:, :7], *runner.empty_cache(2))
    logits2, keys, values = runner.step(ids[:, 7:8], keys, values)
    logits3, keys, _ = runner.step(ids[:, 8:], keys, values)
    assert keys.shape[3] == 12
    stepped = torch.cat([logits1, logits2, logits3], dim=1)
    assert float((stepped - full).abs().max() / full.abs().max()) < 1e-5


def test_sampling_is_seeded_and_filters_apply(llama):
    _, program = llama
    prompt = _prompt(seed=5)
    a = generate(program, prompt, 10, do_sample=True, temperature=1.5, seed=11)
    b = generate(program, prompt, 10, do_sample=True, temperature=1.5, seed=11)
    c = generate(program, prompt, 10, do_sample=True, temperature=1.5, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(program, prompt, 10)
    assert torch.equal(generate(program, prompt, 10, do_sample=True, top_k=1, seed=1), greedy)
    assert torch.equal(generate(program, prompt, 10, do_sample=True, top_p=1e-6, seed=1), greedy)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).tolist() == [[True, True, True, False]]


def test_eos_stops_generation(llama):
    _, program = llama
    prompt = _prompt(batch=1, seed=6)
    tokens = generate(program, prompt, 6)
    eos = int(tokens[0, prompt.shape[1] + 1])  # the second generated token
    stopped = generate(program, prompt, 6, eos_token_id=eos)
    assert stopped.shape[1] <= prompt.shape[1] + 2 and int(stopped[0, -1]) == eos


def test_bad_arguments_are_clear_errors(llama, tmp_path):
    _, program = llama
    with pytest.raises(ConfigError, match="LongTensor"):
        generate(program, torch.zeros(2, 3), 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(program, _prompt(), -1)
    with pytest.raises(ConfigError, match="temperature"):
        generate(program, _prompt(), 4, do_sample=True, temperature=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        generate(program, _prompt(), 4, do_sample=True, top_p=1.5)
    with pytest.raises(ArtifactError, match="does not exist"):
        generate(tmp_path / "nothing.onnx", _prompt(), 4)
    with pytest.raises(ArtifactError):
        load_runner(42)
