"""Small random models of the families fxpress must handle, for tests and examples.

They are built from transformers' own config classes, so the graphs are exactly what
transformers 5 emits for the real models (fused 3-D experts, shared experts, MLA, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from fxpress.errors import ConfigError

_COMMON: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)
_MOE: dict[str, Any] = dict(num_experts_per_tok=2)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", {**_MOE, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", {**_MOE, "num_experts": 4, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1}),
    "qwen3_moe": ("Qwen3MoeConfig", {**_MOE, "num_experts": 4, "moe_intermediate_size": 64,
                                     "decoder_sparse_step": 1, "head_dim": 16}),
    "olmoe": ("OlmoeConfig", {**_MOE, "num_experts": 4}),
    "deepseek_v3": ("DeepseekV3Config", {**_MOE, "n_routed_experts": 4, "n_shared_experts": 1,
                                         "moe_intermediate_size": 64, "first_k_dense_replace": 1,
                                         "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 32,
                                         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                                         "num_key_value_heads": 4}),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_config(family: str, **overrides: Any):
    """The transformers config of a small random model of `family`."""
    import transformers

    if family not in FAMILIES:
        raise ConfigError(f"unknown model family '{family}': choose one of {', '.join(FAMILIES)}")
    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**_COMMON, **extra, **overrides})
    return config


def tiny_causal_lm(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A small random causal LM of `family` in eval mode, fp32, same seed -> same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


def tiny_encoder(family: str = "bert", seed: int = 0) -> torch.nn.Module:
    """A small random encoder (BERT) in eval mode."""
    from transformers import BertConfig, BertModel

    if family != "bert":
        raise ConfigError(f"unknown encoder family '{family}': only 'bert' is provided")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    return BertModel(config).eval()


def train_mlp(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...] = (64, 32, 10), steps: int = 400,
              seed: int = 0) -> torch.nn.Sequential:
    """A small ReLU classifier trained full-batch with Adam: the conventional network threshold neurons start from."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
