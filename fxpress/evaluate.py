"""Quality the way the field reports it: perplexity over fixed windows, KL divergence and top-1 agreement."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    return tqdm(windows.split(batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def perplexity(fn: LogitsFn, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every position of every window (no overlap, no context carry-over)."""
    total_nll, total_tokens = 0.0, 0
    for batch in _batches(windows, batch_size, "perplexity", progress):
        logits = fn(batch).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def compare_logits(
    ref_fn: LogitsFn, fn: LogitsFn, windows: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> dict[str, float]:
    """Mean per-token KL(ref || test) and the fraction of positions whose argmax agrees."""
    kl_sum, agree, count = 0.0, 0, 0
    for batch in _batches(windows, batch_size, "compare", progress):
        ref = F.log_softmax(ref_fn(batch).float(), dim=-1)
        test = F.log_softmax(fn(batch).float(), dim=-1)
        kl_sum += float((ref.exp() * (ref - test)).sum(-1).sum())
        agree += int((ref.argmax(-1) == test.argmax(-1)).sum())
        count += batch.numel()
    return {"kl": kl_sum / count, "top1": agree / count}


def evaluate(
    fn: LogitsFn, windows: torch.Tensor, ref_fn: LogitsFn | None = None, batch_size: int = 4, progress: bool = False
) -> dict[str, float]:
    """Perplexity, and KL/top-1 against `ref_fn` when one is given."""
    result = {"perplexity": perplexity(fn, windows, batch_size, progress)}
    if ref_fn is not None:
        result.update(compare_logits(ref_fn, fn, windows, batch_size, progress))
    return result


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose highest-scoring class is the label: the classifiers' quality measure."""
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def window_metrics(ref_fn: LogitsFn, fns: dict[str, LogitsFn], windows: torch.Tensor,
                   batch_size: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Per fn and window [n]: mean next-token NLL, mean KL(ref || fn) and top-1 agreement, for paired tests.
    One reference forward per batch serves every fn (the reference logits of a long split would not fit)."""
    out = {name: {"nll": [], "kl": [], "top1": []} for name in fns}
    for batch in windows.split(batch_size):
        ref = F.log_softmax(ref_fn(batch).double(), -1)
        for name, fn in fns.items():
            logp = F.log_softmax(fn(batch).double(), -1)
            out[name]["nll"].append(-logp[:, :-1].gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1).mean(1))
            out[name]["kl"].append((ref.exp() * (ref - logp)).sum(-1).mean(1))
            out[name]["top1"].append((ref.argmax(-1) == logp.argmax(-1)).double().mean(1))
    return {name: {k: torch.cat(v) for k, v in d.items()} for name, d in out.items()}


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, stat: str = "ppl", samples: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """stat(a) - stat(b) over the same windows and its 95% interval from resampled windows.

    `a`, `b`: per-window values (window_metrics); stat "ppl" takes exp(mean NLL), "mean" the mean (KL, top-1).
    """
    if a.shape != b.shape or a.ndim != 1 or stat not in ("ppl", "mean"):
        raise ValueError(f"paired_bootstrap needs two equal 1-D per-window tensors and stat 'ppl' or 'mean', got "
                         f"{tuple(a.shape)}, {tuple(b.shape)}, {stat!r}")
    a, b = a.double(), b.double()
    idx = torch.randint(0, len(a), (samples, len(a)), generator=torch.Generator().manual_seed(seed))

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1).exp() if stat == "ppl" else x.mean(-1)

    diff = reduce(a[idx]) - reduce(b[idx])
    lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
    return {"diff": float(reduce(a) - reduce(b)), "lo": lo, "hi": hi, "windows_better": float((a < b).double().mean())}
