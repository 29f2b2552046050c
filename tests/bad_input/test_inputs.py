"""One input check in front of every way to run a model: cm(...), the runners and generate refuse bad ids and caches."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import ConfigError
from fxpress.runtime.generate import generate
from fxpress.runtime.runners import OnnxRunner, TorchRunner
from fxpress.zoo import tiny_causal_lm

VOCAB, MAX_POSITIONS = 256, 512  # the tiny models' config


@pytest.fixture(scope="module")
def compiled():
    return fxpress.compile(tiny_causal_lm("llama"), passes=[], progress=False)


@pytest.fixture(scope="module")
def onnx_runner(compiled, tmp_path_factory):
    path = compiled.export("onnx", tmp_path_factory.mktemp("onnx") / "llama.onnx")
    return OnnxRunner(path)


@pytest.fixture(params=["compiled", "torch_runner", "onnx", "generate", "generate_onnx"])
def run_ids(request, compiled, onnx_runner):
    """Each way to run token ids through the tiny LM."""
    return {
        "compiled": lambda ids: compiled(ids),
        "torch_runner": lambda ids: TorchRunner(compiled.program)(ids),
        "onnx": lambda ids: onnx_runner(ids),
        "generate": lambda ids: generate(compiled, ids, 2),
        "generate_onnx": lambda ids: generate(onnx_runner, ids, 2),
    }[request.param]


def _ids(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_good_ids_run_everywhere(run_ids):
    assert run_ids(_ids()).shape[0] == 2


@pytest.mark.parametrize("bad,pattern", [
    (VOCAB, rf"input_ids: token id {VOCAB} is outside the model's vocabulary \[0, {VOCAB}\)"),
    (-3, rf"input_ids: token id -3 is outside the model's vocabulary \[0, {VOCAB}\)"),
])
def test_ids_outside_the_vocabulary_are_refused(run_ids, bad, pattern):
    ids = _ids()
    ids[1, 3] = bad
    with pytest.raises(ConfigError, match=pattern):
        run_ids(ids)


def test_one_dimensional_ids_are_refused(run_ids):
    with pytest.raises(ConfigError, match=r"input_ids must have shape \[batch, seq\], got 1-D shape \(5,\).*ids\[None\]"):
        run_ids(_ids()[0])


def test_float_ids_are_refused(run_ids):
    with pytest.raises(ConfigError, match=r"input_ids must be an integer tensor.*got torch.float32"):
        run_ids(_ids().float())


def test_too_long_sequences_are_refused(run_ids):
    with pytest.raises(ConfigError, match=rf"input_ids.* needs {MAX_POSITIONS + 1} positions.*limit of {MAX_POSITIONS}"):
        run_ids(_ids(1, MAX_POSITIONS + 1))


def test_generation_past_the_limit_is_refused_before_the_first_step(compiled):
    with pytest.raises(ConfigError, match=r"input_ids with max_new_tokens needs 519 positions.*lower max_new_tokens"):
        generate(compiled, _ids(1, 500), 20)


@pytest.fixture(params=["compiled", "onnx"])
def run_with_cache(request, compiled, onnx_runner):
    """The ways to run ids with an explicit KV cache."""
    if request.param == "compiled":
        return lambda ids, keys, values: compiled(ids, keys, values)
    return onnx_runner.step


def _cache(batch: int = 2, past: int = 3, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (2, batch, 2, past, 16)  # layers, batch, kv heads, past, head dim of the tiny llama
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def test_a_good_cache_runs(run_with_cache):
    logits = run_with_cache(_ids(), *_cache())[0]
    assert logits.shape[:2] == (2, 5)


@pytest.mark.parametrize("which", [0, 1])
def test_a_cache_of_the_wrong_shape_is_refused(run_with_cache, which):
    cache = list(_cache())
    cache[which] = cache[which][:, :, :1]  # one head instead of two
    name = ("past_keys", "past_values")[which]
    with pytest.raises(ConfigError, match=rf"{name} has shape \(2, 2, 1, 3, 16\), this model needs \(2, 2, 2, past, 16\)"):
        run_with_cache(_ids(), *cache)


def test_a_cache_for_another_batch_is_refused(run_with_cache):
    with pytest.raises(ConfigError, match=r"past_keys has shape \(2, 3, 2, 3, 16\), this model needs \(2, 2, 2, past, 16\)"):
        run_with_cache(_ids(), *_cache(batch=3))


def test_an_integer_cache_is_refused(run_with_cache):
    with pytest.raises(ConfigError, match=r"past_keys is torch.int64, this model's cache is (a float type|torch.float32)"):
        run_with_cache(_ids(), *_cache(dtype=torch.long))


def test_an_artifact_refuses_a_cache_of_another_float_type(onnx_runner):
    with pytest.raises(ConfigError, match=r"past_keys is torch.float64, this model's cache is torch.float32"):
        onnx_runner.step(_ids(), *_cache(dtype=torch.float64))


def test_keys_and_values_of_different_lengths_are_refused(run_with_cache):
    keys, _ = _cache(past=3)
    _, values = _cache(past=4)
    with pytest.raises(ConfigError, match=r"past_keys and past_values disagree \(past 3 vs 4"):
        run_with_cache(_ids(), keys, values)


def test_cache_plus_new_tokens_past_the_limit_is_refused(run_with_cache):
    with pytest.raises(ConfigError, match=rf"input_ids needs {MAX_POSITIONS + 1} positions \({MAX_POSITIONS - 4} cached"):
        run_with_cache(_ids(), *_cache(past=MAX_POSITIONS - 4))


def test_a_generic_model_checks_count_rank_and_kind_of_its_inputs():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    cm = fxpress.compile(mlp, passes=[], example_inputs=(torch.randn(2, 8),), progress=False)
    assert cm(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ConfigError, match=r"input_0 has 1-D shape \(8,\), the model was captured with 2-D inputs"):
        cm(torch.randn(8))
    with pytest.raises(ConfigError, match=r"input_0 is torch.int64, the model was captured with torch.float32"):
        cm(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"this model takes 1 inputs \(input_0\), got 2"):
        cm(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ConfigError, match=r"input_0 must be a torch tensor, got list"):
        cm([1.0] * 8)
