"""accuracy_level="auto": MatMulNBits' compute type chosen by timing it on this CPU, once per process.

Level 0 computes in the activations' float type (matches PyTorch to ~1e-6); level 4 quantizes activations to
int8 per block and uses the CPU's int8 dot products (AVX2/AVX-512 VNNI, ARM dot-product), several times faster
at batch 1 where the CPU has them and ~1e-2 relative error. "auto" times one decode-shaped int4 MatMulNBits
(1 x 576 @ 576 x 1536, block 32, one thread) at both levels and keeps 4 when it is at least 10% faster.
"""

from __future__ import annotations

import functools
import time

import numpy as np

AUTO_SHAPE = (576, 1536, 32)  # K, N, block: SmolLM2's gate/up projection, a typical decode kernel
AUTO_MARGIN = 0.9  # level 4 must take <= 90% of level 0's time


def _session(level: int, k: int, n: int, block: int):
    import onnx.helper as oh
    import onnxruntime as ort
    from onnx import TensorProto

    blob = block // 2
    rng = np.random.default_rng(0)
    weights = [oh.make_tensor("B", TensorProto.UINT8, [n, k // block, blob],
                              rng.integers(0, 256, n * k // 2, dtype=np.uint8).tobytes(), raw=True),
               oh.make_tensor("S", TensorProto.FLOAT, [n * k // block],
                              (rng.random(n * k // block, dtype=np.float32) * 0.01).tobytes(), raw=True)]
    node = oh.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                        block_size=block, accuracy_level=level)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(session, x: np.ndarray, reps: int = 200) -> float:
    for _ in range(20):
        session.run(None, {"x": x})
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


@functools.cache
def measure_accuracy_level() -> tuple[int, dict[int, float]]:
    """(the level to use on this CPU, median ms per MatMulNBits call at levels 0 and 4)."""
    k, n, block = AUTO_SHAPE
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    timings = {level: _median_ms(_session(level, k, n, block), x) for level in (0, 4)}
    return (4 if timings[4] <= AUTO_MARGIN * timings[0] else 0), timings
