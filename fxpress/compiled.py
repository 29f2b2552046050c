"""`fxpress.compile`: capture once, run the passes, and hand back a model that runs, reports and exports."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fxpress.atomic import check_target
from fxpress.calibration import Calibration, as_calibration
from fxpress.capture import capture
from fxpress.errors import ConfigError
from fxpress.passes.base import Pass, pass_from_dict
from fxpress.passes.manager import run_passes, validate_pipeline
from fxpress.program import MODEL_DTYPES, Program
from fxpress.recipe import passes_from_recipe, recipe_dict, save_recipe
from fxpress.report import Report
from fxpress.runtime.ops import EXPORT_TARGETS


def _as_passes(passes: Sequence[Any]) -> list[Pass]:
    """Accept Pass objects, registered names, or recipe entries ({"type": ..., "fields": ...})."""
    import fxpress.passes  # noqa: F401  (registers the built-in passes)

    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(pass_from_dict({"type": p}))
        elif isinstance(p, dict):
            out.extend(passes_from_recipe([p]))
        else:
            raise ConfigError(f"{p!r} is not a pass: give Pass objects, pass names, or recipe entries")
    return out


class CompiledModel:
    """A captured and rewritten model: call it, read `.report`, `.export(...)` it, `.save(...)` it."""

    def __init__(self, program: Program, passes: Sequence[Pass]):
        self.program = program
        self.passes = list(passes)
        self.exports: dict[str, Any] = {}  # target -> what the lowering reported (sizes, kernels, resources)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.program(*inputs)

    @property
    def report(self) -> Report:
        return Report(self.program.report)

    @property
    def recipe(self) -> dict[str, Any]:
        return recipe_dict(self.passes)

    def export(self, target: str, path: str | os.PathLike, overwrite: bool = False, **options: Any) -> Path:
        """Lower to `target` ("onnx", "tvm", "hls"/"fpga") at `path`; the recipe is saved beside it.

        `path` is checked before any lowering work: a file or folder there that fxpress did not write is
        refused unless `overwrite=True`; an fxpress artifact there is replaced atomically.
        """
        if target not in EXPORT_TARGETS:
            raise ConfigError(f"unknown export target '{target}': choose one of {', '.join(EXPORT_TARGETS)}")
        path = check_target(path, directory=not EXPORT_TARGETS[target].writes_file, overwrite=overwrite)
        recipe = check_target(path.with_name(path.stem + ".recipe.json"), directory=False, overwrite=overwrite)
        lower = EXPORT_TARGETS[target].export_function()
        self.exports[target] = lower(self.program, path, overwrite=overwrite, **options)
        save_recipe(self.passes, recipe)
        return path

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Graph as torch.export JSON, weights as safetensors, the recipe and report beside them; no pickle.

        A directory there that fxpress did not write is refused (before any work) unless `overwrite=True`.
        """
        from fxpress.serialize import save_program

        check_target(directory, directory=True, overwrite=overwrite)
        extra = {"recipe": self.recipe, "report": self.report.to_dict()}
        return save_program(self.program, directory, extra=extra, overwrite=overwrite)


def _model_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """compile's `dtype` argument as a torch float type, checked before any work."""
    if dtype is None:
        return None
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in MODEL_DTYPES:
        raise ConfigError(f"compile(dtype={dtype!r}) is not a float type fxpress computes in: use one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype`: a cast copy when any float tensor differs (nn.Module.to would change the caller's)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


def compile(
    model: torch.nn.Module | str,
    passes: Sequence[Any] = (),
    example_inputs: Any = None,
    calibration: Calibration | torch.Tensor | Sequence[torch.Tensor] | None = None,
    verify: bool = True,
    progress: bool = True,
    dtype: torch.dtype | str | None = None,
) -> CompiledModel:
    """Capture `model` (a module, or a model name such as "smollm2"), then run `passes` in order.

    Every pass is validated (fields, order, calibration present) before the model is even captured.
    `dtype` (e.g. torch.bfloat16): compute in that float type; None keeps the model's own (a copy is cast,
    the caller's model is left as it is). Weights stay in that dtype; the KV cache follows it.
    """
    pass_list = _as_passes(passes)
    calib = as_calibration(calibration)
    validate_pipeline(pass_list, (), calib is not None)
    cast = _model_dtype(dtype)
    source = None
    if isinstance(model, str):
        from fxpress.models import load_causal_lm

        source = model
        model = load_causal_lm(model, dtype=cast or torch.float32)[0]
    elif cast is not None:
        model = _cast(model, cast)
    program = capture(model, example_inputs, source=source)
    program.calibration = calib
    run_passes(program, pass_list, verify=verify, progress=progress)
    return CompiledModel(program, pass_list)


def load(directory: str | os.PathLike, lazy: bool | None = None) -> CompiledModel:
    """Load a model saved by CompiledModel.save; `lazy`: serve the weights from the artifact's shards (a store-backed
    program, each tensor read when needed) instead of reading them now; None decides by size (serialize.LAZY_ABOVE)."""
    from fxpress.serialize import load_program

    program, manifest = load_program(directory, lazy=lazy)
    passes = passes_from_recipe(manifest.get("recipe", {"passes": []}))
    return CompiledModel(program, passes)
