"""`fxpress::hadamard`: the normalised Walsh-Hadamard transform of the last dim, n = K * 2^m, as a butterfly.

The transform is y = x @ (B ⊗ H_M / sqrt(M)) with M = 2^m and B a K x K orthogonal "base" (a
normalised Hadamard matrix of order K, or a documented fallback when no construction covers K).
The M part runs as a butterfly (O(n log n)) and the K part as one small K x K contraction (O(n K)), in
one generated kernel or one GEMM per index digit (`fxpress.runtime.hadamard_kernel`). Nothing on the hot
path is a dense n x n matmul.

Hadamard matrices of order K are built here, never copied from tables:
- Sylvester doubling H_2K = [[H, H], [H, -H]];
- Paley I (q = K - 1 a prime power, q = 3 mod 4) and Paley II (q = K/2 - 1, q = 1 mod 4), over GF(p)
  and GF(p^2) (e.g. 52 needs GF(25));
- which covers 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 148, 152 and many more;
- orders 156 = 4*39 and 172 = 4*43 from four circulants found by our search `tools/find_williamson.py`
  (stored in `fxpress.runtime.hadamard_data`): the Goethals-Seidel array (156) and the Williamson
  array (172), checked H H^T = k I when built.
Any other uncovered K uses a fallback, reported by `HadamardPlan.fallback`:
- "orthogonal": B is a seeded random orthogonal K x K matrix (QR with sign fix); y is still an exact
  rotation and costs O(n (m + K)), but its entries are not all +-1/sqrt(n);
- "block": B is block-diagonal with normalised Hadamard blocks whose orders sum to K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from fxpress.errors import ConfigError
from fxpress.runtime.hadamard_data import CIRCULANT_ROWS
from fxpress.runtime.hadamard_kernel import factored, run_kernel
from fxpress.runtime.ops import define_op

FALLBACKS = ("orthogonal", "block", "error")
KNOWN_ORDERS = (1, 2, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 148, 152, 156, 172)  # the usual set
MAX_ORDER = 1024  # largest base order tried (the base costs n*K per row)

# ----------------------------------------------------------------------------------------------
# finite fields and Paley constructions
# ----------------------------------------------------------------------------------------------


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for an odd prime p and k in {1, 2}, else None (fields fxpress implements)."""
    if q < 3 or q % 2 == 0:
        return None
    if _is_prime(q):
        return q, 1
    r = math.isqrt(q)
    if r * r == q and _is_prime(r):
        return r, 2
    return None


def _residues(p: int) -> np.ndarray:
    """chi_p(a) for a = 0..p-1 (the Legendre symbol), vectorised."""
    chi = -np.ones(p, dtype=np.int64)
    chi[(np.arange(1, p) ** 2) % p] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(x_i - x_j) over GF(q), q = p or p^2 (GF(p^2) = GF(p)[t]/(t^2 - r), r a non-residue)."""
    p, k = _prime_power(q)
    chi = _residues(p)
    if k == 1:
        idx = np.arange(p)
        return chi[(idx[:, None] - idx[None, :]) % p]
    r = int(np.nonzero(chi == -1)[0][0])
    a = np.repeat(np.arange(p), p)  # element i = a_i + b_i t
    b = np.tile(np.arange(p), p)
    da = (a[:, None] - a[None, :]) % p
    db = (b[:, None] - b[None, :]) % p
    norm = (da * da - r * db * db) % p  # chi_{p^2}(z) = chi_p(N(z)), N(a + bt) = a^2 - r b^2
    out = chi[norm]
    out[(da == 0) & (db == 0)] = 0
    return out


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    qm = _jacobsthal(q)
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = qm
    return np.eye(n, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for q = 1 mod 4: S = [[0, 1^T], [1, Q]]; H = S ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    qm = _jacobsthal(q)
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = qm
    a = np.array([[1, 1], [1, -1]], dtype=np.int64)
    b = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(s, a) + np.kron(np.eye(n, dtype=np.int64), b)


def _sylvester(h: np.ndarray) -> np.ndarray:
    return np.block([[h, h], [h, -h]])


def _circulants(rows: tuple[str, ...]) -> list[np.ndarray]:
    """Circulant matrices (row i = first row shifted right by i) from "+"/"-" first rows."""
    out = []
    for row in rows:
        first = np.array([1 if c == "+" else -1 for c in row], dtype=np.int64)
        out.append(np.stack([np.roll(first, i) for i in range(first.size)]))
    return out


def _from_circulants(k: int) -> np.ndarray:
    """Order k from the stored circulants: Williamson array, or Goethals-Seidel array (R the back-diagonal)."""
    kind, rows = CIRCULANT_ROWS[k]
    a, b, c, d = _circulants(rows)
    if kind == "williamson":
        return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])
    r = np.eye(a.shape[0], dtype=np.int64)[::-1]
    return np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )


def _check(h: np.ndarray) -> bool:
    n = h.shape[0]
    return bool(np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64)))


@cache
def _construct(k: int) -> tuple[np.ndarray, str] | None:
    """An unnormalised +-1 Hadamard matrix of order k and how it was built, or None."""
    if k == 1:
        return np.ones((1, 1), dtype=np.int64), "trivial"
    if k == 2:
        return _sylvester(np.ones((1, 1), dtype=np.int64)), "sylvester"
    if k % 4 or k > MAX_ORDER:
        return None
    candidates = []
    if k in CIRCULANT_ROWS:
        candidates.append((lambda: _from_circulants(k), f"{CIRCULANT_ROWS[k][0]}(n={k // 4})"))
    if _prime_power(k - 1) and (k - 1) % 4 == 3:
        candidates.append((lambda: _paley1(k - 1), f"paley1(q={k - 1})"))
    if k % 2 == 0 and _prime_power(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        candidates.append((lambda: _paley2(k // 2 - 1), f"paley2(q={k // 2 - 1})"))
    for build, how in candidates:
        h = build()
        if _check(h):
            return h, how
    half = _construct(k // 2)
    if half is not None:
        return _sylvester(half[0]), f"sylvester({half[1]})"
    return None


def hadamard_order_matrix(k: int) -> np.ndarray | None:
    """The unnormalised Hadamard matrix of order k that fxpress builds, or None when it has none."""
    found = _construct(k)
    return None if found is None else found[0].copy()


def construction(k: int) -> str | None:
    """How the order-k matrix is built ('paley1(q=11)', 'sylvester(...)'), or None."""
    found = _construct(k)
    return None if found is None else found[1]


# ----------------------------------------------------------------------------------------------
# plans: n = K * M, base matrix, fallbacks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HadamardPlan:
    """How size n is transformed: n = k * m (m a power of two), the k x k base and any fallback used."""

    n: int
    k: int
    m: int
    construction: str
    fallback: str | None  # None, "orthogonal" or "block"

    @property
    def is_hadamard(self) -> bool:
        return self.fallback is None

    def cost(self) -> int:
        """Adds/multiply-adds per row: n*log2(M) for the butterfly plus n*K for the base (K > 1)."""
        return self.n * int(math.log2(self.m)) + (self.n * self.k if self.k > 1 else 0)

    def describe(self) -> str:
        how = self.construction if self.fallback is None else f"{self.fallback} fallback"
        return f"{self.n} = {self.k}*{self.m} ({how})"


def _pow2_part(n: int) -> int:
    return n & -n


def plan(n: int, fallback: str = "orthogonal") -> HadamardPlan:
    """Choose K (smallest constructible) with n = K * 2^m; else the documented fallback."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"a Hadamard transform needs a positive integer size, got {n!r}")
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback = {fallback!r} is not allowed: choose one of {', '.join(FALLBACKS)}")
    m = _pow2_part(n)
    while m >= 1:
        k = n // m
        how = construction(k)
        if how is not None:
            return HadamardPlan(n, k, m, how, None)
        m //= 2
    if fallback == "error":
        raise ConfigError(
            f"no Hadamard matrix of size {n} = {n // _pow2_part(n)}*{_pow2_part(n)}: fxpress builds orders K*2^m for "
            f"K from Sylvester and Paley constructions ({', '.join(map(str, [k for k in KNOWN_ORDERS if construction(k)]))}, ...); "
            "use fallback='orthogonal' (random orthogonal K x K base) or 'block' (block-diagonal Hadamard)"
        )
    m = _pow2_part(n)
    return HadamardPlan(n, n // m, m, f"{fallback}({n // m})", fallback)


def _block_sizes(k: int) -> list[int]:
    """Greedy split of k into orders fxpress can build (largest first)."""
    sizes, rest = [], k
    while rest > 0:
        best = max(s for s in range(1, rest + 1) if construction(s) is not None)
        sizes.append(best)
        rest -= best
    return sizes


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64): QR of a Gaussian with the sign fix Q * sign(diag R)."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def base_matrix(p: HadamardPlan, seed: int = 0) -> torch.Tensor:
    """The K x K orthogonal base of a plan (float64): normalised Hadamard, or the fallback's matrix."""
    if p.fallback is None:
        h = torch.from_numpy(hadamard_order_matrix(p.k)).to(torch.float64)
        return h / math.sqrt(p.k)
    if p.fallback == "orthogonal":
        return random_orthogonal(p.k, torch.Generator().manual_seed(seed))
    blocks = [torch.from_numpy(hadamard_order_matrix(s)).to(torch.float64) / math.sqrt(s) for s in _block_sizes(p.k)]
    return torch.block_diag(*blocks)


# ----------------------------------------------------------------------------------------------
# the butterfly
# ----------------------------------------------------------------------------------------------


def hadamard_transform(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """y = x @ (base ⊗ H_M / sqrt(M)) over the last dim, with K = base.shape[0] and M = n / K.

    float32 on CPU runs the generated kernel (`hadamard_kernel.run_kernel`: one call, each row in cache);
    float64 (offline weight rotation), other devices, or no TVM run `factored` (one small GEMM per index
    digit). Half precision computes in float32. Never an n x n matrix.
    """
    n = x.shape[-1]
    k = base.shape[0]
    if n % k or _pow2_part(n // k) != n // k:
        raise ValueError(f"hadamard: last dim {n} is not {k} * 2^m")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x2 = x.to(compute).reshape(-1, n)
    # float64 is the offline (pass-time) dtype: the GEMM path, not one kernel build per size per process
    y = run_kernel(x2, base, n // k) if compute == torch.float32 else None
    if y is None:
        y = factored(x2, base.to(device=x.device), n // k)
    return y.reshape(x.shape).to(x.dtype)


def _fake(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


HADAMARD = define_op(
    "hadamard",
    "(Tensor x, Tensor base) -> Tensor",
    hadamard_transform,
    _fake,
    "Orthogonal Hadamard transform of the last dim n = K*2^m: y = x @ (base ⊗ H_{2^m}/sqrt(2^m)), base K x K "
    "orthogonal (a normalised Hadamard, or a fallback). Butterfly, O(n log n + nK).",
)


def _keep_base(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.base = inputs[1]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    """dL/dx = dL/dy @ Q^T, and Q^T = base^T ⊗ H_M / sqrt(M) (Sylvester H_M is symmetric): the same op on base^T.
    Gradients reach through online Hadamards (e.g. the Fisher sensitivities of quantize_experts)."""
    return torch.ops.fxpress.hadamard(grad.contiguous(), ctx.base.T.contiguous()), None


torch.library.register_autograd("fxpress::hadamard", _backward, setup_context=_keep_base)


# ----------------------------------------------------------------------------------------------
# helpers for passes
# ----------------------------------------------------------------------------------------------


def apply_rows(w: torch.Tensor, p: HadamardPlan, base: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """W with `axis` multiplied by the plan's transform (W_axis -> W_axis @ H), in float64 via the butterfly."""
    moved = w.to(torch.float64).movedim(axis, -1)
    return hadamard_transform(moved, base.to(torch.float64)).movedim(-1, axis)


def dense_matrix(p: HadamardPlan, base: torch.Tensor) -> torch.Tensor:
    """The full n x n orthogonal matrix of a plan (float64), for offline folding and tests only."""
    return hadamard_transform(torch.eye(p.n, dtype=torch.float64), base.to(torch.float64))


@dataclass
class Rotation:
    """An n x n orthogonal Q applied as x -> x @ Q along an axis, in float64.

    Either dense (`matrix`), or QuaRot's randomised Hadamard diag(signs) @ (base ⊗ H_M), applied with the
    butterfly so that rotating a [V, n] embedding costs V*n*(log M + K), not V*n^2.
    """

    n: int
    matrix: torch.Tensor | None = None
    signs: torch.Tensor | None = None
    plan: HadamardPlan | None = None
    base: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """x with `axis` multiplied by Q from the right (float64 result)."""
        moved = x.to(torch.float64).movedim(axis, -1)
        if self.matrix is not None:
            out = moved @ self.matrix.to(torch.float64)
        else:
            out = hadamard_transform(moved * self.signs, self.base)
        return out.movedim(-1, axis)

    def dense(self) -> torch.Tensor:
        """Q as a dense float64 matrix."""
        return self.apply(torch.eye(self.n, dtype=torch.float64))

    def describe(self) -> str:
        if self.matrix is not None:
            return f"dense orthogonal {self.n}x{self.n}"
        return f"random Hadamard {self.plan.describe()}"


def random_hadamard_rotation(n: int, seed: int = 0, fallback: str = "orthogonal") -> Rotation:
    """diag(random +-1) @ H_n as a Rotation (butterfly-applied)."""
    p = plan(n, fallback)
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.float64)
    return Rotation(n, signs=signs, plan=p, base=base_matrix(p, seed))


def random_orthogonal_rotation(n: int, seed: int = 0) -> Rotation:
    """A Haar-random orthogonal Rotation (QR with sign fix), seeded."""
    return Rotation(n, matrix=random_orthogonal(n, torch.Generator().manual_seed(seed)))

