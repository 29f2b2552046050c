"""The pass manager: validate the whole pipeline first, then run, lint and check each pass."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from fxpress.calibration import validate_calibration
from fxpress.checks import check_finite, graph_tensors
from fxpress.errors import ConfigError, FxpressError, PassError, PassOrderError
from fxpress.heap import trim_heap
from fxpress.passes.base import FACTS, PASS_REGISTRY, UNCOMPRESSED, Pass, PassResult

if TYPE_CHECKING:
    from fxpress.program import Program


def facts_after(history: Sequence[str], start: Iterable[str] = UNCOMPRESSED) -> set[str]:
    """The facts that hold once the named registered passes have run from `start`.

    For programs that do not record their facts (artifacts saved before they were recorded).
    """
    facts = set(start)
    for name in history:
        if name in PASS_REGISTRY:
            facts = _apply(PASS_REGISTRY[name], facts)
    return facts


def _apply(p: Pass | type[Pass], facts: set[str]) -> set[str]:
    return (facts - p.invalidates) | p.establishes


def validate_pipeline(
    passes: Sequence[Pass], history: Sequence[str] = (), has_calibration: bool = True, facts: Iterable[str] | None = None
) -> None:
    """Every error a pipeline can be known to have before it runs: bad fields, order, missing data.

    `facts` hold before the first pass (by default those after `history` on a fresh capture).
    """
    for p in passes:
        if not isinstance(p, Pass):
            raise ConfigError(f"{p!r} is not an fxpress pass: use the classes in fxpress.passes (e.g. Rotate())")
        p.validate()
    holding = facts_after(history) if facts is None else set(facts)
    ran: list[Pass | type[Pass] | str] = [PASS_REGISTRY.get(name, name) for name in history]
    for p in passes:
        missing = [fact for fact in FACTS if fact in p.requires - holding]  # in FACTS order, the plainest first
        if missing:
            raise PassOrderError(_order_message(p, missing[0], ran))
        if p.needs_calibration and not has_calibration:
            raise ConfigError(f"pass '{p.name}' needs calibration data: pass calibration=... to fxpress.compile")
        holding = _apply(p, holding)
        ran.append(p)


def _order_message(p: Pass, fact: str, ran: Sequence[Pass | type[Pass] | str]) -> str:
    """Say which earlier pass took away the fact `p` requires, and how to order them."""
    meaning = FACTS.get(fact, fact)
    culprit = next((r for r in reversed(ran) if not isinstance(r, str) and fact in r.invalidates), None)
    if culprit is not None:
        why = f"('{p.name}' requires {fact}: {meaning}; '{culprit.name}' invalidates it)"
        if culprit.name == p.name:
            return f"'{p.name}' cannot run twice {why}"
        return f"'{p.name}' cannot run after '{culprit.name}': list '{p.name}' before '{culprit.name}' in passes=[...] {why}"
    makers = sorted(name for name, cls in PASS_REGISTRY.items() if fact in cls.establishes)
    hint = f"run {' or '.join(repr(m) for m in makers)} before it" if makers else "no registered pass establishes it"
    return f"'{p.name}' requires {fact} ({meaning}), which does not hold here: {hint}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b|: the equivalence measure used for function-preserving passes (NaN if either has NaN)."""
    actual, expected = actual.detach(), expected.detach()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("nan")  # inf - inf and NaN comparisons would otherwise hide the failure
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


NOISE_EPS = 8  # a half-precision program's outputs move by a few ulps (eps) when its weights are rounded again


def equivalence_tolerance(p: Pass, reference: torch.Tensor) -> float:
    """The pass's tolerance, widened to the rounding noise of the outputs' dtype (bf16 eps is 7.8e-3).

    A function-preserving pass on a bf16/fp16 model rewrites weights in float64 and rounds them back, which
    changes the outputs by a few ulps of that dtype; for float32/float64 the pass's own tolerance wins.
    """
    eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0.0
    return max(p.tolerance, NOISE_EPS * eps)


def run_passes(program: Program, passes: Sequence[Pass], verify: bool = True, progress: bool = True) -> list[PassResult]:
    """Run `passes` over `program` in order; on failure name the pass and those before it."""
    if program.facts is None:
        program.facts = facts_after(program.history)
    validate_pipeline(passes, program.history, program.calibration is not None, program.facts)
    if program.calibration is not None:
        validate_calibration(program.calibration, program.info)
    results = []
    latest = None  # the outputs after the last pass: the next pass's reference (a store-backed run reads every weight)
    for p in tqdm(passes, desc="passes", disable=not progress or len(passes) < 2, leave=False):
        ran_before = list(program.history)
        reference = None
        if verify and p.preserves_function:
            reference = latest if latest is not None else program.reference_logits()
        result = _run_one(program, p, ran_before)
        if program.weights is not None:  # under a memory budget: the next stage starts from what is really held
            trim_heap()
        latest = _check_after(program, p, result, reference, ran_before, verify)
        if not result.modified:
            _warn_nothing_done(result)
        program.history.append(p.name)
        program.facts = _apply(p, program.facts)
        program.report.append(result)
        results.append(result)
    return results


def _run_one(program: Program, p: Pass, ran_before: list[str]) -> PassResult:
    """Run one pass and lint its graph; any failure becomes a PassError naming it."""
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
    return result


def _check_after(program: Program, p: Pass, result: PassResult, reference: torch.Tensor | None,
                 ran_before: list[str], verify: bool) -> torch.Tensor | None:
    """No NaN/inf in the graph's tensors (or, when verifying, its output), and a function-preserving pass kept the function.

    Every in-memory get_attr tensor is summed (one reduction each: about 0.05 s for a 135M-parameter model); stored
    ones are not read again, the store checked each when it was set. Returns the output on the example inputs
    (None without `verify`).
    """
    try:
        check_finite(graph_tensors(program.module), "tensor", FxpressError, "the pass wrote NaN/inf into the graph")
        if not verify:
            return None
        output = program.reference_logits()
        name = program.info.output_names[0] if program.info.output_names else "output"
        check_finite([(name, output)], "output", FxpressError, "the pass made the output on the example inputs NaN/inf")
    except FxpressError as err:
        raise PassError(p.name, ran_before, str(err)) from err
    if reference is None:
        return output
    error = relative_error(output, reference)
    result.stats["equivalence_rel_error"] = error
    tolerance = equivalence_tolerance(p, reference)
    if not error <= tolerance:  # NaN compares False: it fails
        raise PassError(
            p.name, ran_before,
            f"it promises to keep the function but changed the outputs by {error:.2e} relative (> {tolerance:.0e})",
        )
    return output


def _warn_nothing_done(result: PassResult) -> None:
    """A pass that changed nothing says so in the report and on the console: a silent no-op looks like success."""
    if not result.warnings:
        result.warnings.append("it found nothing to do: the program is unchanged")
    warnings.warn(f"pass '{result.name}' changed nothing: {'; '.join(result.warnings)}", UserWarning, stacklevel=3)
