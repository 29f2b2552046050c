"""The Program: the captured FX graph plus what passes and lowerings need to know about it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from fxpress.calibration import Calibration
from fxpress.inputs import check_inputs
from fxpress.report import PassResult
from fxpress.weights import WeightStore, is_placeholder, weight_store

ACTIVATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # what the Precision pass can set
# A captured model computes in its own float type: half-precision checkpoints keep theirs (KV cache included).
MODEL_DTYPES = {**ACTIVATION_DTYPES, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelInfo:
    """Facts about the captured model that the graph alone does not state plainly."""

    kind: str = "generic"  # "causal_lm" (signature: input_ids, past_keys, past_values) or "generic"
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    key_shape: tuple[int, ...] | None = None  # one layer's cache entry per batch row: (heads, dim)
    value_shape: tuple[int, ...] | None = None
    model_type: str | None = None
    source: str | None = None
    max_positions: int | None = None  # the model's position limit (config.max_position_embeddings), if it has one
    activation_dtype: str = "float32"  # the model's float type at capture, or the Precision pass's; lowerings follow it
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_activation_dtype(self) -> torch.dtype:
        """The float type the program's (or artifact's) activations and KV cache use."""
        return MODEL_DTYPES[self.activation_dtype]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        data = dict(data)
        extra = dict(data.get("extra") or {})
        if "dtype" in extra:  # artifacts written before activation_dtype was a field kept it in extra
            data.setdefault("activation_dtype", extra.pop("dtype"))
            data["extra"] = extra
        for key in ("key_shape", "value_shape", "input_names", "output_names"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class Program:
    """An ATen-level GraphModule and its context; passes rewrite `module` in place."""

    module: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    info: ModelInfo
    calibration: Calibration | None = None
    history: list[str] = field(default_factory=list)
    facts: set[str] | None = None  # what holds of the graph (fxpress.passes.base.FACTS); None: derive from history
    report: list[PassResult] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where calibration work runs (weights and activations moved there block by block)
    activation_budget: int | None = None  # bytes of calibration activations held in memory before spilling

    @property
    def graph(self) -> torch.fx.Graph:
        return self.module.graph

    @property
    def weights(self) -> WeightStore | None:
        """The store serving this program's weights, or None when the module holds them (in-memory compile)."""
        return weight_store(self.module)

    @property
    def is_causal_lm(self) -> bool:
        return self.info.kind == "causal_lm"

    def empty_cache(self, batch: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-length past keys/values for a prefill call: (layers, batch, *head, 0, dim), in the model's dtype."""
        info = self.info
        dtype = dtype or info.torch_activation_dtype
        assert info.key_shape is not None and info.value_shape is not None and info.num_layers is not None
        kh, kd = info.key_shape
        vh, vd = info.value_shape
        keys = torch.zeros(info.num_layers, batch, kh, 0, kd, dtype=dtype)
        values = torch.zeros(info.num_layers, batch, vh, 0, vd, dtype=dtype)
        return keys, values

    def clone(self) -> Program:
        """A deep copy: passes rewrite in place, so copy before trying alternatives on one capture."""
        return copy.deepcopy(self)

    def run(self, *inputs: torch.Tensor) -> Any:
        """Call the graph with its full signature (store-backed: weights read as their nodes run)."""
        if self.weights is not None:
            from fxpress.execute import run_graph

            return run_graph(self.module, inputs)
        with torch.no_grad():
            return self.module(*inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits for token ids (causal LMs, no cache) or the model's output (other models); inputs checked first."""
        check_inputs(self.info, inputs, self.example_inputs)
        if self.is_causal_lm and len(inputs) == 1:
            keys, values = self.empty_cache(inputs[0].shape[0])
            return self.run(inputs[0], keys, values)[0]
        out = self.run(*inputs)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def reference_logits(self) -> torch.Tensor:
        """The main output on the example inputs: what function-preserving passes must keep."""
        out = self.run(*self.example_inputs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def weight_bytes(self) -> int:
        """Bytes of the tensors the graph reads (get_attr nodes; packed weights count packed, shared ones once)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for node in self.graph.nodes:
            if node.op != "get_attr" or not node.users:  # a weight nothing reads is not shipped
                continue
            value = self.module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if is_placeholder(value):
                key = (id(value), str(node.target))
                if key not in seen:
                    seen.add(key)
                    total += value.numel() * value.element_size()
            elif isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.storage_offset())
                if key not in seen:
                    seen.add(key)
                    total += value.numel() * value.element_size()
        return total

    def summary(self) -> dict[str, Any]:
        nodes = list(self.graph.nodes)
        return {
            "kind": self.info.kind,
            "nodes": len(nodes),
            "ops": sum(1 for n in nodes if n.op == "call_function"),
            "weight_bytes": self.weight_bytes(),
            "passes": list(self.history),
            "facts": sorted(self.facts) if self.facts is not None else None,
        }
