"""Each fxpress op's ONNX lowering is one `OnnxOp` subclass, registered in the op table for target "onnx".

The class holds everything about the op in ONNX: the placeholder node its translation emits during
`torch.onnx.export` (ONNX op type = the class name, in the `fxpress` domain, schema from `inputs` and
`attributes`) and its materialisation into runnable nodes once weight values are known.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from fxpress.errors import LoweringError
from fxpress.lowering.onnx.builder import DOMAIN
from fxpress.runtime.ops import OPS, register_lowering

if TYPE_CHECKING:
    from fxpress.lowering.onnx.builder import Materializer

_SCHEMA_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(uint8)",
                 "tensor(int8)", "tensor(int32)", "tensor(int64)"]


class OnnxOp(ABC):
    """One fxpress op's ONNX lowering: placeholder schema, translation and materialisation."""

    op: ClassVar[str]  # the fxpress op this lowers
    inputs: ClassVar[int]  # placeholder inputs (optional ones included); -1 = variadic
    attributes: ClassVar[dict[str, str]] = {}  # placeholder attribute -> OpSchema.AttrType name
    first: ClassVar[bool] = False  # materialized before the others

    # torch.onnx translation (a staticmethod) emitting the placeholder; left unannotated, as torch.onnx reads
    # a translation's annotations as its input types
    translate: ClassVar[Callable[..., Any]]

    @classmethod
    @abstractmethod
    def materialize(cls, b: Materializer, node: Any) -> None:
        """Replace the placeholder `node` by runnable nodes."""


ONNX_OPS: dict[str, type[OnnxOp]] = {}  # placeholder op type -> lowering


def onnx_lowering(cls: type[OnnxOp]) -> type[OnnxOp]:
    """Class decorator: the ONNX lowering of `cls.op`."""
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} lowers '{cls.op}' but does not define materialize(b, node)")
    ONNX_OPS[cls.__name__] = cls
    _register(cls)
    return cls


def _register(cls: type[OnnxOp]) -> None:
    if cls.op in OPS and "onnx" not in OPS[cls.op].lowerings:
        register_lowering(cls.op, "onnx")(cls)


def register_translations() -> None:
    """Register every ONNX lowering for the ops that exist now (idempotent; ops defined later need a call)."""
    import fxpress.runtime  # noqa: F401  (defines the ops)

    for cls in ONNX_OPS.values():
        _register(cls)


def translation_table() -> dict[Any, Callable]:
    """torch.onnx's custom_translation_table: op overload -> translation; every op must have one."""
    register_translations()
    missing = [spec.qualname for spec in OPS.values() if "onnx" not in spec.lowerings]
    if missing:
        raise LoweringError(f"no ONNX translation for {', '.join(missing)}: add an OnnxOp with @onnx_lowering")
    return {spec.overload: spec.lowerings["onnx"].translate for spec in OPS.values()}


def _register_placeholder_schemas() -> None:
    """Let onnxscript build `fxpress::*` placeholder nodes (it looks ops up by schema)."""
    import onnx
    from onnx.defs import OpSchema

    for name, cls in ONNX_OPS.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        if cls.inputs < 0:
            inputs = [OpSchema.FormalParameter("inputs", "T", param_option=OpSchema.FormalParameterOption.Variadic,
                                               is_homogeneous=False)]
        else:
            inputs = [OpSchema.FormalParameter(f"input_{i}", "T", param_option=OpSchema.FormalParameterOption.Optional)
                      for i in range(cls.inputs)]
        schema = OpSchema(
            name, DOMAIN, 1,
            inputs=inputs,
            outputs=[OpSchema.FormalParameter("output", "T")],
            type_constraints=[("T", _SCHEMA_TYPES, "any tensor")],
            attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, t), "", required=False)
                        for a, t in cls.attributes.items()],
        )
        onnx.defs.register_schema(schema)


def placeholders() -> Any:
    """The onnxscript opset that builds placeholder nodes (`placeholders().LinearNBits(...)`)."""
    import onnxscript

    _register_placeholder_schemas()
    return onnxscript.values.Opset(DOMAIN, 1)


def like(out: Any, x: Any, last: int | None = None) -> Any:
    """Give a placeholder's output the dtype and shape of `x` (optionally a new last dim)."""
    import onnx_ir as ir

    out.dtype = x.dtype
    if x.shape is not None:
        dims = list(x.shape)
        if last is not None:
            dims[-1] = last
        out.shape = ir.Shape(dims)
    return out
