"""The fxpress command line: pass listing, one-line errors, compile + eval on a local checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fxpress.cli import main
from fxpress.passes.base import PASS_REGISTRY
from fxpress.zoo import tiny_causal_lm


def test_passes_lists_every_registered_pass(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert PASS_REGISTRY and all(name in out for name in PASS_REGISTRY)


def test_python_dash_m_fxpress_runs_the_cli(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "fxpress", "passes"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "rotate" in listed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fxpress", "compile", "--passes", "quantize,rotate", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "'rotate' cannot run after 'quantize'" in bad.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "--passes", "rotatee", "--out", "x"], "unknown pass 'rotatee'"),
        (["compile", "--passes", "quantize", "--set", "quantize.bitz=4", "--out", "x"], "has no field 'bitz'"),
        (["compile", "--passes", "quantize", "--set", "quantise.weights.bits=4", "--out", "x"], "pass 'quantise' is not in the pipeline"),
    ],
)
def test_bad_pipelines_fail_with_one_line_before_loading_anything(argv, message, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_compile_and_eval_a_local_checkpoint(tmp_path, capsys, smollm2):
    model = tiny_causal_lm("llama", vocab_size=len(smollm2[1]))
    model.save_pretrained(tmp_path / "ckpt")
    smollm2[1].save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["compile", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--eval-windows", "2", "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity (compiled)" in printed and "top-1 agreement" in printed and "100.00%" in printed
    assert (out / "program" / "weights.safetensors").is_file()
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--program", str(out / "program"), "--windows", "2", "--seq-len", "32"]) == 0
    assert "KL vs original" in capsys.readouterr().out
