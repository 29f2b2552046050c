"""SHA-256 digests of an artifact's files (and of each tensor in its safetensors files), recorded when it is
written and checked before it is read, so a flipped bit or an edited header is an ArtifactError, not wrong logits.

The whole-file digest is the check; per-tensor digests are only recomputed when a file differs, to name the
tensor. They guard against corruption and accidental edits, not against someone who also rewrites the manifest.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fxpress.errors import ArtifactError

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensor_sha256(path: Path) -> dict[str, str]:
    """SHA-256 of each tensor's bytes in a safetensors file, read through the file's own header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > path.stat().st_size:
            raise ValueError(f"header size {size} exceeds the file")
        header = json.loads(f.read(size))
        digests = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            f.seek(8 + size + start)
            h = hashlib.sha256()
            left = end - start
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            digests[name] = h.hexdigest()
    return digests


def record_digests(directory: Path, files: Iterable[str]) -> dict[str, Any]:
    """The manifest's "integrity" entry: a digest per file, and per tensor for each .safetensors file."""
    directory = Path(directory)
    files = list(files)
    return {
        "sha256": {name: file_sha256(directory / name) for name in files},
        "tensors": {name: tensor_sha256(directory / name) for name in files if name.endswith(".safetensors")},
    }


def changed_names(recorded: dict[str, str], actual: dict[str, str]) -> str:
    """The names whose digests differ (added, removed or changed), at most five shown; '' when none."""
    changed = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
    return ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def _changed_tensors(path: Path, recorded: dict[str, str]) -> str:
    """Which tensors differ from the recorded digests (or '' when none were recorded or the header is unreadable)."""
    if not recorded:
        return ""
    try:
        shown = changed_names(recorded, tensor_sha256(path))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return ""
    return f" (tensors changed: {shown})" if shown else ""


def verify_digests(directory: Path, integrity: dict[str, Any] | None, what: str) -> None:
    """Check each recorded file against its digest; warn (and check nothing) for artifacts saved without them."""
    directory = Path(directory)
    if not integrity:
        warnings.warn(f"{what} '{directory}' has no recorded digests (saved by an older fxpress): its files cannot be "
                      "verified; save or export it again to record them", stacklevel=3)
        return
    if not isinstance(integrity, dict) or not isinstance(integrity.get("sha256"), dict):
        raise ArtifactError(f"{what} '{directory}': the manifest's integrity entry is malformed; save or export again")
    for name, digest in integrity["sha256"].items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise ArtifactError(f"{what} file '{path}' is missing: the artifact is incomplete; save or export it again")
        if file_sha256(path) != digest:
            tensors = _changed_tensors(path, integrity.get("tensors", {}).get(name, {}))
            raise ArtifactError(f"{what} file '{path}'{tensors} does not match the SHA-256 recorded when it was "
                                "written: it was truncated, corrupted or edited; save or export it again")
