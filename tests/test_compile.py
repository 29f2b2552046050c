"""compile(), save/load without pickle, evaluation and real text: the spine end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxpress
from fxpress.calibration import Calibration, collect_activations
from fxpress.data import SPLITS, corpus_text, token_windows
from fxpress.errors import ArtifactError, ConfigError
from fxpress.evaluate import compare_logits, evaluate, perplexity
from fxpress.zoo import tiny_causal_lm


def test_compile_without_passes_keeps_logits_and_saves_without_pickle(tmp_path):
    model = tiny_causal_lm("mixtral")
    cm = fxpress.compile(model, passes=[])
    ids = torch.randint(0, 256, (3, 37))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(cm(ids), expected)
    saved = cm.save(tmp_path / "prog")
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "program.json", "weights.safetensors"]
    assert b"torch._utils" not in (saved / "program.json").read_bytes()  # JSON graph, no pickled objects
    loaded = fxpress.load(saved)
    torch.testing.assert_close(loaded(ids), expected)


def test_load_rejects_truncated_and_foreign_directories(tmp_path):
    cm = fxpress.compile(tiny_causal_lm("llama"), passes=[])
    saved = cm.save(tmp_path / "prog")
    weights = saved / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        fxpress.load(saved)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an fxpress program"):
        fxpress.load(tmp_path / "other")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        fxpress.load(tmp_path)


def test_save_is_atomic_and_replaces_an_old_save(tmp_path):
    cm = fxpress.compile(tiny_causal_lm("llama"), passes=[])
    target = tmp_path / "prog"
    cm.save(target)
    cm.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["prog"]


def test_unknown_export_target_is_a_clear_error(tmp_path):
    cm = fxpress.compile(tiny_causal_lm("llama"), passes=[])
    with pytest.raises(ConfigError, match="unknown export target 'tflite'"):
        cm.export("tflite", tmp_path / "m.tflite")


def test_collect_activations_runs_the_graph_on_calibration_batches():
    program = fxpress.capture(tiny_causal_lm("llama"))
    program.calibration = Calibration(torch.randint(0, 256, (6, 12)), batch_size=4)
    node = next(n for n in program.graph.nodes if n.target is torch.ops.aten.linear.default)
    acts = collect_activations(program, [node.name])
    assert [t.shape[0] for t in acts[node.name]] == [4, 2]
    assert acts[node.name][0].shape[1] == 12


def test_calibration_rejects_bad_data_with_a_hint():
    with pytest.raises(ConfigError, match="token_windows"):
        Calibration(torch.zeros(0, 5))


def test_evaluation_metrics_on_known_distributions():
    windows = torch.randint(0, 10, (3, 9))
    uniform = lambda ids: torch.zeros(*ids.shape, 10)  # noqa: E731
    assert math.isclose(perplexity(uniform, windows), 10.0, rel_tol=1e-5)
    same = compare_logits(uniform, uniform, windows)
    assert same == {"kl": 0.0, "top1": 1.0}
    peaked = lambda ids: torch.nn.functional.one_hot(ids, 10).float() * 5  # noqa: E731
    other = compare_logits(uniform, peaked, windows)
    assert other["kl"] > 0.1


def test_real_text_splits_are_disjoint_and_substantial():
    texts = {split: corpus_text(split) for split in SPLITS}
    assert all(len(t) > 100_000 for t in texts.values())
    assert texts["eval"][:2000] not in texts["calib"]


@pytest.mark.slow
def test_smollm2_compile_without_passes_and_its_perplexity(smollm2, eval_windows):
    model, tokenizer = smollm2
    cm = fxpress.compile(model, passes=[])
    ids = eval_windows[:2, :64]
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(cm(ids), expected, rtol=1e-4, atol=1e-4)
    result = evaluate(cm, eval_windows[:4], ref_fn=lambda x: model(x).logits)
    assert 2.0 < result["perplexity"] < 60.0  # a working 135M model on real English prose
    assert result["top1"] == 1.0 and result["kl"] < 1e-6
    assert token_windows(tokenizer, "eval", 128, 3).shape == (3, 128)
