"""`genai_config.json` beside an ONNX causal LM with onnxruntime-genai's I/O, so its `Generator` runs it as it is.

The fields are those of the GenAI model builder's configs for decoder-only models (a per-layer KV cache that
is not shared between past and present: the artifact's GroupQueryAttention returns past + new).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxpress.atomic import write_atomic
from fxpress.errors import ConfigError

GENAI_CONFIG = "genai_config.json"
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo", "smollm3")


def genai_config(info: Any, filename: str, eos_token_id: int | list[int] | None = None,
                 bos_token_id: int | None = None) -> dict[str, Any]:
    """The config dict for an artifact `filename` of a program with ModelInfo `info`."""
    context = int(info.max_positions or 2048)
    eos = eos_token_id if eos_token_id is not None else (info.vocab_size or 1) - 1
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": info.head_dim,
        "hidden_size": info.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": info.num_heads,
        "num_hidden_layers": info.num_layers,
        "num_key_value_heads": info.num_kv_heads or info.num_heads,
    }
    model = {"bos_token_id": bos_token_id if bos_token_id is not None else 0, "context_length": context,
             "decoder": decoder, "eos_token_id": eos, "pad_token_id": eos if isinstance(eos, int) else eos[0],
             "type": info.model_type if info.model_type in GENAI_TYPES else "llama", "vocab_size": info.vocab_size}
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def check_config_target(path: Path, overwrite: bool) -> None:
    """Refuse (before any work) a genai_config.json beside `path` that describes another model file."""
    config = path.parent / GENAI_CONFIG
    if not config.exists() or overwrite:
        return
    try:
        filename = json.loads(config.read_text())["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        filename = None
    if filename != path.name:
        raise ConfigError(f"'{config}' exists and does not describe '{path.name}': refusing to replace it; export "
                          "into another folder, or pass overwrite=True (--overwrite) to replace it")


def write_genai_config(path: Path, info: Any, eos_token_id: int | list[int] | None = None) -> Path:
    """Write genai_config.json beside the model at `path` atomically (temporary file, then rename)."""
    config = path.parent / GENAI_CONFIG
    write_atomic(config, json.dumps(genai_config(info, path.name, eos_token_id), indent=4))
    return config
