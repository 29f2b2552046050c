"""Bad destinations and dying writers: fxpress never deletes what it did not write, and a save or export
killed at any step of the replace protocol leaves the old artifact or the new one, complete, at the path."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress import atomic
from fxpress.compiled import CompiledModel
from fxpress.errors import ArtifactError, ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _lowering_cases import ops_program, relative_error  # noqa: E402

FAULT_EXIT = 86  # the exit code of a child killed by the injected fault
X = torch.randn(2, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread also keeps fork() safe (no OpenMP pool in the parent)."""


def tiny(seed: int) -> CompiledModel:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return fxpress.compile(model, example_inputs=(X,), progress=False)


def run_killed(write: Callable[[], object], step: str, timeout: float = 300) -> int:
    """Run `write` in a forked child that `os._exit`s at protocol step `step`; its exit code (FAULT_EXIT: died there)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            atomic.STEP_HOOKS.append(lambda name: os._exit(FAULT_EXIT) if name == step else None)
            write()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the writer killed at '{step}' hung")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".fxpress-" in p.name)


def which(output: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> str:
    """Which artifact gave `output`: "old", "new" or "neither" (the two must differ for this to mean anything)."""
    assert not torch.allclose(old, new, atol=1e-5)
    if torch.allclose(output, old, atol=1e-5):
        return "old"
    return "new" if torch.allclose(output, new, atol=1e-5) else "neither"


# -- the protocol under fault injection ------------------------------------------------------------------
DIR_STEPS = {"exchange": [("staging", "old"), ("staged", "old"), ("swapped", "new"), ("cleaned", "new")],
             "move-aside": [("staging", "old"), ("staged", "old"), ("aside", None), ("published", "new"),
                            ("cleaned", "new")]}


@pytest.mark.parametrize("mode", list(DIR_STEPS))
def test_save_killed_at_every_step_leaves_the_old_or_the_new_program(mode, tmp_path, monkeypatch):
    if mode == "move-aside":  # a filesystem without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    old, new = tiny(1), tiny(2)
    expected = {"old": old(X), "new": new(X)}
    target = tmp_path / "prog"
    for step, holds in DIR_STEPS[mode]:
        old.save(target)
        assert run_killed(lambda: new.save(target), step) == FAULT_EXIT, f"the save never reached '{step}'"
        if holds is None:  # moved aside, new not yet in: the old one is whole beside it, and comes back
            assert not target.exists()
            assert which(fxpress.load(atomic._aside(target))(X), **expected) == "old"
            atomic.recover(target)
            holds = "old"
        assert which(fxpress.load(target)(X), **expected) == holds, f"killed at '{step}'"
        old.save(target)  # the next write cleans up after the dead one
        assert leftovers(tmp_path) == [], f"killed at '{step}'"
        assert which(fxpress.load(target)(X), **expected) == "old"


def test_first_save_killed_leaves_nothing_or_the_new_program(tmp_path):
    new = tiny(2)
    target = tmp_path / "prog"
    for step in ("staging", "staged", "published"):
        shutil.rmtree(target, ignore_errors=True)
        assert run_killed(lambda: new.save(target), step) == FAULT_EXIT
        assert not target.exists() if step != "published" else torch.allclose(fxpress.load(target)(X), new(X))
        new.save(target)
        assert leftovers(tmp_path) == []


FILE_STEPS = [("staging", "old"), ("staged", "old"), ("companion", "old"), ("published", "new"), ("cleaned", "new")]


def test_onnx_export_with_external_data_killed_at_every_step(tmp_path):
    from fxpress.lowering.onnx import export_onnx
    from fxpress.runtime.runners import OnnxRunner

    old, new = ops_program(seed=1), ops_program(seed=2)
    x = torch.randn(2, 3, old.example_inputs[0].shape[-1])
    expected = {"old": old(x), "new": new(x)}
    target = tmp_path / "m.onnx"
    for step, holds in FILE_STEPS:
        export_onnx(old, target, external_data=True)
        code = run_killed(lambda: export_onnx(new, target, external_data=True), step)
        assert code == FAULT_EXIT, f"the export never reached '{step}'"
        assert which(OnnxRunner(target)(x), **expected) == holds, f"killed at '{step}'"
        export_onnx(old, target, external_data=True)
        data = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
        assert leftovers(tmp_path) == [] and len(data) == 1, f"killed at '{step}': {sorted(os.listdir(tmp_path))}"
    export_onnx(old, target)  # back to one file: the old external data goes too
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_tvm_export_killed_while_replacing_keeps_a_loadable_artifact(tmp_path):
    pytest.importorskip("tvm")
    from fxpress.lowering.tvm import export_tvm
    from fxpress.runtime.runners import TvmRunner

    old, new = ops_program(seed=1), ops_program(seed=2)
    x = torch.randn(2, 3, old.example_inputs[0].shape[-1])
    target = tmp_path / "m.tvm"
    export_tvm(old, target)
    assert run_killed(lambda: export_tvm(new, target), "staged") == FAULT_EXIT
    assert relative_error(TvmRunner(target)(x), old(x)) < 1e-5
    export_tvm(new, target)  # the real build path, replacing an fxpress artifact without overwrite
    assert relative_error(TvmRunner(target)(x), new(x)) < 1e-5
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("step", ["staging", "staged"])
def test_a_filesystem_error_names_the_users_path_and_keeps_the_old_artifact(step, tmp_path, monkeypatch):
    old, new = tiny(1), tiny(2)
    target = tmp_path / "prog"
    old.save(target)

    def disk_full(name: str) -> None:
        if name == step:
            raise OSError(errno.ENOSPC, "No space left on device", str(next(tmp_path.glob(".prog.fxpress-new-*"))))

    monkeypatch.setattr(atomic, "STEP_HOOKS", [disk_full])
    with pytest.raises(ArtifactError, match=r"could not write '.*prog': No space left on device") as err:
        new.save(target)
    assert atomic.STAGE_TAG not in str(err.value) and leftovers(tmp_path) == []
    assert torch.allclose(fxpress.load(target)(X), old(X))


# -- what fxpress did not write ----------------------------------------------------------------------------
def test_save_refuses_a_users_directory_and_keeps_it_intact(tmp_path):
    cm = tiny(1)
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ConfigError, match=r"photos' is a non-empty directory that fxpress did not write.*overwrite=True"):
        cm.save(user)
    assert sorted(os.listdir(user)) == ["cat.jpg"] and leftovers(tmp_path) == []
    cm.save(user, overwrite=True)
    assert sorted(os.listdir(user)) == ["manifest.json", "program.json", "weights.safetensors"]
    cm.save(user)  # now an fxpress artifact: replaced without overwrite
    assert torch.allclose(fxpress.load(user)(X), cm(X))


def test_export_refuses_a_foreign_onnx_file_and_a_users_directory(tmp_path):
    cm = tiny(1)
    foreign = tmp_path / "theirs.onnx"
    foreign.write_bytes(b"not ours")
    with pytest.raises(ConfigError, match=r"theirs.onnx' is a file that fxpress did not write.*overwrite=True"):
        cm.export("onnx", foreign)
    assert foreign.read_bytes() == b"not ours"
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ConfigError, match=r"dir.onnx' is a directory, but this artifact is a file"):
        cm.export("onnx", tmp_path / "dir.onnx")
    cm.export("onnx", foreign, overwrite=True)
    cm.export("onnx", foreign)  # ours now
    assert leftovers(tmp_path) == []


def test_tvm_export_into_a_users_directory_is_refused_before_the_build(tmp_path, monkeypatch):
    from fxpress.lowering.tvm import build

    user = tmp_path / "work"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    monkeypatch.setattr(build, "to_relax", lambda *a: pytest.fail("the build ran before the path check"))
    with pytest.raises(ConfigError, match=r"work' is a non-empty directory that fxpress did not write"):
        build.export_tvm(tiny(1).program, user)
    assert (user / "notes.txt").read_text() == "mine"


def test_fpga_export_into_a_users_directory_is_refused_first(tmp_path):
    user = tmp_path / "board"
    user.mkdir()
    (user / "pins.pcf").write_text("set_io clk 35")
    with pytest.raises(ConfigError, match=r"board' is a non-empty directory that fxpress did not write"):
        tiny(1).export("hls", user)  # not even a threshold network: the path is checked before the netlist
    assert (user / "pins.pcf").read_text() == "set_io clk 35"


def test_a_users_file_where_the_recipe_goes_is_refused_before_the_export(tmp_path, monkeypatch):
    import fxpress.lowering.onnx

    monkeypatch.setattr(fxpress.lowering.onnx, "export_onnx", lambda *a, **k: pytest.fail("the export ran"))
    (tmp_path / "m.recipe.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match=r"m.recipe.json' is a file that fxpress did not write"):
        tiny(1).export("onnx", tmp_path / "m.onnx")
    assert (tmp_path / "m.recipe.json").read_text() == '{"mine": true}'


# -- destination checks come before any work ---------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into: chmod for a normal user, the immutable flag for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("running as root without chattr +i: no way to make a read-only folder")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.mark.parametrize("target", ["onnx", "tvm"])
def test_read_only_parent_is_refused_before_the_lowering_runs(target, read_only_dir, monkeypatch):
    import fxpress.lowering.onnx
    import fxpress.lowering.tvm

    called = []
    for module, name in ((fxpress.lowering.onnx, "export_onnx"), (fxpress.lowering.tvm, "export_tvm")):
        monkeypatch.setattr(module, name, lambda *a, **k: called.append(a))
    path = read_only_dir / ("m.onnx" if target == "onnx" else "m.tvm")
    with pytest.raises(ConfigError) as err:
        tiny(1).export(target, path)
    assert f"cannot write '{path}'" in str(err.value) and "not writable" in str(err.value)
    assert atomic.STAGE_TAG not in str(err.value) and called == []


def test_read_only_parent_is_refused_before_saving(read_only_dir, monkeypatch):
    import fxpress.serialize

    monkeypatch.setattr(fxpress.serialize, "reexport", lambda *a: pytest.fail("the program was exported first"))
    with pytest.raises(ConfigError, match=re.escape(f"cannot write '{read_only_dir / 'prog'}'") + ".* not writable"):
        tiny(1).save(read_only_dir / "prog")


def test_a_file_where_a_folder_is_needed_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    cm = tiny(1)
    with pytest.raises(ConfigError, match=r"'.*f' is a file, but this artifact is a directory"):
        cm.save(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"cannot write '.*f/sub/prog': '.*f' is a file"):
        cm.save(tmp_path / "f" / "sub" / "prog")
    assert (tmp_path / "f").read_text() == "x"


def test_cli_out_that_is_a_file_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import fxpress.models
    from fxpress.cli import main

    monkeypatch.setattr(fxpress.models, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out.txt"
    out.write_text("keep")
    assert main(["compile", "--out", str(out)]) == 2
    assert f"--out '{out}' is a file" in capsys.readouterr().err and out.read_text() == "keep"
    (tmp_path / "run" / "model.onnx").parent.mkdir()
    (tmp_path / "run" / "model.onnx").write_text("theirs")
    assert main(["compile", "--out", str(tmp_path / "run"), "--export", "onnx"]) == 2
    assert "model.onnx' is a file that fxpress did not write" in capsys.readouterr().err
    monkeypatch.setattr(fxpress.models, "load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(ConfigError("loaded")))
    assert main(["compile", "--out", str(tmp_path / "run"), "--export", "onnx", "--overwrite"]) == 2
    assert "loaded" in capsys.readouterr().err  # --overwrite lets the checks pass; the run went on to the model


def test_the_markers_match_what_the_writers_write():
    from fxpress.artifact_names import METADATA_KEY, TVM_MANIFEST
    from fxpress.lowering.fpga.netlist import FORMAT as NETLIST_FORMAT
    from fxpress.recipe import recipe_dict
    from fxpress.serialize import FORMAT, MANIFEST_FILE

    assert atomic.DIR_MARKERS == {MANIFEST_FILE: FORMAT, TVM_MANIFEST: "fxpress", "netlist.json": NETLIST_FORMAT}
    assert atomic.METADATA_KEY == METADATA_KEY
    assert atomic.RECIPE_KEY in recipe_dict([])
