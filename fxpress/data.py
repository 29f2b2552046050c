"""Real text for calibration, evaluation and training, shipped by Debian packages (written by people).

The Debian package `python3-doc` installs the reStructuredText sources of the CPython manual
(about 12 MB of English). Splits are disjoint directories, so calibration never sees evaluation text:

- "eval": the tutorial (perplexity, KL, top-1 agreement)
- "calib": the HOWTOs (calibration for GPTQ, DFRot, routers)
- "heldout": the FAQ (schedules and model selection)
- "train": the library reference (training small models such as the MoE)

A second text from another domain, narrative prose rather than technical writing about code, keeps a
headline from being tuned to one corpus: the King James Bible of the Debian package `bible-kjv-text`,
read through its `bible` program (package `bible-kjv`). Its splits are disjoint books with no parallel
passages between them:

- "prose_eval": Genesis
- "prose_calib": the Gospel of Luke
- "prose_heldout": the Acts of the Apostles

`mixed_windows` draws calibration from both domains ("calib" + "prose_calib"): what `make demo` calibrates on.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from functools import lru_cache

import torch

from fxpress.errors import FxpressError
from fxpress.heap import trim_heap

DOC_SPLITS = {"eval": ["tutorial"], "calib": ["howto"], "heldout": ["faq"], "train": ["library"]}
# split -> the `bible` program's verse range of one whole book
PROSE_SPLITS = {"prose_eval": "Genesis1:1-50:26", "prose_calib": "Luke1:1-24:53", "prose_heldout": "Acts1:1-28:31"}
SPLITS = {**DOC_SPLITS, **PROSE_SPLITS}
VERSE_LABEL = re.compile(r"^\S+?\d+:\d+ ", re.MULTILINE)
DOC_GLOB = "/usr/share/doc/python3*/html/_sources"


def docs_root() -> str:
    """The installed python3-doc sources; FXPRESS_TEXT_ROOT overrides the location."""
    override = os.environ.get("FXPRESS_TEXT_ROOT")
    candidates = [override] if override else sorted(glob.glob(DOC_GLOB), reverse=True)
    for root in candidates:
        if root and os.path.isdir(os.path.join(root, "tutorial")):
            return root
    raise FxpressError(
        "no evaluation text found: fxpress reads the Python manual shipped by the Debian package "
        "python3-doc; install it with `apt-get install python3-doc` (or set FXPRESS_TEXT_ROOT to a "
        "folder with tutorial/, howto/, faq/ and library/ .rst.txt files)"
    )


def prose_text(verses: str) -> str:
    """One book of the King James Bible as plain prose: a verse per line, verse labels removed."""
    program = shutil.which("bible")
    if program is None:
        raise FxpressError(
            "no prose evaluation text found: the \"prose_*\" splits read the King James Bible shipped by the "
            "Debian packages bible-kjv and bible-kjv-text; install them with `apt-get install bible-kjv` "
            "(or `make install`)"
        )
    run = subprocess.run([program, "-f", "-l1000000", verses], capture_output=True, text=True)
    text = VERSE_LABEL.sub("", run.stdout).strip()
    if run.returncode != 0 or not text:
        raise FxpressError(f"the `bible` program gave no text for '{verses}' ({run.stderr.strip()[:200]}): "
                           "reinstall the Debian packages bible-kjv and bible-kjv-text")
    return text


@lru_cache(maxsize=8)
def corpus_text(split: str) -> str:
    """All text of one split: for the manual, files in sorted order joined by blank lines."""
    if split not in SPLITS:
        raise FxpressError(f"unknown text split '{split}': choose one of {', '.join(SPLITS)}")
    if split in PROSE_SPLITS:
        return prose_text(PROSE_SPLITS[split])
    root = docs_root()
    files: list[str] = []
    for sub in DOC_SPLITS[split]:
        files += sorted(glob.glob(os.path.join(root, sub, "**", "*.rst.txt"), recursive=True))
    parts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read().strip())
    return "\n\n".join(parts)


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """The split tokenized once as one long 1-D LongTensor."""
    ids = tokenizer(corpus_text(split), return_tensors="pt", add_special_tokens=False).input_ids[0].long()
    trim_heap()  # the tokenizer's per-token records are freed: give their pages back (a memory budget counts them)
    return ids


def token_windows(tokenizer, split: str = "eval", seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping fixed windows [n, seq_len] from the start of a split: the field's perplexity protocol."""
    ids = token_stream(tokenizer, split)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise FxpressError(f"split '{split}' has fewer than {seq_len} tokens")
    return ids[: n * seq_len].view(n, seq_len)


MIXED_CALIB = ("calib", "prose_calib")  # the demo's calibration: technical writing and narrative prose


def mixed_windows(tokenizer, splits: tuple[str, ...] = MIXED_CALIB, seq_len: int = 128, windows: int = 64) -> torch.Tensor:
    """`windows` windows spread evenly over `splits` (the first ones of each; the first splits take the remainder).

    GPTQ calibrated on one domain generalises poorly to another (W4A16 g128 on SmolLM2: HOWTO-only calibration
    gives 1.70x fp32 perplexity on Genesis, half HOWTOs + half Luke 1.21x at the same cost on the Python
    tutorial; `benchmarks/bench_calibration_domain.py`), so a general-purpose calibration set spans both.
    """
    if not splits or windows < len(splits):
        raise FxpressError(f"mixed_windows needs at least one window per split: {windows} windows for {len(splits)} splits")
    counts = [windows // len(splits) + (i < windows % len(splits)) for i in range(len(splits))]
    return torch.cat([token_windows(tokenizer, split, seq_len, n) for split, n in zip(splits, counts)])


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a 1347 / 450 stratified split of scikit-learn's 8x8 digits.

    The threshold-neuron example, tests and FPGA benchmark share this split, so their accuracies compare.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte
