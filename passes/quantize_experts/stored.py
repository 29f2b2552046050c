"""Expert weights swapped in while a measurement runs, the same way for in-memory and store-backed programs.

A store-backed program's parameters are placeholders, so quantized matrices cannot be copied into them in
place: the measurement runs on a clone of the weight store (files shared, the overlay copied by reference)
that holds the swapped tensors, and the program's own store is put back afterwards, untouched. An in-memory
program gets the swapped tensors with `set_param` and its original tensors back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from fxpress.errors import ConfigError
from fxpress.graph import ExpertLayer, LinearUse, get_param, set_param
from fxpress.passes.quantize.gptq import QuantizedWeight, WeightSpec
from fxpress.spill import SpillFolder
from fxpress.weights import attach_store, format_bytes, weight_store


@contextmanager
def swapped_params(gm: torch.fx.GraphModule, values: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                   ) -> Iterator[None]:
    """While the block runs, each attribute target in `values` reads that tensor; afterwards the original.

    `values` may be a generator of (target, tensor): a store-backed program then takes them one at a time.
    """
    pairs = values.items() if isinstance(values, Mapping) else values
    store = weight_store(gm)
    if store is not None:
        trial = store.clone()
        for target, value in pairs:
            trial.set(target, value)  # spilled beyond the budget like any rewrite
        attach_store(gm, trial)
        try:
            yield
        finally:
            attach_store(gm, store)
        return
    saved = {}
    for target, value in pairs:
        saved.setdefault(target, get_param(gm, target))
        set_param(gm, target, value)
    try:
        yield
    finally:
        for target, value in saved.items():
            _put_back(gm, target, value)


def _put_back(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Restore the very tensor object (a Parameter keeps its requires_grad and identity)."""
    prefix, _, name = target.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    if name in owner._parameters:
        owner._parameters[name] = value
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def expert_uses(layer: ExpertLayer) -> list[tuple[int, LinearUse]]:
    """(expert, projection use) for every routed expert projection of the layer."""
    if layer.fused:
        return [(e, u) for u in [*layer.up, layer.down] for e in range(layer.num_experts)]
    return [(e, u) for e, ex in enumerate(layer.experts) for u in (*ex.up, ex.down)]


def replaced_experts(gm: torch.fx.GraphModule, layer: ExpertLayer, changes: dict[tuple[int, str], torch.Tensor],
                     proj_of) -> dict[str, torch.Tensor]:
    """The layer's expert parameters with expert e's projection p set to `changes[(e, p)]` ([out, in]).

    A fused 3-D parameter is read once and copied once, however many of its experts change.
    """
    out: dict[str, torch.Tensor] = {}
    for e, use in expert_uses(layer):
        weight = changes.get((e, proj_of(use)))
        if weight is None:
            continue
        target = str(use.weight.target)
        if target not in out:
            out[target] = get_param(gm, use.weight).detach().clone()
        param = out[target]
        weight = weight if use.in_axis == -1 else weight.T
        index = use.expert if use.expert is not None else (e if param.dim() == 3 else None)
        if index is None:
            out[target] = weight.to(param.dtype).clone()
        else:
            param[index] = weight.to(param.dtype)
    return out


def check_streams(program, sensitivity: str) -> None:
    """Refuse, before any work, a full-model gradient analysis on a store-backed program over its budget.

    The sampled-Fisher sensitivities back-propagate from the logits to every expert output at once, so every
    weight of the model is held until the backward pass ends: that cannot stay within a block.
    """
    store = program.weights
    if store is None or store.budget is None:
        return
    total = store.total_bytes()
    if total <= store.budget:
        return
    raise ConfigError(
        f"quantize_experts: analysis.sensitivity={sensitivity!r} back-propagates through the whole model, which "
        f"holds all {format_bytes(total)} of its weights at once, more than the memory budget "
        f"({format_bytes(store.budget)}): use analysis.sensitivity='output' (or 'kl', slower), or "
        "budget.allocation='frequency' or 'uniform', which run block by block; or raise max_memory above "
        f"{format_bytes(total)}")


class SpilledCandidates(Mapping):
    """One layer's kept candidate matrices ((expert, projection, bits) -> QuantizedWeight) in one spill file.

    Measured plan selection keeps every layer's matrices at every bit width until the plan is chosen: for a
    store-backed program that is bit-widths x the experts' parameters in bytes (3.3 GB on a 1.2B Mixtral),
    more than its budget. On disk, a plan reads them back one layer at a time, as the rewrite does.
    """

    def __init__(self, kept: Mapping[tuple[int, str, int], QuantizedWeight], folder: SpillFolder) -> None:
        tensors: dict[str, torch.Tensor] = {}
        self._meta: dict[tuple[int, str, int], tuple[int, WeightSpec, int]] = {}
        for i, (key, qw) in enumerate(kept.items()):
            for part in ("codes", "scales", "zeros"):
                tensors[f"{i}.{part}"] = getattr(qw, part).contiguous()
            self._meta[key] = (i, qw.spec, qw.block_size)
        self._path, self._refs = folder.write(tensors) if tensors else (None, {})

    def __getitem__(self, key: tuple[int, str, int]) -> QuantizedWeight:
        i, spec, block_size = self._meta[key]
        codes, scales, zeros = (SpillFolder.load(self._refs[f"{i}.{part}"]) for part in ("codes", "scales", "zeros"))
        return QuantizedWeight(codes, scales, zeros, spec, block_size)

    def __iter__(self) -> Iterator[tuple[int, str, int]]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def clear(self) -> None:
        """Forget the matrices and delete their file."""
        if self._path is not None:
            SpillFolder.remove(self._path)
        self._meta, self._refs, self._path = {}, {}, None
