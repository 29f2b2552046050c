"""Running a graph whose weights live in a store: each weight is read when its node runs and dropped after."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxpress.graph.editing import get_param


class _StoredWeights(torch.fx.Interpreter):
    """An Interpreter that reads get_attr values through the weight store (freed after their last use)."""

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return get_param(self.module, str(target))


def run_graph(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> Any:
    """The graph's outputs for `inputs`, reading stored weights on demand."""
    with torch.no_grad():
        return _StoredWeights(gm).run(*inputs)
