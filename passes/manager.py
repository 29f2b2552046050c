"""The pass manager: validate the whole pipeline first, then run, lint and check each pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from fxpress.errors import ConfigError, FxpressError, PassError, PassOrderError
from fxpress.passes.base import Pass, PassResult

if TYPE_CHECKING:
    from fxpress.program import Program


def validate_pipeline(passes: Sequence[Pass], history: Sequence[str] = (), has_calibration: bool = True) -> None:
    """Every error a pipeline can be known to have before it runs: bad fields, order, missing data."""
    for p in passes:
        if not isinstance(p, Pass):
            raise ConfigError(f"{p!r} is not an fxpress pass: use the classes in fxpress.passes (e.g. Rotate())")
        p.validate()
    ran = list(history)
    for p in passes:
        for earlier in p.not_after:
            if earlier in ran:
                raise PassOrderError(
                    f"'{p.name}' cannot run after '{earlier}': list '{p.name}' before '{earlier}' in passes=[...]"
                )
        if p.needs_calibration and not has_calibration:
            raise ConfigError(f"pass '{p.name}' needs calibration data: pass calibration=... to fxpress.compile")
        ran.append(p.name)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b|: the equivalence measure used for function-preserving passes."""
    scale = expected.detach().abs().max().clamp_min(1e-12)
    return float((actual.detach() - expected.detach()).abs().max() / scale)


def run_passes(program: Program, passes: Sequence[Pass], verify: bool = True, progress: bool = True) -> list[PassResult]:
    """Run `passes` over `program` in order; on failure name the pass and those before it."""
    validate_pipeline(passes, program.history, program.calibration is not None)
    results = []
    for p in tqdm(passes, desc="passes", disable=not progress or len(passes) < 2, leave=False):
        ran_before = list(program.history)
        reference = program.reference_logits() if verify and p.preserves_function else None
        try:
            result = p(program)
            program.module.graph.lint()
            program.module.recompile()
        except FxpressError as err:
            if isinstance(err, PassError):
                raise
            raise PassError(p.name, ran_before, str(err)) from err
        except Exception as err:  # a bug or an unsupported graph: still say which pass
            raise PassError(p.name, ran_before, f"{type(err).__name__}: {err}") from err
        if reference is not None:
            error = relative_error(program.reference_logits(), reference)
            result.stats["equivalence_rel_error"] = error
            if error > p.tolerance:
                raise PassError(
                    p.name, ran_before,
                    f"it promises to keep the function but changed the outputs by {error:.2e} relative (> {p.tolerance:.0e})",
                )
        program.history.append(p.name)
        program.report.append(result)
        results.append(result)
    return results
