"""The evaluation texts: the prose splits are real, disjoint and long enough for the benchmarks' protocol."""

from __future__ import annotations

import pytest
import torch

from fxpress import data
from fxpress.errors import FxpressError


def test_prose_splits_are_disjoint_and_substantial():
    texts = {split: data.corpus_text(split) for split in data.PROSE_SPLITS}
    assert all(len(t) > 100_000 for t in texts.values())
    assert texts["prose_eval"].startswith("In the beginning God created the heaven and the earth.")
    lines = {name: set(filter(None, t.splitlines())) for name, t in texts.items()}
    for a in lines:
        for b in lines:
            if a < b:  # no verse of one book is a verse of another (a handful of short repeated formulas aside)
                assert len(lines[a] & lines[b]) <= 3, (a, b, sorted(lines[a] & lines[b])[:5])
    assert not any(data.VERSE_LABEL.search(t) for t in texts.values())  # labels like "Ge1:1 " were stripped


def test_prose_is_not_the_python_manual():
    prose, manual = data.corpus_text("prose_eval"), data.corpus_text("eval")
    assert "def " not in prose and ">>>" not in prose
    assert prose[:2000] not in manual


def test_prose_windows_cover_the_benchmark_protocol(smollm2):
    tokenizer = smollm2[1]
    assert data.token_windows(tokenizer, "prose_eval", 256).shape[0] >= 64  # 16 x 256 eval windows with room
    assert data.token_windows(tokenizer, "prose_calib", 128).shape[0] >= 64  # 64 x 128 calibration windows


def test_mixed_windows_split_the_count_over_the_domains(smollm2):
    tokenizer = smollm2[1]
    mixed = data.mixed_windows(tokenizer, data.MIXED_CALIB, 128, 7)
    python, prose = data.token_windows(tokenizer, "calib", 128, 4), data.token_windows(tokenizer, "prose_calib", 128, 3)
    assert mixed.shape == (7, 128) and mixed.equal(torch.cat([python, prose]))
    with pytest.raises(FxpressError, match="at least one window per split"):
        data.mixed_windows(tokenizer, data.MIXED_CALIB, 128, 1)


def test_missing_bible_program_names_the_package(monkeypatch):
    data.corpus_text.cache_clear()
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(FxpressError, match="apt-get install bible-kjv"):
        data.corpus_text("prose_calib")
    data.corpus_text.cache_clear()


def test_unknown_split_lists_the_prose_splits():
    with pytest.raises(FxpressError, match="prose_eval"):
        data.corpus_text("poetry")
