"""Write artifacts so that a crash never loses the old one and fxpress never deletes what it did not write.

Every artifact (a saved program, a TVM or FPGA directory, an ONNX file and its external data) is written
into a staging folder beside the target, then published:

- a directory replaces the old one in one step (Linux `renameat2(RENAME_EXCHANGE)`); where the filesystem
  cannot swap, the old one is moved aside to `.<name>.fxpress-old`, the new one renamed in, the old deleted.
  A run that died in between is recovered by the next write (`recover`): the aside copy is moved back.
- a file gets its companions (ONNX external data, under a name unique to this export) first, then is
  renamed over the old file in one step; the old file's companions are deleted last.

A target that exists and is not an fxpress artifact is refused unless `overwrite=True`, and every check of
the destination (`check_target`) runs before any lowering work and names the user's path, not a temp one.
A filesystem error while writing (disk full, permissions) is raised as ArtifactError naming the user's path;
the staging folder is removed and the old artifact is left as it was.
`STEP_HOOKS` are called at each step (`staging`, `staged`, `aside`, `swapped`, `companion`, `published`,
`cleaned`): the fault-injection tests kill the process there.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fxpress.artifact_names import DIR_MARKERS, METADATA_KEY, RECIPE_KEY
from fxpress.errors import ArtifactError, ConfigError

STAGE_TAG, ASIDE_TAG = ".fxpress-new-", ".fxpress-old"
STEP_HOOKS: list[Callable[[str], None]] = []


def _step(name: str) -> None:
    for hook in STEP_HOOKS:
        hook(name)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}{ASIDE_TAG}")


def is_fxpress_artifact(path: str | os.PathLike) -> bool:
    """True for a directory, ONNX file or recipe fxpress wrote (an empty directory counts: nothing to lose)."""
    path = Path(path)
    if path.is_dir():
        return not any(path.iterdir()) or any(_json_field(path / m, "format") == f for m, f in DIR_MARKERS.items())
    if not path.is_file():
        return False
    if path.suffix == ".json":  # the recipe saved beside every export
        return _json_field(path, RECIPE_KEY) is not None
    return path.suffix == ".onnx" and _is_fxpress_onnx(path)


def _json_field(path: Path, key: str) -> object:
    """`key` of the JSON object in `path`; None when the file is missing, not JSON or has no such key."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _is_fxpress_onnx(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a protobuf at all: not ours
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def _onnx_companions(path: Path) -> set[str]:
    """The external data files an ONNX model at `path` points to (names beside it)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not path.is_file():
        return set()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


def check_target(path: str | os.PathLike, *, directory: bool, overwrite: bool = False) -> Path:
    """Refuse a destination that cannot or must not be written, before any work; returns it as a Path."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        want, got = ("a directory", "a file") if directory else ("a file", "a directory")
        raise ConfigError(f"'{path}' is {got}, but this artifact is {want}: give another path")
    if path.exists() and not overwrite and not is_fxpress_artifact(path):
        what = "a non-empty directory" if directory else "a file"
        raise ConfigError(f"'{path}' is {what} that fxpress did not write: refusing to replace it; give another "
                          f"path, or pass overwrite=True (--overwrite) to replace it")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write '{path}': '{parent}' is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write '{path}': '{parent}' is not writable; choose a writable location")
    return path


def recover(target: str | os.PathLike) -> None:
    """Finish what a run that died left behind: restore or drop `.<name>.fxpress-old`, drop dead stages."""
    target = Path(target)
    aside = _aside(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, target)
    if target.parent.is_dir():
        for stage in target.parent.glob(f".{glob.escape(target.name)}{STAGE_TAG}*"):
            if not _alive(stage.name.rsplit("-", 2)[-2]):
                shutil.rmtree(stage, ignore_errors=True)
        if target.suffix == ".onnx":
            _drop_orphans(target)


def _drop_orphans(target: Path) -> None:
    """Companions (`companion_name`) of `target` that it does not point to: a write died before its rename."""
    keep = _onnx_companions(target)
    unique = re.compile(re.escape(target.name) + r"\.[0-9a-f]{12}\.[^.]+$")
    for path in target.parent.glob(f"{glob.escape(target.name)}.*"):
        if unique.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    """Whether the process that made a stage still runs (its stage is then left alone)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _stage(target: Path, overwrite: bool, directory: bool) -> Iterator[Path]:
    """A fresh staging folder beside `target`, removed whatever happens; the body publishes from it."""
    check_target(target, directory=directory, overwrite=overwrite)
    recover(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGE_TAG}{os.getpid()}-", dir=target.parent))
    try:
        _step("staging")
        yield stage
    except OSError as err:  # it names the staging path, which means nothing to the user
        reason = err.strerror or type(err).__name__
        raise ArtifactError(f"could not write '{target}': {reason}; what was at '{target}' is unchanged") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory to fill; on success it replaces `target` (see the module docstring)."""
    target = Path(target)
    with _stage(target, overwrite, directory=True) as stage:
        new = stage / "artifact"
        new.mkdir()
        yield new
        _step("staged")
        check_target(target, directory=True, overwrite=overwrite)  # nobody put a file there meanwhile
        _publish_dir(new, target, stage)


def _publish_dir(new: Path, target: Path, stage: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        _step("published")
    elif _exchange(new, target):  # target now new; `new` holds the old one, inside the stage
        _step("swapped")
    else:
        aside = _aside(target)
        os.rename(target, aside)
        _step("aside")
        try:
            os.rename(new, target)
        except OSError:
            os.rename(aside, target)
            raise
        _step("published")
        shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)
    _step("cleaned")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def staged_file(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield the staging path of `target`; files written beside it there (companions) are published with it.

    Companions must be named uniquely per write (`companion_name`), so the new ones never clobber the
    old file's; the old file's companions (ONNX external data) are deleted only after the rename.
    """
    target = Path(target)
    with _stage(target, overwrite, directory=False) as stage:
        yield stage / target.name
        _step("staged")
        check_target(target, directory=False, overwrite=overwrite)
        old = _onnx_companions(target) if target.suffix == ".onnx" else set()
        for companion in sorted(p for p in stage.iterdir() if p.name != target.name):
            os.replace(companion, target.parent / companion.name)
            _step("companion")
        os.replace(stage / target.name, target)
        _step("published")
        for name in old - _onnx_companions(target):
            (target.parent / name).unlink(missing_ok=True)
        _step("cleaned")


def companion_name(target: str | os.PathLike, suffix: str) -> str:
    """A companion file name unique to this write, e.g. `model.onnx.3f9a0c1d2e4b.data`."""
    return f"{Path(target).name}.{uuid.uuid4().hex[:12]}{suffix}"


def write_atomic(path: str | os.PathLike, text: str, mode: str = "w") -> None:
    """Write a small file through a temporary file in the same folder, then rename: never a partial file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
