"""The `fxpress` command: compile, eval, passes. Same pass names and fields as recipes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxpress.errors import FxpressError, RecipeError

if TYPE_CHECKING:
    import torch

    from fxpress.compiled import CompiledModel
    from fxpress.passes.base import Pass


def _console():
    from rich.console import Console

    return Console()


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _build_passes(args: argparse.Namespace) -> list[Pass]:
    """Passes from --recipe or --passes, then --set PASS.FIELD=VALUE overrides; every name checked."""
    import fxpress.passes  # noqa: F401
    from fxpress.recipe import load_recipe, passes_from_recipe

    if args.recipe and args.passes:
        raise RecipeError("give either --recipe or --passes, not both")
    if args.recipe:
        entries = [p.to_dict() for p in load_recipe(args.recipe)]
    else:
        names = [n.strip() for n in (args.passes or "").split(",") if n.strip()]
        entries = [{"type": n, "fields": {}} for n in names]
    for item in args.set or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RecipeError(f"--set takes PASS.FIELD=VALUE (e.g. quantize.weights.bits=4), got '{item}'")
        key, value = item.split("=", 1)
        pass_name, field = key.split(".", 1)
        matches = [e for e in entries if e["type"] == pass_name]
        if not matches:
            raise RecipeError(f"--set {item}: pass '{pass_name}' is not in the pipeline ({', '.join(e['type'] for e in entries) or 'empty'})")
        *groups, leaf = field.split(".")
        for entry in matches:
            target = entry["fields"]
            for group in groups:  # PASS.GROUP.FIELD sets a field of a config group
                target = target.setdefault(group, {})
                if not isinstance(target, dict):
                    raise RecipeError(f"--set {item}: '{pass_name}.{group}' is not a group of fields")
            target[leaf] = _parse_value(value)
    return passes_from_recipe(entries)


def _results_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("what")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _dotted_fields(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A pass's default fields with config groups flattened to `group.field`, as `--set` names them."""
    out: list[tuple[str, Any]] = []
    for key, value in fields.items():
        if isinstance(value, dict):
            out += _dotted_fields(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def cmd_passes(args: argparse.Namespace) -> int:
    """List registered passes and their fields."""
    from rich.table import Table

    import fxpress.passes  # noqa: F401
    from fxpress.passes.base import PASS_REGISTRY

    table = Table(title="fxpress passes")
    for column in ("name", "class", "keeps function", "fields (default)"):
        table.add_column(column)
    for name, cls in sorted(PASS_REGISTRY.items()):
        fields = ", ".join(f"{key}={value!r}" for key, value in _dotted_fields(cls().to_dict()["fields"]))
        table.add_row(name, cls.__name__, "yes" if cls.preserves_function else "no", fields)
    _console().print(table)
    return 0


def _export_targets(text: str | None) -> list:
    """The --export list as export targets, every name checked before any work is done."""
    from fxpress.errors import ConfigError
    from fxpress.runtime.ops import EXPORT_TARGETS

    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    unknown = [n for n in names if n not in EXPORT_TARGETS]
    if unknown:
        raise ConfigError(f"--export: unknown target '{unknown[0]}': choose from {', '.join(EXPORT_TARGETS)}")
    return [EXPORT_TARGETS[n] for n in names]


def _check_out(out: Path, targets: list, overwrite: bool) -> None:
    """--out and every artifact under it, checked before the model is even loaded."""
    from fxpress.atomic import check_target
    from fxpress.compiled import FILE_TARGETS
    from fxpress.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file: give a directory (it will hold program/ and the exports)")
    check_target(out / "program", directory=True, overwrite=overwrite)
    for target in targets:
        check_target(out / target.artifact, directory=target.name not in FILE_TARGETS, overwrite=overwrite)


def cmd_compile(args: argparse.Namespace) -> int:
    """Load a model, run the passes, save the program, export the artifacts, optionally evaluate."""
    import fxpress
    from fxpress.data import token_windows
    from fxpress.models import load_causal_lm
    from fxpress.passes.manager import validate_pipeline

    targets = _export_targets(args.export)
    passes = _build_passes(args)
    needs_calibration = any(p.needs_calibration for p in passes)
    validate_pipeline(passes, (), True)
    out = Path(args.out)
    _check_out(out, targets, args.overwrite)
    console = _console()
    with console.status(f"loading {args.model}"):
        model, tokenizer = load_causal_lm(args.model)
    calibration = token_windows(tokenizer, "calib", args.seq_len, args.calib_samples) if needs_calibration else None
    start = time.perf_counter()
    cm = fxpress.compile(model, passes=passes, calibration=calibration)
    rows = [("compile seconds", f"{time.perf_counter() - start:.1f}")]
    console.print(cm.report.table())
    saved = cm.save(out / "program", overwrite=args.overwrite)
    rows.append(("program", str(saved)))
    for target in targets:
        with console.status(f"exporting {target.name}"):
            path = cm.export(target.name, out / target.artifact, overwrite=args.overwrite)
        rows.append((f"{target.name} artifact", str(path)))
    rows.append(("weight bytes", f"{cm.program.weight_bytes():,}"))
    if args.eval_windows:
        rows += _eval_rows(model, cm, tokenizer, args)
    console.print(_results_table(f"fxpress compile {args.model}", rows))
    return 0


def _eval_rows(
    model: torch.nn.Module, cm: CompiledModel, tokenizer: Any, args: argparse.Namespace
) -> list[tuple[str, str]]:
    import torch

    from fxpress.data import token_windows
    from fxpress.evaluate import evaluate

    windows = token_windows(tokenizer, "eval", args.seq_len, args.eval_windows)

    def reference(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    base = evaluate(reference, windows, progress=True)
    result = evaluate(cm, windows, ref_fn=reference, progress=True)
    return [
        ("perplexity (original)", f"{base['perplexity']:.3f}"),
        ("perplexity (compiled)", f"{result['perplexity']:.3f}"),
        ("KL vs original", f"{result['kl']:.4f}"),
        ("top-1 agreement", f"{result['top1']:.2%}"),
        ("eval text", f"{windows.shape[0]} windows x {windows.shape[1]} tokens (Python tutorial, python3-doc)"),
    ]


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a model, or of a saved compiled program against its original model."""
    import fxpress
    from fxpress.models import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    cm = fxpress.load(args.program) if args.program else fxpress.compile(model, passes=[], progress=False)
    args.eval_windows = args.windows
    _console().print(_results_table(f"fxpress eval {args.program or args.model}", _eval_rows(model, cm, tokenizer, args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpress", description="Compile, evaluate and export compressed models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passes", help="list the registered passes and their fields")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("compile", help="run passes on a model and export artifacts")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded default), a local path, or a cached HF id")
    p.add_argument("--recipe", help="a recipe file (.json/.yaml)")
    p.add_argument("--passes", help="comma-separated pass names, e.g. rotate,fold_hadamard,quantize")
    p.add_argument("--set", action="append", metavar="PASS.FIELD=VALUE", help="override a pass field")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files under --out that fxpress did not write (they are refused otherwise)")
    p.add_argument("--export", help="comma-separated export targets, e.g. onnx,tvm")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=0, help="evaluate on this many windows of real text")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("eval", help="perplexity, KL and top-1 agreement on real text")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--program", help="a directory written by `fxpress compile` (its program/ folder)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FxpressError as err:
        print(f"fxpress: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
