"""What every ONNX op lowering builds with: initializers, nodes, placeholder replacement, fxpress functions.

`Materializer` rewrites one exported `onnx_ir` Model once weight values are known: each `fxpress`
placeholder node goes to its op's lowering (`OnnxOp.materialize`), which emits runnable nodes here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fxpress.errors import LoweringError

DOMAIN = "fxpress"
MS_DOMAIN = "com.microsoft"


class Materializer:
    """Rewrites one ir.Model's fxpress placeholder nodes; needs initializer values (known after export)."""

    def __init__(self, model: Any, weights: str, opset: int, accuracy_level: int = 0, sink: Any = None):
        import onnx_ir as ir

        self.ir = ir
        self.model = model
        self.graph = model.graph
        self.weights = weights
        self.opset = opset
        self.accuracy_level = accuracy_level
        self.sink = sink  # an external.ExternalData: initializers are written as made, not held (store-backed export)
        self.counter = 0
        self.functions: dict[str, Any] = {}
        self.shared: dict[str, dict[Any, tuple]] = {}  # packed tensor name -> layout -> initializers (tied tables)
        self.stats = {"matmulnbits": 0, "dequantizelinear": 0, "gatherblockquantized": 0, "exact_float64": 0, "functions": 0,
                      "warnings": []}

    def const(self, value: Any) -> np.ndarray | None:
        """The numpy value of a weight input (None for an absent optional input)."""
        if value is None:
            return None
        if value.const_value is None:
            raise LoweringError(f"'{value.name}' must be a constant weight for the ONNX lowering, but it is computed")
        return value.const_value.numpy()

    def initializer(self, name: str, array: np.ndarray, dtype: Any = None) -> Any:
        ir = self.ir
        self.counter += 1
        name = f"{name}__{self.counter}"
        tensor = ir.tensor(array, dtype=dtype, name=name)
        if self.sink is not None:
            tensor = self.sink.put(tensor)
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        self.graph.register_initializer(value)
        return value

    def node(self, before: Any, domain: str, op_type: str, inputs: list, attrs: dict | None = None) -> Any:
        ir = self.ir
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in (attrs or {}).items()]
        self.counter += 1
        new = ir.Node(domain, op_type, inputs, attributes, num_outputs=1, name=f"{op_type}_{self.counter}")
        self.graph.insert_before(before, new)
        return new.outputs[0]

    def slice_to(self, before: Any, value: Any, tag: str, end: int, axis: int | None = None) -> Any:
        """value[..., :end] along `axis` (the first axis when None): drops a last block's padding."""
        inputs = [value, self.initializer(f"{tag}.starts", np.array([0], dtype=np.int64)),
                  self.initializer(f"{tag}.ends", np.array([end], dtype=np.int64))]
        if axis is not None:
            inputs.append(self.initializer(f"{tag}.axes", np.array([axis], dtype=np.int64)))
        return self.node(before, "", "Slice", inputs)

    def replace(self, node: Any, out: Any) -> None:
        """Put `out` where the placeholder's output was (same name, shape and type) and drop the placeholder."""
        old = node.outputs[0]
        name = old.name
        old.name = f"{name}__placeholder"
        out.name = name
        out.shape = old.shape
        out.dtype = old.dtype if old.dtype is not None else node.inputs[0].dtype
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)

    def call_function(self, node: Any, name: str, build: Callable[[], Any], inputs: list) -> Any:
        """Replace `node` by a call of the fxpress function `name`, built (once per model) by `build`; returns
        the call node."""
        if name not in self.functions:
            function = self.ir.serde.deserialize_function(build())
            self.model.functions[function.identifier()] = function
            self.functions[name] = function
            self.stats["functions"] += 1
        out = self.node(node, DOMAIN, name, inputs)
        self.replace(node, out)
        return out.producer()

    def run(self, lowerings: Mapping[str, Any]) -> dict:
        """Materialize every placeholder with its lowering (placeholder op type -> OnnxOp); returns statistics.

        Lowerings marked `first` go first: a tied LM head then reuses the embedding table's layout."""
        for first in (True, False):
            for node in list(self.graph):
                lowering = lowerings.get(node.op_type) if node.domain == DOMAIN else None
                if lowering is not None and lowering.first == first:
                    lowering.materialize(self, node)
        self.model.opset_imports[DOMAIN] = 1
        if self.stats["matmulnbits"] or self.stats["gatherblockquantized"]:
            self.model.opset_imports[MS_DOMAIN] = 1
        _drop_unused_initializers(self.graph)
        return self.stats


def _drop_unused_initializers(graph: Any) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def node_attributes(node: Any, *names: str) -> list:
    """The values of a placeholder node's attributes, in the order asked."""
    return [node.attributes[name].value for name in names]


def function_proto(name: str, inputs: list[str], outputs: list[str], nodes: list, opset: int) -> Any:
    """An ONNX function in the fxpress domain over standard ops."""
    import onnx.helper as oh

    return oh.make_function(DOMAIN, name, inputs, outputs, nodes, [oh.make_opsetid("", opset)])


def constant(name: str, array: np.ndarray) -> Any:
    """A Constant node for a function body."""
    import onnx.helper as oh
    from onnx import numpy_helper

    return oh.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def numpy_dtype(dtype: int) -> Any:
    import onnx.helper as oh

    return oh.tensor_dtype_to_np_dtype(dtype)
