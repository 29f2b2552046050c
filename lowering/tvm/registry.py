"""Each fxpress op's TVM lowering is one converter (fx node -> Relax expression), registered in the op table."""

from __future__ import annotations

from collections.abc import Callable

from fxpress.errors import LoweringError
from fxpress.runtime.ops import OPS, register_lowering

TVM_CONVERTERS: dict[str, Callable] = {}  # fxpress op name -> converter


def tvm_lowering(op_name: str) -> Callable[[Callable], Callable]:
    """Decorator: the TVM converter of `fxpress::op_name`."""

    def wrap(convert: Callable) -> Callable:
        TVM_CONVERTERS[op_name] = convert
        _register(op_name, convert)
        return convert

    return wrap


def _register(op_name: str, convert: Callable) -> None:
    if op_name in OPS and "tvm" not in OPS[op_name].lowerings:
        register_lowering(op_name, "tvm")(convert)


def register_converters() -> None:
    """Register every TVM converter for the ops that exist now (idempotent; ops defined later need a call)."""
    import fxpress.runtime  # noqa: F401  (defines the ops)

    for op_name, convert in TVM_CONVERTERS.items():
        _register(op_name, convert)


def convert_map() -> dict[str, Callable]:
    """from_exported_program's custom_convert_map: keyed by the node target's __name__ ('linear_nbit.default')."""
    register_converters()
    missing = [spec.qualname for spec in OPS.values() if "tvm" not in spec.lowerings]
    if missing:
        raise LoweringError(f"no TVM converter for {', '.join(missing)}: add one with @tvm_lowering(op)")
    return {spec.overload.__name__: spec.lowerings["tvm"] for spec in OPS.values()}
