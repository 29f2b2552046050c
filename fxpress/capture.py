"""Capture: torch.export a model once into an ATen-level FX GraphModule with dynamic batch and sequence."""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
from torch.export import Dim

from fxpress.checks import check_finite, module_tensors
from fxpress.errors import CaptureError
from fxpress.program import MODEL_DTYPES, ModelInfo, Program
from fxpress.repeat_layers import KEEP, decoder_layers, grow, repeatable, truncated
from fxpress.weights import FAKE_MODE, attach_store, is_placeholder, placeholder

MAX_BATCH = 1024
MAX_SEQ = 8192
EXPORT_BATCH, EXPORT_SEQ, EXPORT_PAST = 2, 16, 3  # sizes > 1 so export does not specialise them
WRAPPER_PREFIX = "model."  # graph attribute names = the model's own names under CausalLMWithCache.model


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates text (has a cache and output embeddings)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate() and hasattr(model, "get_output_embeddings"))


class CausalLMWithCache(nn.Module):
    """(input_ids, past_keys, past_values) -> (logits, present_keys, present_values), caches as stacked tensors.

    Stacked tensors (layers, batch, heads, positions, dim) keep the signature the same for every
    architecture, so one graph serves prefill (zero-length past) and token-by-token decoding.
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(past_keys[layer], past_values[layer], layer)
        past = past_keys.shape[3]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + past
        out = self.model(
            input_ids=input_ids,
            cache=cache,
            use_cache=True,
            cache_position=positions,
            position_ids=positions.unsqueeze(0).expand(input_ids.shape[0], -1),
        )
        keys = torch.stack([cache.layers[i].keys for i in range(self.num_layers)])
        values = torch.stack([cache.layers[i].values for i in range(self.num_layers)])
        return out.logits, keys, values


class EncoderOutputs(nn.Module):
    """A Hugging Face model that is not a causal LM (e.g. BERT): token ids -> its first output tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids)
        return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def _lm_info(model: nn.Module, source: str | None) -> ModelInfo:
    """Read sizes from the config and the cache layout from one tiny eager forward."""
    cfg = model.config
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.get("cache") or out.get("past_key_values")  # renamed "cache" in later transformers 5 releases
    layer0 = cache.layers[0]
    heads = getattr(cfg, "num_attention_heads", None)
    return ModelInfo(
        kind="causal_lm",
        num_layers=len(cache.layers),
        hidden_size=getattr(cfg, "hidden_size", None),
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", heads),
        head_dim=getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None),
        vocab_size=getattr(cfg, "vocab_size", None),
        max_positions=getattr(cfg, "max_position_embeddings", None),
        key_shape=(layer0.keys.shape[1], layer0.keys.shape[3]),
        value_shape=(layer0.values.shape[1], layer0.values.shape[3]),
        model_type=getattr(cfg, "model_type", None),
        source=source,
        activation_dtype=_dtype_name(layer0.keys.dtype),
        input_names=("input_ids", "past_keys", "past_values"),
        output_names=("logits", "present_keys", "present_values"),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    """The name ModelInfo records for the model's float type (its KV cache's dtype), checked against what we support."""
    name = str(dtype).removeprefix("torch.")
    if name not in MODEL_DTYPES:
        raise CaptureError(
            f"the model computes in {name}, which fxpress does not capture: cast it with "
            f"model.to(torch.float32) (or one of {', '.join(MODEL_DTYPES)}) before compiling"
        )
    return name


def _export(module: nn.Module, args: tuple, dynamic_shapes: Any, what: str) -> torch.fx.GraphModule:
    try:
        exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch.export raises many types; all mean "could not trace"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"torch.export could not capture {what}: {type(err).__name__}: {first}. "
            "Data-dependent Python control flow, .item()/.tolist() on tensors, or in-place updates of inputs "
            "are the usual causes: make them tensor operations (torch.where, torch.cond), or capture a "
            "sub-module that avoids them."
        ) from err
    return exported.module()


def _export_causal_lm(model: nn.Module, num_layers: int, args: tuple, shapes: Any) -> torch.fx.GraphModule:
    """torch.export the model; when its decoder layers repeat, only the first three, grown to all in the graph
    (`repeat_layers`) and, with real weights, checked against the eager model on the example inputs."""
    what = type(model).__name__
    found = decoder_layers(model, num_layers)
    if found is not None and repeatable(model, found[1]):
        name, layers = found
        ids, past_k, past_v = args
        with truncated(model, name, layers):
            gm = _export(CausalLMWithCache(model, KEEP), (ids, past_k[:KEEP], past_v[:KEEP]), shapes, what)
        if grow(gm, f"{WRAPPER_PREFIX}{name}.", layers) and (has_placeholders(model) or _same_outputs(gm, model, args)):
            return gm
    return _export(CausalLMWithCache(model, num_layers), args, shapes, what)


def _same_outputs(gm: torch.fx.GraphModule, model: nn.Module, args: tuple) -> bool:
    """The grown graph computes what the eager model does (logits and caches) on the example inputs."""
    with torch.no_grad():
        want = CausalLMWithCache(model, args[1].shape[0])(*args)
        got = gm(*args)
    return all(g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want))


def capture_causal_lm(model: nn.Module, example_ids: torch.Tensor | None = None, source: str | None = None) -> Program:
    """Capture a Hugging Face causal LM with a KV-cache signature and dynamic batch/sequence/past."""
    model = model.eval()
    if has_placeholders(model):
        # The placeholders compute shapes only; the real inputs are converted. Transformers' MoE experts run
        # torch._grouped_mm eagerly on the CPU, whose fake kernel takes bf16 only; while compiling (as when the
        # graph is exported below) they take transformers' grouped_mm_fallback, so this forward says it compiles.
        with FAKE_MODE, mock.patch.object(torch.compiler, "is_compiling", return_value=True):
            info = _lm_info(model, source)
    else:
        info = _lm_info(model, source)
    vocab = info.vocab_size or 100
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (EXPORT_BATCH, EXPORT_SEQ), generator=generator)
    kh, kd = info.key_shape
    vh, vd = info.value_shape
    dtype = info.torch_activation_dtype  # the KV cache is in the model's own float type (bf16 for bf16 checkpoints)
    past_k = torch.zeros(info.num_layers, EXPORT_BATCH, kh, EXPORT_PAST, kd, dtype=dtype)
    past_v = torch.zeros(info.num_layers, EXPORT_BATCH, vh, EXPORT_PAST, vd, dtype=dtype)
    batch, seq, past = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=MAX_SEQ), Dim("past", min=0, max=MAX_SEQ)
    shapes = {"input_ids": {0: batch, 1: seq}, "past_keys": {1: batch, 3: past}, "past_values": {1: batch, 3: past}}
    gm = _export_causal_lm(model, info.num_layers, (ids, past_k, past_v), shapes)
    _renew_placeholders(gm)
    if example_ids is None:
        example_ids = ids
    program = Program(module=gm, example_inputs=(example_ids,), info=info)
    keys, values = program.empty_cache(example_ids.shape[0])
    program.example_inputs = (example_ids, keys, values)
    return program


def capture_module(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_batch: bool = True) -> Program:
    """Capture any nn.Module (MLP, CNN, encoder) with a dynamic leading batch dimension."""
    model = model.eval()
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    hf_encoder = hasattr(model, "config") and len(example_inputs) == 1 and example_inputs[0].dtype == torch.long
    module = EncoderOutputs(model) if hf_encoder else model
    dynamic_shapes = None
    if dynamic_batch:
        for t in example_inputs:
            if t.shape[0] < 2:
                raise CaptureError(
                    f"example inputs need a batch of at least 2 to capture a dynamic batch (got shape {tuple(t.shape)}): "
                    "repeat the example along dim 0, or pass dynamic_batch=False"
                )
        batch = Dim("batch", min=1, max=MAX_BATCH)
        dims = []
        for _ in example_inputs:
            spec: dict[int, Dim] = {0: batch}
            if hf_encoder:
                max_seq = getattr(model.config, "max_position_embeddings", MAX_SEQ) or MAX_SEQ
                spec[1] = Dim("seq", min=2, max=min(max_seq, MAX_SEQ))
            dims.append(spec)
        dynamic_shapes = tuple(dims)
    gm = _export(module, example_inputs, dynamic_shapes, type(model).__name__)
    cfg = getattr(model, "config", None)
    info = ModelInfo(
        kind="generic",
        hidden_size=getattr(cfg, "hidden_size", None),
        num_heads=getattr(cfg, "num_attention_heads", None),
        num_layers=getattr(cfg, "num_hidden_layers", None),
        model_type=getattr(cfg, "model_type", None),
        input_names=tuple(f"input_{i}" for i in range(len(example_inputs))),
        output_names=("output",),
    )
    return Program(module=gm, example_inputs=example_inputs, info=info)


def has_placeholders(model: nn.Module) -> bool:
    return any(is_placeholder(t) for _, t in module_tensors(model))


def _renew_placeholders(gm: torch.fx.GraphModule) -> None:
    """Make every fake tensor torch.export left on the module a placeholder of the store's one fake mode."""
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, value in list(table.items()):
                if is_placeholder(value):
                    fresh = placeholder(value.shape, value.dtype)
                    table[name] = nn.Parameter(fresh, requires_grad=False) if name in module._parameters else fresh


def capture_stored(model: nn.Module | str, dtype: torch.dtype | None = None, budget: int | None = None,
                   example_ids: torch.Tensor | None = None) -> Program:
    """Capture a causal LM whose weights stay out of the graph, in a `WeightStore` bounded by `budget` bytes.

    `model` is a Hugging Face checkpoint directory (config.json + safetensors shards: nothing is read but the
    config until a pass asks for a weight) or an in-memory causal LM (its tensors are served as they are).
    """
    from fxpress.checkpoint import (
        empty_model,
        is_checkpoint_dir,
        shell_of,
        store_from_checkpoint,
        store_from_module,
    )

    if isinstance(model, (str, os.PathLike)):
        if not is_checkpoint_dir(model):
            raise CaptureError(f"{model} is not a Hugging Face checkpoint directory (config.json + *.safetensors)")
        shell = empty_model(model, dtype)
        program = capture_causal_lm(shell, example_ids, source=str(model))
        store = store_from_checkpoint(program.module, shell, model, WRAPPER_PREFIX, budget)
    else:
        if not is_causal_lm(model):
            raise CaptureError(f"{type(model).__name__} is not a Hugging Face causal LM: only those compile under a "
                               "memory budget; drop max_memory to compile it in memory")
        check_weights(model)
        program = capture_causal_lm(shell_of(model, dtype), example_ids, source=None)
        store = store_from_module(program.module, model, WRAPPER_PREFIX, budget)
    attach_store(program.module, store)
    return program


def capture(model: nn.Module, example_inputs: Any = None, source: str | None = None) -> Program:
    """Capture `model` into a Program: causal LMs get the KV-cache signature, others a dynamic batch."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    check_weights(model)
    if is_causal_lm(model):
        ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        return capture_causal_lm(model, ids, source)
    if example_inputs is None:
        raise CaptureError(f"{type(model).__name__} is not a causal LM: pass example_inputs=(tensor, ...) to capture it")
    program = capture_module(model, example_inputs)
    check_outputs(program.module, type(model).__name__)
    return program


def check_weights(model: nn.Module) -> None:
    """Refuse weights without data (meta device, lazy modules) or with NaN/inf: the graph would compute garbage."""
    for name, tensor in module_tensors(model):
        if tensor.is_meta or isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
            where = "on the meta device" if tensor.is_meta else "not initialised (a lazy module)"
            raise CaptureError(
                f"{type(model).__name__} weight '{name}' is {where}: it holds no values. Load the weights before "
                "capturing (e.g. from_pretrained, or model.to_empty(device='cpu') then load_state_dict)"
            )
    check_finite(module_tensors(model), f"{type(model).__name__} weight", CaptureError,
                 "the checkpoint is corrupt or training diverged; fix or reload the weights before compiling")


def check_outputs(gm: torch.fx.GraphModule, what: str) -> None:
    """A captured module must return a tensor or a tuple/list of tensors: other outputs cannot be saved or lowered."""
    spec = getattr(gm, "_out_spec", None)
    if spec is not None and not spec.is_leaf() and spec.type not in (tuple, list):
        keys = f" with keys {', '.join(map(repr, spec.context))}" if spec.type is dict else ""
        raise CaptureError(
            f"{what} returns a {spec.type.__name__}{keys}; fxpress needs a tensor or a tuple of tensors: wrap the "
            "model in a module whose forward returns the tensors (e.g. a tuple of the values)"
        )
    for i, child in enumerate(spec.children() if spec is not None and not spec.is_leaf() else []):
        if not child.is_leaf():
            raise CaptureError(f"{what} output[{i}] is a {child.type.__name__}: fxpress needs a flat tuple of tensors")
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    for i, value in enumerate(flat):
        if not isinstance(value, torch.fx.Node):
            raise CaptureError(
                f"{what} output[{i}] is {value!r}, not a tensor: fxpress needs a tensor or a tuple of tensors; "
                "return only tensors from forward"
            )
