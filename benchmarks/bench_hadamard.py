"""Speed of `fxpress::hadamard` against a dense n x n rotation, in PyTorch, ONNX Runtime and TVM, in one run.

    python benchmarks/bench_hadamard.py [--rows 256] [--repeats 7] [--threads 1] [--sizes 576 1536 4096 14336]
                                        [--runtimes torch onnx tvm]

For each size and runtime: the median time of the dense x @ Q (Q the same transform as a float32 matrix)
and of the op, in the same runtime, and their ratio. PyTorch: the op as called (the generated kernel when
TVM is installed) and its pure-PyTorch path (`factored`). ONNX Runtime: the function fxpress's ONNX
lowering emits against one MatMul by Q. TVM: the kernel fxpress's TVM lowering emits against Relax's
matmul by Q, both built for the host CPU with the export's pipeline (that matmul is unscheduled and
slow, so the kernel is also set against PyTorch's dense product). Every output is checked against
x @ Q before timing. The issue's target: >= 50x at n = 4096.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fxpress.runtime import hadamard as H
from fxpress.runtime import hadamard_kernel as HK

TOLERANCE = 1e-3


def _median_ms(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _check(name: str, n: int, got: np.ndarray, want: np.ndarray) -> None:
    err = float(np.abs(got - want).max())
    assert err < TOLERANCE, f"{name} and the dense rotation disagree at n={n}: max |diff| {err}"


def _torch_rows(x: torch.Tensor, base: torch.Tensor, dense: torch.Tensor, m: int, repeats: int) -> list[tuple]:
    want = (x @ dense).numpy()
    op = lambda: torch.ops.fxpress.hadamard(x, base)  # noqa: E731
    fallback = lambda: HK.factored(x, base, m)  # noqa: E731
    _check("torch op", x.shape[1], op().numpy(), want)
    _check("torch factored", x.shape[1], fallback().numpy(), want)
    t_dense = _median_ms(lambda: x @ dense, repeats)
    return [("torch", "op", t_dense, _median_ms(op, repeats)),
            ("torch", "factored (no TVM)", t_dense, _median_ms(fallback, repeats))]


def _onnx_session(nodes: list, functions: list, initializers: list, threads: int):
    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    from fxpress.lowering.onnx.builder import DOMAIN

    graph = oh.make_graph(nodes, "bench", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers)
    model = oh.make_model(graph, functions=functions, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _onnx_rows(x: torch.Tensor, base: torch.Tensor, dense: torch.Tensor, k: int, m: int, repeats: int,
               threads: int) -> list[tuple]:
    import onnx
    import onnx.helper as oh
    from onnx import numpy_helper

    from fxpress.lowering.onnx.builder import DOMAIN
    from fxpress.lowering.onnx.ops.hadamard import _hadamard_function

    fn = _hadamard_function(k, m, onnx.TensorProto.FLOAT, 18)
    op = _onnx_session([oh.make_node(fn.name, ["x", "base"], ["y"], domain=DOMAIN)], [fn],
                       [numpy_helper.from_array(base.numpy(), "base")], threads)
    mm = _onnx_session([oh.make_node("MatMul", ["x", "q"], ["y"])], [], [numpy_helper.from_array(dense.numpy(), "q")], threads)
    feed = {"x": x.numpy()}
    _check("onnx function", x.shape[1], op.run(None, feed)[0], (x @ dense).numpy())
    return [("onnxruntime", "fxpress function", _median_ms(lambda: mm.run(None, feed), repeats),
             _median_ms(lambda: op.run(None, feed), repeats))]


def _tvm_build(body: Callable, x: torch.Tensor, threads: int):
    import tvm
    from tvm import relax

    from fxpress.lowering.tvm.build import _pipeline

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(x.shape), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, xv))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": threads})
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target, relax_pipeline=_pipeline(target)), tvm.cpu())
    xt = tvm.runtime.tensor(x.numpy())  # converted once: the PyTorch and ONNX Runtime rows time no input copy either
    return lambda: vm["main"](xt)


def _tvm_rows(x: torch.Tensor, base: torch.Tensor, dense: torch.Tensor, k: int, m: int, repeats: int,
              threads: int) -> list[tuple]:
    import tvm
    from tvm import relax

    tvm.get_global_func("runtime.config_threadpool")(1, threads)

    def op_body(bb, xv):
        gv = bb.add_func(HK.prim_func(k, m, "float32"), HK.kernel_name(k, m, "float32"))
        args = [xv, relax.const(HK.pass_a_matrix(m, "float32")), relax.const(base.numpy())]
        return relax.call_tir(gv, args, out_ty=relax.TensorType(list(x.shape), "float32"))

    op = _tvm_build(op_body, x, threads)
    mm = _tvm_build(lambda bb, xv: relax.op.matmul(xv, relax.const(dense.numpy())), x, threads)
    _check("tvm kernel", x.shape[1], op().numpy(), (x @ dense).numpy())
    t_op = _median_ms(op, repeats)
    # TVM's matmul as fxpress's export builds it is unscheduled (~1 min for 32 x 4096 x 4096): timed once;
    # the kernel is also set against PyTorch's (MKL) dense product, the stronger baseline
    return [("tvm", "fxpress kernel", _median_ms(mm, 1, warm_up=False), t_op),
            ("tvm", "vs torch dense", _median_ms(lambda: x @ dense, repeats), t_op)]


def bench(n: int, rows: int, repeats: int, runtimes: list[str], threads: int) -> tuple[str, list[tuple]]:
    plan = H.plan(n)
    base = H.base_matrix(plan).to(torch.float32)
    # Q = base ⊗ H_M / sqrt(M), built by kron (independent of the op), in float32 (14336^2: 0.8 GB)
    dense = torch.kron(base, torch.from_numpy(HK.sylvester(plan.m, np.float32) / np.float32(np.sqrt(plan.m))))
    x = torch.randn(rows, n)
    out = []
    if "torch" in runtimes:
        out += _torch_rows(x, base, dense, plan.m, repeats)
    if "onnx" in runtimes:
        out += _onnx_rows(x, base, dense, plan.k, plan.m, repeats, threads)
    if "tvm" in runtimes:
        out += _tvm_rows(x, base, dense, plan.k, plan.m, repeats, threads)
    return plan.describe(), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="tokens per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 14336])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx", "tvm"], choices=["torch", "onnx", "tvm"])
    parser.add_argument("--threads", type=int, default=1, help="threads for every runtime (default 1: kernel cost)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rows} rows, float32, load average {load}")
    print(f"{'n':>6}  {'plan':<30} {'runtime':<12} {'path':<18} {'dense ms':>9} {'op ms':>8} {'ratio':>8}")
    for n in args.sizes:
        plan, results = bench(n, args.rows, args.repeats, args.runtimes, args.threads)
        for runtime, path, t_dense, t_op in results:
            print(f"{n:>6}  {plan:<30} {runtime:<12} {path:<18} {t_dense:>9.2f} {t_op:>8.2f} {t_dense / t_op:>7.1f}x")


if __name__ == "__main__":
    main()
