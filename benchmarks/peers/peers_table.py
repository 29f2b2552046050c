"""The side-by-side table: every tool's per-window NLLs, paired bootstraps over windows (95% intervals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from quality_protocol import write_atomic

BOOTSTRAP = 10_000


def load_rows(folder: Path) -> tuple[dict, dict]:
    """{tool: {row: entry}} from every JSON in the folder, and {tool: fp32 per-window NLLs by text}."""
    rows: dict = {}
    fp: dict = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        tool = f"{data['peer']} {data['version']}"
        rows.setdefault(tool, {}).update(data["rows"])
        fp[tool] = data["fp32"] or fp.get(tool)
        fp["tokens"] = data["tokens_per_window"]
    with_fp = [v for k, v in sorted(fp.items(), key=lambda kv: not kv[0].startswith("fxpress")) if k != "tokens" and v]
    reference = with_fp[0]  # fxpress's fp32 windows, else any tool's: the same weights
    return rows, {k: v or reference for k, v in fp.items()}


def ratio_interval(nll_a: list[float], nll_b: list[float], tokens: int) -> tuple[float, float, float]:
    """Perplexity ratio a/b over all windows and its 95% paired-bootstrap interval (windows resampled)."""
    a, b = torch.tensor(nll_a, dtype=torch.float64), torch.tensor(nll_b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(a), (BOOTSTRAP, len(a)), generator=gen)
    boot = ((a[idx] - b[idx]).sum(1) / (len(a) * tokens)).exp()
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float((a - b).sum()) / (len(a) * tokens)), lo, hi


def ppl(nll: list[float], tokens: int) -> float:
    return math.exp(sum(nll) / (len(nll) * tokens))


def setting_of(row: str) -> str:
    return row.split("+")[0]


def text_table(text: str, rows: dict, fp: dict) -> list[str]:
    """One text: per setting, every tool's perplexity and ratio to its own fp32 (same windows)."""
    tokens = fp["tokens"]
    ref = next(iter(v for k, v in fp.items() if k.startswith("fxpress")), None) or next(
        v for k, v in fp.items() if k != "tokens")
    lines = [f"\n### {text}: fp32 perplexity {ppl(ref[text], tokens):.3f}\n\n",
             "| setting | tool | variant | perplexity | ratio to fp32 [95% CI] |\n|---|---|---|---|---|\n"]
    settings = sorted({setting_of(r) for tool in rows.values() for r in tool}, key=_order)
    for setting in settings:
        for tool, entries in sorted(rows.items(), key=lambda kv: (not kv[0].startswith("fxpress"), kv[0])):
            for name, entry in entries.items():
                if setting_of(name) != setting:
                    continue
                variant = name.partition("+")[2] or "-"
                if "error" in entry:
                    first = entry["error"].split(". ")[0][:200]  # the JSON keeps the whole message
                    lines.append(f"| {setting} | {tool} | {variant} | cannot run: {first} | |\n")
                    continue
                r, lo, hi = ratio_interval(entry["nll"][text], fp[tool][text], tokens)
                lines.append(f"| {setting} | {tool} | {variant} | {ppl(entry['nll'][text], tokens):.3f} | "
                             f"{r:.3f}x [{lo:.3f}, {hi:.3f}] |\n")
    return lines


def _order(setting: str) -> tuple[int, str]:
    known = ["W4A16_g128", "W4A16_g64", "W4A16_ch", "W3A16_g128", "W8A8", "W4A8", "W4A4", "W4A4KV4"]
    return (known.index(setting) if setting in known else len(known), setting)


def best(entries: list[tuple[str, str, dict]], text: str, tokens: int) -> tuple[str, dict] | None:
    ok = [(f"{tool} {name.partition('+')[2]}".strip(), e) for tool, name, e in entries if "nll" in e]
    return min(ok, key=lambda te: sum(te[1]["nll"][text])) if ok else None


def verdicts(texts: list[str], rows: dict, fp: dict) -> list[str]:
    """Per setting and text: fxpress's best row against the best peer row, paired over windows."""
    tokens = fp["tokens"]
    lines = ["\n## fxpress's best against the best peer (paired over windows)\n\n",
             "| setting | text | fxpress best | best peer | fxpress / peer perplexity [95% CI] | verdict |\n"
             "|---|---|---|---|---|---|\n"]
    settings = sorted({setting_of(r) for tool in rows.values() for r in tool}, key=_order)
    for setting in settings:
        mine = [(t, n, e) for t, es in rows.items() if t.startswith("fxpress") for n, e in es.items()
                if setting_of(n) == setting]
        theirs = [(t, n, e) for t, es in rows.items() if not t.startswith("fxpress") for n, e in es.items()
                  if setting_of(n) == setting]
        for text in texts:
            a, b = best(mine, text, tokens), best(theirs, text, tokens)
            if a is None or b is None:
                continue
            r, lo, hi = ratio_interval(a[1]["nll"][text], b[1]["nll"][text], tokens)
            verdict = "fxpress wins" if hi < 1 else "fxpress loses" if lo > 1 else "tie (interval holds 1)"
            lines.append(f"| {setting} | {text} | {a[0]} | {b[0]} | {r:.3f} [{lo:.3f}, {hi:.3f}] | {verdict} |\n")
    return lines


TABLE_HEADING = "## Perplexity by tool and setting\n"


def write_table(folder: Path, texts: dict, out: str | None) -> str:
    """The tables, printed and written to `out` below whatever `out` already holds above them (the runs' notes)."""
    rows, fp = load_rows(folder)
    lines = [TABLE_HEADING + "\nEach ratio is to the tool's own fp32 run on the same windows "
             "(tools that skipped it with --no-fp32 are paired with fxpress's, else another tool's: the same weights; "
             "llm-compressor's venv (transformers 5.17) and HQQ's (5.24) gave identical fp32 window NLLs).\n"]
    for text in texts:
        lines += text_table(text, rows, fp)
    lines += verdicts(list(texts), rows, fp)
    md = "".join(lines)
    print(md)
    if out:
        notes = Path(out).read_text().partition(TABLE_HEADING)[0] if Path(out).is_file() else ""
        write_atomic(out, notes + md)
    return md
