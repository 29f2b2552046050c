"""The fast paths of `fxpress::hadamard`: a generated TensorIR kernel, and a factored pure-PyTorch fallback.

Why a generated kernel: a Hadamard transform of n = K * 2^m costs n log n adds, but PyTorch can only run
it as separate GEMMs or elementwise passes, each a full trip through memory plus dispatch, which caps it
near 45x a dense rotation at n = 4096. The kernel below does a whole row in cache, one call per tensor:
- pass A: the low log2(V) bits as a V x V product, vectorised over V output lanes (V = one 64-byte
  register: 16 float32 or 8 float64), with the 1/sqrt(M) scale folded into its matrix;
- radix-R passes (R <= 2^RADIX_BITS) over the higher bits: R vectors in, R vectors out, each output an
  add/sub tree over shared sub-expressions (the butterfly), ping-ponging between the output row and a
  per-row scratch row so no pass reads what it writes;
- for K > 1, the K x K base as a last pass of vectorised multiply-adds over the K segments.
The text of the kernel is generated per (K, M, dtype) as TVMScript and built by TVM's LLVM backend for the
host CPU once per process; the TVM lowering of the op emits the same PrimFunc. Without TVM (an optional
extra) the op runs `factored`: one GEMM per radix-16 digit, each reading its input transposed so that no
copy is needed between digits.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

REGISTER_BYTES = 64  # one AVX-512 register, one cache line
RADIX_BITS = 2  # radix-4 butterfly passes above the vector: measured fastest on AVX-512 (2, 3 and 4 tried)
TREE_ORDER = 36  # K x K bases up to this order (12, 20, 28, 36) are one sum expression per output vector
TORCH_RADIX_BITS = 4  # the PyTorch fallback's GEMM digits: 16 x 16 factors
KERNEL_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def sylvester(r: int, dtype: Any = np.float64) -> np.ndarray:
    """The unnormalised Sylvester Hadamard matrix H_r (r a power of two)."""
    h = np.ones((1, 1), dtype=dtype)
    while h.shape[0] < r:
        h = np.block([[h, h], [h, -h]])
    return h


def lanes(m: int, dtype: str) -> int:
    """Vector lanes V of pass A: one register of `dtype`, at most the power-of-two part M."""
    return min(m, REGISTER_BYTES // np.dtype(dtype).itemsize)


def pass_a_matrix(m: int, dtype: str) -> np.ndarray:
    """H_V / sqrt(M): pass A's V x V matrix, carrying the whole 1/sqrt(M) normalisation."""
    v = lanes(m, dtype)
    return (sylvester(v) / math.sqrt(m)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# the generated TensorIR kernel
# ----------------------------------------------------------------------------------------------


def _butterfly(terms: list[str]) -> list[str]:
    """H_R applied to R expressions, as add/sub trees whose shared halves CSE merges (R log R ops)."""
    if len(terms) == 1:
        return terms
    lo, hi = _butterfly(terms[: len(terms) // 2]), _butterfly(terms[len(terms) // 2 :])
    return [f"({a} + {b})" for a, b in zip(lo, hi)] + [f"({a} - {b})" for a, b in zip(lo, hi)]


def _sum_tree(terms: list[str]) -> str:
    """A balanced sum (independent partial sums, not one serial chain)."""
    while len(terms) > 1:
        pairs = [f"({terms[i]} + {terms[i + 1]})" for i in range(0, len(terms) - 1, 2)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


def _radix_groups(bits: int) -> list[int]:
    """Split the bits above the vector into passes of at most RADIX_BITS bits each."""
    groups = []
    while bits > 0:
        groups.append(min(RADIX_BITS, bits))
        bits -= groups[-1]
    return groups


def _ref(buf: str, idx: str) -> str:
    return f"{buf}[r, {idx}]" if buf in ("x", "y") else f"{buf}[{idx}]"


def _passes(k: int, m: int, v: int, dtype: str) -> list[str]:
    """Kernel body lines (inside the row loop): pass A, the radix passes, then the K x K base."""
    n, groups = k * m, _radix_groups(int(math.log2(m // v)))
    count = 1 + len(groups) + (k > 1)
    dest = ["y" if (count - 1 - i) % 2 == 0 else "s" for i in range(count)]
    src = ["x", *dest[:-1]]
    # the scratch row is 64-byte aligned: the vector passes use aligned loads and stores
    lines = [f's = T.alloc_buffer(({n},), "{dtype}", align={REGISTER_BYTES})'] if count > 1 else []
    terms = [f"{_ref('x', f'j * {v} + {c}')} * h[{c}, o]" for c in range(v)]
    lines += [f"for j in range({n // v}):", f"    for o in T.vectorized({v}):",
              f"        {_ref(dest[0], f'j * {v} + o')} = {_sum_tree(terms)}"]
    low = v
    for i, g in enumerate(groups, start=1):
        span = low << g
        at = [f"b * {span} + l * {v} + {t * low} + o" for t in range(1 << g)]
        outs = _butterfly([_ref(src[i], a) for a in at])
        lines += [f"for b in range({n // span}):", f"    for l in range({low // v}):", f"        for o in T.vectorized({v}):"]
        lines += [f"            {_ref(dest[i], a)} = {e}" for a, e in zip(at, outs)]
        low = span
    if k > 1:
        lines += _base_pass(k, m, v, src[-1])
    return lines


def _base_pass(k: int, m: int, v: int, p: str) -> list[str]:
    """y[k2 segment] = sum_k1 base[k1, k2] * p[k1 segment], vectorised along the segment.

    Up to TREE_ORDER terms the sum is one balanced expression (kept in registers); a larger K
    accumulates into y term by term.
    """
    head = [f"for k2 in range({k}):", f"    for j in range({m // v}):"]
    if k <= TREE_ORDER:
        terms = [f"{_ref(p, f'{k1 * m} + j * {v} + o')} * base[{k1}, k2]" for k1 in range(k)]
        return head + [f"        for o in T.vectorized({v}):",
                       f"            y[r, k2 * {m} + j * {v} + o] = {_sum_tree(terms)}"]
    return head + [f"        for o in T.vectorized({v}):",
                   f"            y[r, k2 * {m} + j * {v} + o] = {_ref(p, f'j * {v} + o')} * base[0, k2]",
                   f"        for k1 in range(1, {k}):", f"            for o in T.vectorized({v}):",
                   f"                y[r, k2 * {m} + j * {v} + o] = y[r, k2 * {m} + j * {v} + o]"
                   f" + {_ref(p, f'k1 * {m} + j * {v} + o')} * base[k1, k2]"]


def tir_source(k: int, m: int, dtype: str = "float32") -> str:
    """TVMScript of the kernel for rows of n = k * m (m a power of two): f(x, h, base, y)."""
    v = lanes(m, dtype)
    head = [
        "@T.prim_func(private=True)",
        "def hadamard(var_x: T.handle, var_h: T.handle, var_base: T.handle, var_y: T.handle):",
        '    T.func_attr({"tir.noalias": True})',
        "    rows = T.int64()",
        f'    x = T.match_buffer(var_x, (rows, {k * m}), "{dtype}")',
        f'    h = T.match_buffer(var_h, ({v}, {v}), "{dtype}")',
        f'    base = T.match_buffer(var_base, ({k}, {k}), "{dtype}")',
        f'    y = T.match_buffer(var_y, (rows, {k * m}), "{dtype}")',
        "    for r in T.parallel(rows):",
    ]
    return "\n".join(head + ["        " + line for line in _passes(k, m, v, dtype)])


@lru_cache(maxsize=64)
def prim_func(k: int, m: int, dtype: str = "float32") -> Any:
    """The kernel as a TVM PrimFunc (parsed from `tir_source`), for the TVM lowering and the host build."""
    import tvm
    from tvm.script import tirx as T

    return tvm.script.from_source(tir_source(k, m, dtype), extra_vars={"T": T})


def kernel_name(k: int, m: int, dtype: str) -> str:
    return f"fxpress_hadamard_{k}x{m}_{dtype}"


@lru_cache(maxsize=64)
def _host_kernel(k: int, m: int, dtype: str) -> Any:
    """The kernel built for this CPU (LLVM, -mcpu = the host), or None where TVM is absent or fails."""
    try:
        import tvm
    except ImportError:
        return None
    name = kernel_name(k, m, dtype)
    try:
        target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
        module = tvm.IRModule({name: prim_func(k, m, dtype).with_attr("global_symbol", name)})
        # TIR's CSE is superlinear in the sum trees (17 s for K = 40, M = 64) and gains nothing: LLVM's GVN
        # merges the shared butterfly halves on its own (same speed measured with and without)
        with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            return tvm.compile(module, target=target)[name]
    except Exception:  # any TVM build failure: the op stays correct on the PyTorch path
        return None


_POOL = {"threads": 0}


def _match_threads() -> None:
    """TVM's pool runs as many threads as torch does (set only when torch's count changed)."""
    threads = torch.get_num_threads()
    if _POOL["threads"] != threads:
        import tvm

        tvm.get_global_func("runtime.config_threadpool")(1, threads)
        _POOL["threads"] = threads


def run_kernel(x2: torch.Tensor, base: torch.Tensor, m: int) -> torch.Tensor | None:
    """y = x2 @ (base ⊗ H_m / sqrt(m)) for a contiguous CPU [rows, n] tensor; None where no kernel applies."""
    dtype = KERNEL_DTYPES.get(x2.dtype)
    if dtype is None or x2.device.type != "cpu" or x2.shape[0] == 0:
        return None
    k = base.shape[0]
    fn = _host_kernel(k, m, dtype)
    if fn is None:
        return None
    _match_threads()
    h = _aligned(torch.from_numpy(pass_a_matrix(m, dtype)))
    y = torch.empty(x2.shape, dtype=x2.dtype)
    fn(_aligned(x2), h, _aligned(base.to(device="cpu", dtype=x2.dtype)), y)
    return y


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous at a 64-byte aligned address (TVM's buffers are declared so): a copy only when not."""
    t = t.contiguous()
    return t if t.data_ptr() % REGISTER_BYTES == 0 else t.clone(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# the PyTorch fallback and reference butterflies
# ----------------------------------------------------------------------------------------------


def radices(m: int, max_bits: int = TORCH_RADIX_BITS) -> list[int]:
    """Split M = 2^b into as few digits as possible, each of at most 2^max_bits, bits spread evenly."""
    bits = m.bit_length() - 1
    if bits == 0:
        return []
    stages = -(-bits // max_bits)
    return [1 << (bits // stages + (1 if i < bits % stages else 0)) for i in range(stages)]


@lru_cache(maxsize=32)
def _normalised(r: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.from_numpy(sylvester(r) / math.sqrt(r)).to(dtype=dtype, device=device)


def factored(x2: torch.Tensor, base: torch.Tensor, m: int) -> torch.Tensor:
    """y = x2 @ (base ⊗ H_m / sqrt(m)), one GEMM per index digit (K, then radix-16 digits of m).

    Each GEMM contracts the leading digit of every row, read transposed (a strided operand BLAS takes as
    is), and writes it as the trailing digit; after every digit has had its turn the order is restored.
    """
    rows, n = x2.shape
    base = base.to(x2.dtype)
    mats = [_normalised(r, x2.dtype, str(x2.device)) for r in radices(m)]
    if base.shape[0] > 1:
        mats.insert(0, base)
    elif mats:
        mats[0] = mats[0] * base.reshape(())  # a 1 x 1 base is a sign: fold it into a small factor
    else:
        return x2 * base.reshape(())
    y = x2
    for mat in mats:
        y = torch.matmul(y.reshape(rows, mat.shape[0], n // mat.shape[0]).transpose(1, 2), mat)
    return y.reshape(rows, n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dim (a power of two), via `factored`."""
    m = x.shape[-1]
    if m & (m - 1):
        raise ValueError(f"fwht needs a power-of-two last dim, got {m}")
    one = torch.ones(1, 1, dtype=x.dtype, device=x.device)
    return (factored(x.reshape(-1, m), one, m) * math.sqrt(m)).reshape(x.shape)


def fwht_radix2(x: torch.Tensor) -> torch.Tensor:
    """The textbook radix-2 butterfly (a + b, a - b per stage); kept as the reference the tests compare to."""
    m = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, m)
    h = 1
    while h < m:
        y = y.reshape(-1, m // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, m)
