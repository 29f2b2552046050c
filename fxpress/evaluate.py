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
