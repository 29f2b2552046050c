"""Models without their weights: a Hugging Face checkpoint directory or an in-memory model, as a store.

A checkpoint directory is what a user downloads: `config.json` and `*.safetensors` shards (with
`model.safetensors.index.json` when sharded). The model is built from its config with empty weights
(accelerate's `init_empty_weights`), its parameters become placeholders, and a `WeightStore` serves each
one from the shard that holds it, so capture and passes never hold the whole model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from fxpress.errors import CaptureError
from fxpress.weights import WeightStore, is_placeholder, placeholder

INDEX_FILE = "model.safetensors.index.json"


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A folder with a config.json: what `compile(model=...)` treats as a Hugging Face checkpoint."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def checkpoint_keys(directory: str | os.PathLike) -> dict[str, Path]:
    """Every tensor key of the checkpoint and the shard that holds it (the index when there is one)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CaptureError(f"{index} is not a safetensors index (no weight_map): {err}; fix or remove it") from err
        return {key: directory / shard for key, shard in weight_map.items()}
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:8])
        raise CaptureError(
            f"{directory} has a config.json but no *.safetensors weights (found: {found}); fxpress reads only "
            "safetensors (pickled .bin files can run code): convert them with transformers' save_pretrained"
        )
    keys: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys.update((key, shard) for key in f.keys())
        except (SafetensorError, OSError) as err:
            raise CaptureError(f"{shard} is not a readable safetensors file: {err}") from err
    return keys


def empty_model(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint's causal LM built from its config, parameters as placeholders (nothing read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise CaptureError(f"{directory}/config.json could not be read as a transformers config: {err}") from err
    dtype = dtype or _config_dtype(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    as_placeholders(model, dtype)
    return model.eval()


def shell_of(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """An empty twin of an in-memory Hugging Face model (same config and class), parameters as placeholders."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        shell = type(model)(model.config)
    as_placeholders(shell, dtype or next(model.parameters()).dtype)
    return shell.eval()


def _config_dtype(config: object) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def as_placeholders(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace every parameter (on the meta device, or real) by a placeholder; ties are kept (tie_weights)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or is_placeholder(param):
                continue
            kind = dtype if (dtype is not None and param.is_floating_point()) else param.dtype
            module._parameters[name] = nn.Parameter(placeholder(param.shape, kind), requires_grad=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's names, tied ones together (the LM head and the embedding of a tied model)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: names for names in groups.values() for name in names}


def store_from_checkpoint(gm: torch.fx.GraphModule, model: nn.Module, directory: str | os.PathLike,
                          prefix: str, budget: int | None = None) -> WeightStore:
    """A store serving every placeholder of `gm` from the checkpoint's shards; `prefix` maps graph names to
    model names (the capture wrapper's `model.`). A missing tensor is an error naming it, before any work."""
    keys = checkpoint_keys(directory)
    aliases = parameter_aliases(model)
    store = WeightStore(budget)
    missing = []
    for target, value in _placeholders(gm):
        name = target.removeprefix(prefix)
        key = next((k for k in aliases.get(name, [name]) if k in keys), None)
        if key is None:
            missing.append(name)
            continue
        store.add_file(target, keys[key], key, value.dtype)
    if missing:
        raise CaptureError(f"{directory} lacks {len(missing)} weights the model needs, e.g. {', '.join(missing[:3])}: "
                           "the checkpoint does not match its config.json (or is incomplete)")
    return store


def store_from_module(gm: torch.fx.GraphModule, model: nn.Module, prefix: str, budget: int | None = None) -> WeightStore:
    """A store serving `gm`'s placeholders from an in-memory model's own tensors (shared, not copied)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    store = WeightStore(budget)
    for target, value in _placeholders(gm):
        store.add_tensor(target, params[target.removeprefix(prefix)], value.dtype)
    return store


def _placeholders(gm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = [(n, t) for n, t in gm.named_parameters(remove_duplicate=False) if is_placeholder(t)]
    found += [(n, t) for n, t in gm.named_buffers(remove_duplicate=False) if is_placeholder(t)]
    return found
