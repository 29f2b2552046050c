"""Speed of `fxpress::hadamard` (butterfly) against a dense n x n rotation, measured side by side in one run.

    python benchmarks/bench_hadamard.py [--rows 256] [--repeats 7] [--threads 1] [--sizes 576 1536 4096 14336]

For each size: the median time of x @ Q (Q the same transform as a dense float32 matrix) and of the
op itself (radix-16 butterfly + K x K base), their ratio, and the textbook radix-2 butterfly for
reference. The outputs are checked to agree before timing. The issue's target: >= 5x at n = 4096.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fxpress.runtime import hadamard as H


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(n: int, rows: int, repeats: int) -> dict[str, float | str]:
    plan = H.plan(n)
    base = H.base_matrix(plan).to(torch.float32)
    dense = H.dense_matrix(plan, H.base_matrix(plan)).to(torch.float32)
    x = torch.randn(rows, n)
    err = (torch.ops.fxpress.hadamard(x, base) - x @ dense).abs().max().item()
    assert err < 1e-3, f"butterfly and dense disagree at n={n}: {err}"
    t_dense = _median_seconds(lambda: x @ dense, repeats)
    t_op = _median_seconds(lambda: torch.ops.fxpress.hadamard(x, base), repeats)
    t_radix2 = _median_seconds(lambda: H.fwht_radix2(x.reshape(rows, plan.k, plan.m)), repeats)
    return {"n": n, "plan": plan.describe(), "dense_ms": 1e3 * t_dense, "op_ms": 1e3 * t_op,
            "radix2_fwht_ms": 1e3 * t_radix2, "speedup": t_dense / t_op, "max_abs_diff": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="tokens per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 14336])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: kernel cost, immune to other load; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows, float32")
    print(f"{'n':>6}  {'plan':<32} {'dense ms':>9} {'op ms':>8} {'radix-2 ms':>10} {'speedup':>8}")
    for n in args.sizes:
        r = bench(n, args.rows, args.repeats)
        print(f"{r['n']:>6}  {r['plan']:<32} {r['dense_ms']:>9.2f} {r['op_ms']:>8.2f} {r['radix2_fwht_ms']:>10.2f} "
              f"{r['speedup']:>7.1f}x")


if __name__ == "__main__":
    main()
