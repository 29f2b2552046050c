"""`fxpress.compile`: capture once, run the passes, and hand back a model that runs, reports and exports."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fxpress.atomic import check_target
from fxpress.budget import requested_budget
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


def is_main_rank() -> bool:
    """Whether this process writes artifacts and prints: rank 0 of the process group (or of torchrun's
    environment, before compile starts the group); always when there is neither."""
    import torch.distributed as dist

    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def _on_main_rank(write: Callable[[], Any]) -> None:
    """Run `write` on rank 0 only; the other ranks wait at a barrier until it is done (or has failed)."""
    import torch.distributed as dist

    try:
        if is_main_rank():
            write()
    finally:
        if dist.is_initialized():
            dist.barrier()


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

        def write() -> None:
            self.exports[target] = lower(self.program, path, overwrite=overwrite, **options)
            save_recipe(self.passes, recipe)

        _on_main_rank(write)
        return path

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Graph as torch.export JSON, weights as safetensors, the recipe and report beside them; no pickle.

        A directory there that fxpress did not write is refused (before any work) unless `overwrite=True`.
        """
        from fxpress.serialize import save_program

        directory = check_target(directory, directory=True, overwrite=overwrite)
        extra = {"recipe": self.recipe, "report": self.report.to_dict()}
        _on_main_rank(lambda: save_program(self.program, directory, extra=extra, overwrite=overwrite))
        return directory


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


def check_device(device: str | torch.device) -> torch.device:
    """compile's `device` as a torch.device, checked before any work: cpu, or cuda when PyTorch sees a GPU."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device: use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if where.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: fxpress calibrates on 'cpu' or 'cuda', not on {where.type}")
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but PyTorch sees no CUDA GPU (a CPU build of torch, or no driver): "
                          "use device='cpu' (--device cpu)")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but there are only {torch.cuda.device_count()} GPUs: use cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return where


def join_process_group(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1), start the process group from its environment: gloo on CPU, NCCL on CUDA.

    Each rank calibrates on its own GPU (LOCAL_RANK) when `device` is a bare 'cuda'. A group the caller
    initialised is used as it is.
    """
    import torch.distributed as dist

    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def leave_process_group() -> None:
    """End the process group torchrun's environment started (a clean exit, no gloo/NCCL warnings)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _capture(model: torch.nn.Module | str | os.PathLike, example_inputs: Any, cast: torch.dtype | None,
             stored: bool) -> Program:
    """A checkpoint directory, or any causal LM under a budget: captured without its weights (a weight store);
    otherwise the module (or the named model, loaded) captured with its weights, as before."""
    from fxpress.capture import capture_stored
    from fxpress.checkpoint import is_checkpoint_dir

    if isinstance(model, (str, os.PathLike)):
        from fxpress.models import load_causal_lm, resolve_model_path

        path = resolve_model_path(str(model)) if stored or is_checkpoint_dir(model) else None
        if path is not None and is_checkpoint_dir(path):
            return capture_stored(path, dtype=cast)
        module = load_causal_lm(str(model), dtype=cast or torch.float32, tokenizer=False)[0]
        program = capture_stored(module) if stored else capture(module, example_inputs)
        program.info.source = str(model)
        return program
    if stored:
        return capture_stored(model, dtype=cast)
    return capture(_cast(model, cast) if cast is not None else model, example_inputs)


def _plan_budget(program: Program, max_memory: int | None, passes: list[Pass], calib: Calibration | None) -> None:
    """Split `max_memory` between the weight store's overlay and calibration activations (fxpress.budget)."""
    if max_memory is None or program.weights is None:
        return
    from dataclasses import asdict

    from fxpress.budget import plan_memory

    for module in {m for p in passes for m in getattr(p, "runtime_modules", ())}:
        with contextlib.suppress(ImportError):  # an optional extra: absent, the pass runs without it
            importlib.import_module(module)
    calibrates = any(p.needs_calibration for p in passes)
    tokens = calib.batches.numel() if calib is not None and calibrates else 0
    plan = plan_memory(program, max_memory, tokens, hessians=calibrates)
    program.weights.budget = plan.overlay
    program.activation_budget = plan.activations
    program.metadata["memory_plan"] = asdict(plan)


def compile(
    model: torch.nn.Module | str | os.PathLike,
    passes: Sequence[Any] = (),
    example_inputs: Any = None,
    calibration: Calibration | torch.Tensor | Sequence[torch.Tensor] | None = None,
    verify: bool = True,
    progress: bool = True,
    dtype: torch.dtype | str | None = None,
    max_memory: str | int | None = None,
    device: str | torch.device = "cpu",
) -> CompiledModel:
    """Capture `model` (a module, a Hugging Face checkpoint directory, or a model name such as "smollm2"), then
    run `passes` in order.

    Every pass, the dtype, the budget and the device are validated before the model is even captured.
    `dtype` (e.g. torch.bfloat16): compute in that float type; None keeps the model's own (a copy is cast,
    the caller's model is left as it is). `max_memory` ("4GiB", bytes) bounds the process's peak resident
    memory: the model is captured without its weights, which a store serves (as it always is for a
    checkpoint directory), and a budget below one block's need is refused naming the smallest that works.
    `device` ("cpu", "cuda") is where calibration runs. Under torchrun the process group is started here.
    """
    pass_list = _as_passes(passes)
    calib = as_calibration(calibration)
    validate_pipeline(pass_list, (), calib is not None)
    cast = _model_dtype(dtype)
    budget = requested_budget(max_memory)
    where = join_process_group(check_device(device))
    program = _capture(model, example_inputs, cast, budget is not None)
    program.device = str(where)
    _plan_budget(program, budget, pass_list, calib)
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
