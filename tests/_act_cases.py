"""Real activations at the quantizers of a tiny rotated Llama, and a program that applies every activation
quantizer configuration the clip search chose to them: shared by the ONNX and TVM lowering tests, which
check that the exported quantize_act gives the same codes as PyTorch bit for bit on the same inputs."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

import fxpress.runtime  # noqa: F401  (defines the ops)
from fxpress.calibration import Calibration, collect_activations
from fxpress.capture import capture
from fxpress.passes import FoldHadamard, Quantize, Rotate, run_passes
from fxpress.passes.quantize import ActQuant, KVQuant, WeightQuant
from fxpress.program import Program
from fxpress.zoo import tiny_causal_lm

QUANTIZE_ACT = torch.ops.fxpress.quantize_act.default


class ActConfigs(torch.nn.Module):
    """Every (bits, clip_ratio, symmetric) in `configs` applied to the same rows, stacked."""

    def __init__(self, configs: list[tuple[int, float, bool]]):
        super().__init__()
        self.configs = configs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.ops.fxpress.quantize_act(x, b, c, s) for b, c, s in self.configs])


def searched_act_case(symmetric: bool = True) -> tuple[Program, torch.Tensor]:
    """(program over the searched configurations, real hidden-width activations [rows, hidden])."""
    program, rows = _searched_act_case(symmetric)
    return copy.deepcopy(program), rows.clone()


@lru_cache(maxsize=2)
def _searched_act_case(symmetric: bool) -> tuple[Program, torch.Tensor]:
    program = capture(tiny_causal_lm("llama", seed=0))
    gen = torch.Generator().manual_seed(0)
    vocab = program.info.vocab_size
    program.calibration = Calibration(torch.randint(0, vocab, (8, 32), generator=gen))
    run_passes(program, [Rotate(), FoldHadamard(), Quantize(weights=WeightQuant(bits=None),
                                                            activations=ActQuant(bits=4, clip_search=True, symmetric=symmetric),
                                                            kv_cache=KVQuant(bits=4, clip_ratio=0.95))],
               progress=False)
    hidden = program.info.hidden_size
    nodes = [n for n in program.graph.nodes if n.target is QUANTIZE_ACT]
    wide = [n for n in nodes if n.meta["val"].shape[-1] == hidden]
    configs = sorted({tuple(n.args[1:]) for n in nodes} | {(4, 0.95, not symmetric)})
    ids = torch.randint(0, vocab, (4, 24), generator=gen)
    found = collect_activations(program, [n.args[0].name for n in wide], [ids])
    rows = torch.cat([t.reshape(-1, hidden) for ts in found.values() for t in ts])
    return capture(ActConfigs(configs), (rows[:8],)), rows
