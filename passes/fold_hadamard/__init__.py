"""FoldHadamard: online Hadamards where a rotation cannot be folded away (R4 before down projections, R3 on q/k)."""

from fxpress.passes.fold_hadamard.fold_hadamard import FoldHadamard

__all__ = ["FoldHadamard"]
