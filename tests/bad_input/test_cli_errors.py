"""Every CLI failure: exit code 2, one line naming the argument and the fix, no traceback, before any work."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import fxpress
import fxpress.cli as cli
from fxpress.cli import main
from fxpress.errors import ConfigError
from fxpress.zoo import tiny_causal_lm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint with weights and config but no tokenizer files."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(path)
    return path


def _fails(argv: list[str], capsys, *named: str) -> str:
    """main(argv) exits 2 with one line on stderr that names every string in `named`; returns that line."""
    capsys.readouterr()  # drop what the test's own setup printed (save_pretrained's progress bar)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fxpress: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    for text in named:
        assert text in err, (text, err)
    return err


def test_empty_model_directory_names_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    _fails(["compile", "--model", str(tmp_path / "empty"), "--out", str(out)], capsys, "--model", "config.json",
           str(tmp_path / "empty"))
    assert not out.exists()


def test_missing_model_directory_is_named(tmp_path, capsys):
    _fails(["compile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capsys,
           "--model", "does not exist", str(tmp_path / "nope"))


def test_out_that_is_a_file(tmp_path, capsys, checkpoint):
    (tmp_path / "taken").write_text("mine")
    _fails(["compile", "--model", str(checkpoint), "--out", str(tmp_path / "taken")], capsys, "--out", "is a file")
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("argv, named", [
    (["--seq-len", "0"], ("--seq-len", ">= 1")),
    (["--calib-samples", "-1"], ("--calib-samples", ">= 1")),
    (["--eval-windows", "x"], ("--eval-windows", "not an integer")),
    (["--export", "onnx,tflite"], ("--export", "tflite", "onnx, tvm")),
    (["--dtype", "int8"], ("--dtype", "int8")),
    (["--dtype", "bfloat16", "--export", "onnx"], ("--dtype bfloat16", "precision.dtype=float32")),
    (["--passes", "quantize", "--set", "quantize.weights.skip={a: 1}"], ("quantize.weights.skip", "wrong type")),
    (["--passes", "quantize", "--set", "quantize.weights.bits=four"], ("quantize.weights.bits", "expected int")),
])
def test_bad_compile_arguments_are_named_before_any_work(argv, named, tmp_path, capsys, checkpoint):
    out = tmp_path / "out"
    _fails(["compile", "--model", str(checkpoint), "--out", str(out), *argv], capsys, *named)
    assert not out.exists()


def test_unknown_export_target_is_checked_before_the_model_is_looked_up(tmp_path, capsys):
    _fails(["compile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--export", "tflite"],
           capsys, "--export", "tflite")


def test_missing_tokenizer_is_named_only_when_the_pipeline_needs_text(tmp_path, capsys, checkpoint):
    gptq = ["--passes", "quantize", "--set", "quantize.weights.method=gptq"]
    out = tmp_path / "out"
    _fails(["compile", "--model", str(checkpoint), "--out", str(out), *gptq], capsys, "--model", "tokenizer",
           "calibration")
    _fails(["compile", "--model", str(checkpoint), "--out", str(out), "--eval-windows", "2"], capsys, "tokenizer")
    assert not out.exists()
    rtn = ["--passes", "quantize", "--set", "quantize.weights.group_size=32"]
    assert main(["compile", "--model", str(checkpoint), "--out", str(out), *rtn]) == 0  # RTN needs no tokenizer
    assert (out / "program" / "manifest.json").is_file()


def test_eval_of_another_models_program_names_both(tmp_path, capsys, checkpoint):
    cm = fxpress.compile(tiny_causal_lm("llama"), passes=[], progress=False)
    cm.program.info.source = str(checkpoint)
    program = cm.save(tmp_path / "program")
    other = tmp_path / "other"
    tiny_causal_lm("llama", hidden_size=32, intermediate_size=64).save_pretrained(other)
    (other / "tokenizer.json").write_text("{}")  # the check runs before any tokenizer is read
    _fails(["eval", "--model", str(other), "--program", str(program)], capsys,
           "--program", "--model", "hidden_size: 64 in the program, 32 in the model", str(checkpoint))
    _fails(["eval", "--model", str(other), "--program", str(tmp_path)], capsys, "--program", "manifest.json")


def test_a_model_name_that_is_not_local_fails_fast_without_network(tmp_path, capsys):
    start = time.perf_counter()
    _fails(["compile", "--model", "someorg/not-a-local-model", "--out", str(tmp_path / "o")], capsys,
           "someorg/not-a-local-model", "--allow-download")
    assert time.perf_counter() - start < 5


def test_argparse_misuse_is_one_line(capsys):
    _fails(["compile"], capsys, "--out", "fxpress compile --help")
    _fails(["compyle"], capsys, "compyle", "fxpress --help")


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise RuntimeError("deep inside\nsecond line")

    monkeypatch.setattr(cli, "cmd_passes", broken)
    _fails(["passes"], capsys, "unexpected RuntimeError", "deep inside second line", "--debug")
    with pytest.raises(RuntimeError, match="deep inside"):
        main(["passes", "--debug"])
    with pytest.raises(ConfigError, match="--seq-len"):
        main(["compile", "--debug", "--out", str(tmp_path / "o"), "--seq-len", "0"])


def test_python_dash_m_prints_no_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    run = subprocess.run([sys.executable, "-m", "fxpress", "compile", "--out", str(tmp_path / "file")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"fxpress: error: --out '{tmp_path / 'file'}' is a file: give a "
                                               "directory (it is created if missing), or move the file away"]
