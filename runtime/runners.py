"""One interface over a PyTorch program, an ONNX Runtime session and a TVM VM: token ids in, logits out.

Every runner has `run(*inputs)` (the artifact's full signature, torch tensors in and out), `__call__`
(token ids -> logits with an empty cache, or the model's output for other models) and, for language
models, `step(input_ids, past_keys, past_values) -> (logits, keys, values)` plus `empty_cache(batch)`,
which is all `fxpress.runtime.generate` needs. Artifacts are checked on load: a missing, truncated or
foreign file is an `ArtifactError` that says which file and what to do.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxpress.artifact_names import ARTIFACT_FORMAT, METADATA_KEY, TVM_MANIFEST
from fxpress.errors import ArtifactError
from fxpress.inputs import check_inputs
from fxpress.integrity import verify_digests
from fxpress.lowering.artifacts import ARTIFACT_VERSION, verify_onnx_initializers
from fxpress.program import ModelInfo, Program


class Runner(ABC):
    """Base: subclasses implement `run`; the LM helpers come from `info`."""

    kind = "runner"
    info: ModelInfo

    @property
    def is_causal_lm(self) -> bool:
        return self.info.kind == "causal_lm"

    @abstractmethod
    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every output of the artifact for its full input signature."""

    def empty_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.info
        if not self.is_causal_lm or info.key_shape is None or info.value_shape is None:
            raise ArtifactError(f"this {self.kind} artifact is not a language model with a KV cache")
        kh, kd = info.key_shape
        vh, vd = info.value_shape
        dtype = self.dtype
        return (torch.zeros(info.num_layers, batch, kh, 0, kd, dtype=dtype),
                torch.zeros(info.num_layers, batch, vh, 0, vd, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) float type: float64 after the Precision pass, else float32."""
        return self.info.torch_activation_dtype

    def prepare(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Check the inputs (runtimes disagree on bad ids: TVM clamps, ONNX Runtime returns zeros) and give float
        inputs the artifact's float type, before anything runs."""
        check_inputs(self.info, inputs, cache_dtype=self.dtype)
        if not (self.info.extra or {}).get("dtype"):  # no Precision pass: inputs go through as given
            return tuple(inputs)
        return tuple(t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)

    def step(self, input_ids: torch.Tensor, past_keys: torch.Tensor,
             past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward with the cache: (logits, present_keys, present_values)."""
        logits, keys, values = self.run(input_ids, past_keys, past_values)
        return logits, keys, values

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        check_inputs(self.info, inputs)  # before empty_cache reads the batch from inputs[0]
        if self.is_causal_lm and len(inputs) == 1:
            return self.run(inputs[0], *self.empty_cache(inputs[0].shape[0]))[0]
        return self.run(*inputs)[0]


class TorchRunner(Runner):
    """The compiled program itself (reference kernels)."""

    kind = "torch"

    def __init__(self, program: Program) -> None:
        self.program = program
        self.info = program.info

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.program.run(*self.prepare(inputs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise ArtifactError(f"{what} '{path}' does not exist: export it first (compiled.export(...))")


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"'{path}' is not an fxpress artifact (no fxpress metadata): export it with fxpress")
    if meta.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"'{path}' is an fxpress artifact of version {meta.get('version')}, this fxpress reads version "
            f"{ARTIFACT_VERSION}: export it again with this fxpress"
        )
    return meta


class OnnxRunner(Runner):
    """An fxpress ONNX artifact in an ONNX Runtime session (CPU)."""

    kind = "onnx"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, optimize: bool = True) -> None:
        import onnxruntime as ort

        path = Path(path)
        _require(path, "ONNX artifact")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        level = self._accuracy_level(path)
        verify_onnx_initializers(path)
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for unreadable models
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ArtifactError(
                f"ONNX Runtime cannot load '{path}' ({first[:300]}): the file (or its .data file) is truncated or "
                "not an ONNX model; export it again"
            ) from err
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            meta = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            meta = None
        self.meta = _check_meta(meta, path)
        self.info = ModelInfo.from_dict(self.meta["info"])
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]

    @staticmethod
    def _accuracy_level(path: Path) -> int:
        """Read the artifact's MatMulNBits accuracy level without parsing the weights (0 if unknown)."""
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # protobuf raises DecodeError and others for truncated files
            raise ArtifactError(
                f"'{path}' is not a readable ONNX model ({type(err).__name__}): it is truncated or foreign; export it again"
            ) from err
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                try:
                    return int(json.loads(prop.value).get("accuracy_level", 0))
                except (json.JSONDecodeError, TypeError, ValueError):
                    return 0
        return 0

    @property
    def genai_io(self) -> bool:
        """True for onnxruntime-genai's I/O: attention_mask and per-layer past_key_values.{i}.key/value."""
        return self.meta.get("io") == "genai"

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = self.prepare(inputs)
        if self.genai_io:
            return self._run_genai(*inputs)
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds))

    def _run_genai(self, input_ids: torch.Tensor, past_keys: torch.Tensor,
                   past_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The runner's stacked cache [layers, batch, heads, past, dim] fed as the artifact's per-layer inputs,
        with an all-ones attention mask (no padding), and the per-layer presents stacked back. ONNX Runtime's
        GroupQueryAttention takes several new tokens after a past only at batch 1: other batches go token by token."""
        if input_ids.shape[0] > 1 and input_ids.shape[1] > 1 and past_keys.shape[3] > 0:
            logits = []
            for t in range(input_ids.shape[1]):
                step, past_keys, past_values = self._run_genai(input_ids[:, t:t + 1], past_keys, past_values)
                logits.append(step)
            return torch.cat(logits, 1), past_keys, past_values
        batch, total = input_ids.shape[0], past_keys.shape[3] + input_ids.shape[1]
        feeds = {"input_ids": input_ids.detach().cpu().numpy(),
                 "attention_mask": np.ones((batch, total), dtype=np.int64)}
        for i in range(past_keys.shape[0]):
            feeds[f"past_key_values.{i}.key"] = past_keys[i].detach().cpu().numpy()
            feeds[f"past_key_values.{i}.value"] = past_values[i].detach().cpu().numpy()
        logits, *presents = (torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds))
        return logits, torch.stack(presents[0::2]), torch.stack(presents[1::2])


class TvmRunner(Runner):
    """An fxpress TVM artifact directory: shared library + weights, run by relax.VirtualMachine on CPU."""

    kind = "tvm"

    def __init__(self, path: str | os.PathLike) -> None:
        import tvm
        from tvm import relax

        path = Path(path)
        _require(path, "TVM artifact directory")
        manifest = path / TVM_MANIFEST
        if not path.is_dir() or not manifest.is_file():
            raise ArtifactError(f"'{path}' is not an fxpress TVM artifact (a directory with {TVM_MANIFEST}): export it with fxpress")
        try:
            meta = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"'{manifest}' is not valid JSON: the artifact is corrupt; export it again") from err
        self.meta = _check_meta(meta, manifest)
        for name, size in self.meta.get("files", {}).items():
            file = path / name
            _require(file, "TVM artifact file")
            if file.stat().st_size != size:
                raise ArtifactError(
                    f"'{file}' has {file.stat().st_size} bytes, the manifest says {size}: it is truncated or was "
                    "replaced; export the artifact again"
                )
        verify_digests(path, self.meta.get("integrity"), "TVM artifact")  # before the library is dlopen'ed
        _require_cpu_features(self.meta.get("target", ""), path)
        try:
            lib = tvm.runtime.load_module(str(path / self.meta["library"]))
        except Exception as err:  # TVM raises its own error types for unreadable libraries
            raise ArtifactError(f"TVM cannot load '{path / self.meta['library']}': {str(err).splitlines()[0][:300]}") from err
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self.params = self._load_weights(path / self.meta["weights"], self.meta["params"])
        self.info = ModelInfo.from_dict(self.meta["info"])
        self.path = path
        self._tvm = tvm

    def _load_weights(self, file: Path, names: list[str]) -> list[Any]:
        import tvm
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(file))
        except Exception as err:  # safetensors raises SafetensorError on truncated headers/data
            raise ArtifactError(f"cannot read TVM weights '{file}' ({err}): export the artifact again") from err
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ArtifactError(f"TVM weights '{file}' lack {len(missing)} tensors (e.g. {missing[0]}): export again")
        tensors = {n: tvm.runtime.tensor(a) for n, a in arrays.items()}  # tied weights share one tensor
        return [tensors[n] for n in names]

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = [self._shared(t.detach().cpu().contiguous()) for t in self.prepare(inputs)]
        out = self.vm["main"](*args, *self.params)
        items = [out] if hasattr(out, "numpy") else list(out)
        return tuple(torch.from_dlpack(o) for o in items)  # the VM's outputs, not copies

    def _shared(self, tensor: torch.Tensor) -> Any:
        """The torch tensor as a TVM tensor on the same memory (DLPack); a copy when it is empty, its strides are not
        TVM's compact ones or TVM refuses it. Why: a decode step hands the whole KV cache in and gets it back."""
        if tensor.numel() and tuple(tensor.stride()) == _compact_strides(tensor.shape):  # TVM's kernels want these
            try:
                return self._tvm.runtime.from_dlpack(tensor)
            except Exception:  # TVM raises its own error for storage it cannot take (e.g. misaligned)
                pass
        return self._tvm.runtime.tensor(tensor.numpy())


def _compact_strides(shape: torch.Size) -> tuple[int, ...]:
    """Row-major strides as TVM computes them (torch may give a size-1 or empty dim another, equivalent stride)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


ISA_FEATURES = ("sse", "avx", "fma", "f16c", "bmi", "amx", "vnni", "neon", "sve")  # instruction sets, not tuning flags


def _require_cpu_features(target: str, path: Path) -> None:
    """A library built for another CPU (export_tvm's default target is the exporting host) must not be loaded
    where its instructions are missing: that would crash the process, not raise."""
    if '"mcpu"' not in target:
        return
    import tvm

    from fxpress.lowering.tvm.build import host_target

    codegen = tvm.target.codegen
    built = tvm.target.Target(json.loads(target))
    host = tvm.target.Target(host_target())
    missing = sorted(f for f in set(codegen.llvm_get_cpu_features(built)) - set(codegen.llvm_get_cpu_features(host))
                     if f.startswith(ISA_FEATURES))
    if missing:
        raise ArtifactError(
            f"'{path}' was built for CPU '{built.attrs['mcpu']}', whose instructions {', '.join(missing[:6])} this "
            f"CPU ('{codegen.llvm_get_system_cpu()}') lacks: export it again here, or with target='llvm' (portable)")


def load_runner(artifact: Any, **kwargs: Any) -> Runner:
    """A runner for a Program / compiled model, an `.onnx` file, or a TVM artifact directory."""
    if isinstance(artifact, Runner):
        return artifact
    if isinstance(artifact, Program):
        return TorchRunner(artifact)
    if isinstance(getattr(artifact, "program", None), Program):
        return TorchRunner(artifact.program)
    if not isinstance(artifact, (str, os.PathLike)):
        raise ArtifactError(f"cannot run {type(artifact).__name__}: pass a Program, a compiled model or an artifact path")
    path = Path(artifact)
    if path.is_dir() or (path.parent / path.name / TVM_MANIFEST).exists():
        return TvmRunner(path, **kwargs)
    if path.suffix == ".onnx":
        return OnnxRunner(path, **kwargs)
    _require(path, "artifact")
    raise ArtifactError(f"'{path}' is neither an .onnx file nor a TVM artifact directory: pass one of those")
