"""Random-init checkpoints for the scale benchmark, written once as a user downloads one: bf16 safetensors shards.

The model is built on the meta device from its config (nothing allocated), and each shard is filled with
random tensors and written before the next is made, so writing a 2.5B checkpoint needs about one shard of
memory. Llama sizes use a 32000-token vocabulary; the 281M config is the one issue 13 measured (SmolLM2's
vocabulary and tokenizer, copied in so the CLI can calibrate on real text).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fxpress.models import cache_dir, resolve_model_path

SHARD_BYTES = 1 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_LLAMA: dict[str, Any] = dict(num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                              max_position_embeddings=2048, head_dim=64)

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("LlamaConfig", {**_LLAMA, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                             "num_attention_heads": 8, "num_key_value_heads": 4}),
    "281m": ("LlamaConfig", {**_LLAMA, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                             "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 49152}),
    "0.5b": ("LlamaConfig", {**_LLAMA, "hidden_size": 1280, "intermediate_size": 3584, "num_hidden_layers": 24,
                             "num_attention_heads": 20, "num_key_value_heads": 4}),
    "1.5b": ("LlamaConfig", {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 30,
                             "num_attention_heads": 32}),
    "2.5b": ("LlamaConfig", {**_LLAMA, "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 34,
                             "num_attention_heads": 40}),
    "3b": ("LlamaConfig", {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 30,
                           "num_attention_heads": 48}),
    "moe-1.2b": ("MixtralConfig", {**_LLAMA, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                                   "num_attention_heads": 16, "num_local_experts": 8, "num_experts_per_tok": 2}),
}


def scale_dir() -> Path:
    return cache_dir() / "scale"


def _config(name: str):
    import transformers

    class_name, fields = CONFIGS[name]
    return getattr(transformers, class_name)(**fields, dtype="bfloat16")


def _empty(name: str) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(_config(name), dtype=torch.bfloat16)


def parameter_count(name: str) -> int:
    return sum(p.numel() for p in _empty(name).parameters())


def _random(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02) as initialisers do, in bf16."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def _shards(model: torch.nn.Module) -> list[list[tuple[str, torch.Size]]]:
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for key, param in model.state_dict().items():
        nbytes = param.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, param.shape))
        size += nbytes
    return shards


def write_checkpoint(name: str, seed: int = 0) -> Path:
    """The checkpoint `name` under ~/.cache/fxpress/scale (written once; a finished one is reused)."""
    from safetensors.torch import save_file

    target = scale_dir() / name
    if (target / "model.safetensors.index.json").is_file():
        return target
    tmp = target.with_name(f"{name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model = _empty(name)
    model.config.save_pretrained(tmp)
    generator = torch.Generator().manual_seed(seed)
    shards = _shards(model)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: _random(key, shape, generator) for key, shape in shard}, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({key: file for key, _ in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    source = Path(resolve_model_path("smollm2"))
    for file in TOKENIZER_FILES:  # SmolLM2's tokenizer: prompts and calibration text (ids taken modulo the vocab)
        shutil.copy(source / file, tmp / file)
    os.replace(tmp, target)
    return target
