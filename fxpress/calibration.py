"""Calibration data, gathered by running the graph (`fxpress.execute`) rather than hooks scattered in the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx

from fxpress.checks import check_finite
from fxpress.errors import ConfigError
from fxpress.execute import Executor

if TYPE_CHECKING:
    from fxpress.program import ModelInfo, Program


@dataclass
class Calibration:
    """Calibration samples: token ids [N, S] for language models, or input tensors [N, ...] otherwise."""

    batches: torch.Tensor
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.batches, torch.Tensor) or self.batches.dim() < 2 or self.batches.shape[0] == 0:
            raise ConfigError(
                "calibration must be a non-empty tensor [samples, ...] (for language models: token ids "
                "[samples, seq_len], e.g. fxpress.data.token_windows(tokenizer, 'calib', 256, 32))"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"calibration batch_size is {self.batch_size!r}: give a whole number of samples >= 1")

    def __len__(self) -> int:
        return self.batches.shape[0]

    def chunks(self, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The samples in mini-batches of `batch_size`, at most `limit` samples in all."""
        data = self.batches if limit is None else self.batches[:limit]
        yield from data.split(self.batch_size)


def as_calibration(data: object) -> Calibration | None:
    """Accept a Calibration, a tensor, or a non-empty list of equally shaped tensors (one per sample)."""
    if data is None or isinstance(data, Calibration):
        return data
    if isinstance(data, torch.Tensor):
        return Calibration(data)
    if isinstance(data, (list, tuple)):
        return Calibration(torch.stack(_checked_samples(data)))
    raise ConfigError(f"calibration must be a tensor or fxpress.calibration.Calibration, got {type(data).__name__}")


def _checked_samples(data: list | tuple) -> list[torch.Tensor]:
    """The samples of a calibration list, each a tensor of the first one's shape and dtype (errors name the index)."""
    if not data:
        raise ConfigError("calibration is an empty list: give at least one sample (token ids [seq_len] each)")
    for i, sample in enumerate(data):
        if not isinstance(sample, torch.Tensor):
            raise ConfigError(f"calibration[{i}] is a {type(sample).__name__}, not a tensor: give tensors of token ids")
        first = data[0]
        if sample.shape != first.shape or sample.dtype != first.dtype:
            raise ConfigError(
                f"calibration[{i}] has shape {tuple(sample.shape)} ({sample.dtype}), calibration[0] has "
                f"{tuple(first.shape)} ({first.dtype}): samples must have equal lengths; cut them into equal windows "
                "(fxpress.data.token_windows) or pad them"
            )
    return list(data)


def validate_calibration(calibration: Calibration, info: ModelInfo) -> None:
    """Check calibration data against the captured model once, before any pass uses it.

    Causal LMs need integer token ids [samples, seq_len] inside the vocabulary and the sequence limit;
    other models need finite float samples when they are float.
    """
    from fxpress.inputs import check_length, check_token_ids

    batches = calibration.batches
    if info.kind != "causal_lm":
        check_finite(((f"calibration[{i}]", s) for i, s in enumerate(batches)), "calibration sample", ConfigError,
                     "remove or fix the sample")
        return
    if batches.dim() != 2:
        raise ConfigError(f"calibration has shape {tuple(batches.shape)}: a causal LM needs token ids [samples, seq_len]")
    check_token_ids(batches, None, "calibration")
    for i, sample in enumerate(batches):  # one sample at a time, so the error names it
        check_token_ids(sample, info.vocab_size, f"calibration[{i}]",
                        "tokenize the calibration text with the model's own tokenizer")
    check_length(info, batches.shape[1], name="calibration", fix="use shorter calibration windows")


def program_inputs(program: Program, samples: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The full graph inputs for a batch of samples (an empty KV cache for causal LMs)."""
    if program.is_causal_lm:
        keys, values = program.empty_cache(samples.shape[0])
        return (samples, keys, values)
    return (samples,)


class _Recorder(Executor):
    """Hands the wanted nodes' values on every chunk to a callback (on the CPU), refusing NaN/inf first."""

    def __init__(self, program: Program, wanted: list[torch.fx.Node], callback: Callable[[str, torch.Tensor], None]):
        super().__init__(program.module, device=program.device, activation_budget=program.activation_budget)
        self.observed = wanted
        self.callback = callback

    def observe(self, node: torch.fx.Node, index: int, value: object) -> None:
        if isinstance(value, torch.Tensor):
            check_finite([(node.name, value)], f"on calibration batch {index} the activation", ConfigError,
                         "the weights or the calibration data overflow; check both (fxpress refuses to calibrate on NaN)")
            self.callback(node.name, value.detach().cpu())


def for_each_activation(
    program: Program, node_names: Iterable[str], callback: Callable[[str, torch.Tensor], None],
    samples: Iterable[torch.Tensor] | None = None,
) -> None:
    """Call `callback(node_name, tensor)` for every wanted node on every calibration batch.

    Use this to accumulate statistics (Hessians, ranges) without keeping activations in memory. The graph
    runs node-major (`fxpress.execute`): the callback sees one node on every batch (in batch order), then
    the next node; the run stops after the last wanted node. Every rank runs every batch: callers that
    split batches across ranks (`fxpress.distributed.shard`) must all-reduce what they gather.
    """
    wanted = set(node_names)
    nodes = [n for n in program.graph.nodes if n.name in wanted]
    missing = wanted - {n.name for n in nodes}
    if missing:
        raise ConfigError(f"no nodes named {sorted(missing)[:5]} in the graph")
    if samples is None:
        if program.calibration is None:
            raise ConfigError("this step needs calibration data: pass calibration=... to fxpress.compile")
        samples = program.calibration.chunks()
    chunks = [program_inputs(program, batch) for batch in samples]
    _Recorder(program, nodes, callback).run(chunks, until=nodes)


def collect_activations(
    program: Program, node_names: Iterable[str], samples: Iterable[torch.Tensor] | None = None
) -> dict[str, list[torch.Tensor]]:
    """The outputs of the named nodes on each calibration batch (kept in memory: use for few nodes)."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in node_names}
    for_each_activation(program, store.keys(), lambda name, t: store[name].append(t), samples)
    return store
