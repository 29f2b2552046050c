"""The `fxpress` command: compile, eval, passes. Same pass names and fields as recipes."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxpress.errors import ArtifactError, ConfigError, FxpressError, ModelNotFoundError, RecipeError

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
    from fxpress.runtime.ops import EXPORT_TARGETS

    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    unknown = [n for n in names if n not in EXPORT_TARGETS]
    if unknown:
        raise ConfigError(f"--export: unknown target '{unknown[0]}': choose from {', '.join(EXPORT_TARGETS)}")
    return [EXPORT_TARGETS[n] for n in names]


def _check_out(out: Path, targets: list, overwrite: bool) -> None:
    """--out and every artifact under it, checked before the model is even loaded."""
    from fxpress.atomic import check_target
    from fxpress.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file: give a directory (it is created if missing), or move the file away")
    check_target(out / "program", directory=True, overwrite=overwrite)
    for target in targets:
        check_target(out / target.artifact, directory=not target.writes_file, overwrite=overwrite)


def _check_model(args: argparse.Namespace, needs_tokenizer: bool) -> None:
    """--model resolves to a checkpoint (no network unless --allow-download) with a tokenizer when text is needed."""
    from fxpress.models import check_model_name, check_tokenizer

    try:
        check_model_name(args.model, args.allow_download)
        if needs_tokenizer:
            check_tokenizer(args.model)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"--model: {err}") from err


def _check_dtype(args: argparse.Namespace, targets: list, passes: list[Pass]) -> None:
    """bfloat16 programs export only through the precision pass (ONNX Runtime and TVM have no bf16)."""
    bf16_targets = [t.name for t in targets if t.name in ("onnx", "tvm")]
    if args.dtype == "bfloat16" and bf16_targets and not any(p.name == "precision" for p in passes):
        raise ConfigError(
            f"--dtype bfloat16 with --export {bf16_targets[0]}: ONNX Runtime and TVM do not run bfloat16: use "
            "--dtype float16, or add the precision pass last (--passes ...,precision --set precision.dtype=float32)"
        )


def _check_budget(args: argparse.Namespace) -> None:
    """--max-memory is a size and --device one PyTorch has, checked before anything is loaded."""
    from fxpress.budget import requested_budget
    from fxpress.compiled import check_device

    args.max_memory = requested_budget(args.max_memory, "--max-memory")
    check_device(args.device)


def _check_compile_args(args: argparse.Namespace) -> tuple[list, list[Pass], bool]:
    """Every argument of `fxpress compile` checked before anything is loaded: (targets, passes, needs text)."""
    from fxpress.passes.manager import validate_pipeline

    targets = _export_targets(args.export)
    passes = _build_passes(args)
    validate_pipeline(passes, (), True)
    _check_dtype(args, targets, passes)
    _check_budget(args)
    _check_out(Path(args.out), targets, args.overwrite)
    needs_text = any(p.needs_calibration for p in passes) or args.eval_windows > 0
    _check_model(args, needs_text)
    return targets, passes, needs_text


def _load(args: argparse.Namespace, needs_text: bool) -> tuple[Any, Any, Callable[[Any], Any] | None]:
    """(what to compile, tokenizer, the reference for evaluation). Under --max-memory a checkpoint directory is
    compiled as it is (its weights read on demand) and the reference is its uncompressed store-backed program."""
    import torch

    import fxpress
    from fxpress.checkpoint import is_checkpoint_dir
    from fxpress.models import load_causal_lm, resolve_model_path

    dtype = getattr(torch, args.dtype)
    path = resolve_model_path(args.model, args.allow_download)
    if args.max_memory is None or not is_checkpoint_dir(path):
        model, tokenizer = load_causal_lm(args.model, dtype, args.allow_download, needs_text)
        return model, tokenizer, _logits_of(model)
    tokenizer = _tokenizer(path) if needs_text else None
    original = None

    def stored_reference(ids: torch.Tensor) -> torch.Tensor:
        nonlocal original
        original = original or fxpress.compile(path, dtype=dtype, max_memory=args.max_memory, progress=False)
        return original(ids)

    return path, tokenizer, stored_reference


def _logits_of(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The evaluation reference of an in-memory Hugging Face model: its logits."""
    import torch

    def reference(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    return reference


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def cmd_compile(args: argparse.Namespace) -> int:
    """Load a model, run the passes, save the program, export the artifacts, optionally evaluate.

    Under torchrun every rank compiles (calibration split across them); rank 0 alone writes and prints.
    """
    import fxpress
    from fxpress.compiled import is_main_rank, leave_process_group
    from fxpress.data import token_windows

    targets, passes, needs_text = _check_compile_args(args)
    out = Path(args.out)
    console = _console()
    with console.status(f"loading {args.model}"):
        model, tokenizer, reference = _load(args, needs_text)
    needs_calibration = any(p.needs_calibration for p in passes)
    calibration = token_windows(tokenizer, "calib", args.seq_len, args.calib_samples) if needs_calibration else None
    start = time.perf_counter()
    cm = fxpress.compile(model, passes=passes, calibration=calibration, dtype=args.dtype,
                         max_memory=args.max_memory, device=args.device, progress=is_main_rank())
    cm.program.info.source = args.model  # `fxpress eval --program` names it when given another model
    rows = [("compile seconds", f"{time.perf_counter() - start:.1f}")]
    main = is_main_rank()
    if main:
        console.print(cm.report.table())
    rows.append(("program", str(cm.save(out / "program", overwrite=args.overwrite))))
    for target in targets:
        path = cm.export(target.name, out / target.artifact, overwrite=args.overwrite)
        rows.append((f"{target.name} artifact", str(path)))
    rows += _memory_rows(cm)
    if args.eval_windows:
        rows += _eval_rows(reference, cm, tokenizer, args)
    if main:
        console.print(_results_table(f"fxpress compile {args.model}", rows))
    leave_process_group()
    return 0


def _memory_rows(cm: CompiledModel) -> list[tuple[str, str]]:
    """Weight bytes, the memory plan under --max-memory, and this process's peak resident memory so far."""
    from fxpress.budget import peak_resident_bytes, plan_rows
    from fxpress.weights import format_bytes

    peak = peak_resident_bytes()
    return [("weight bytes", f"{cm.program.weight_bytes():,}"), *plan_rows(cm.program.metadata.get("memory_plan", {})),
            ("peak resident memory", format_bytes(peak))]


def _eval_rows(
    reference: Callable[[torch.Tensor], torch.Tensor], cm: CompiledModel, tokenizer: Any, args: argparse.Namespace
) -> list[tuple[str, str]]:
    from fxpress.data import token_windows
    from fxpress.evaluate import evaluate

    windows = token_windows(tokenizer, "eval", args.seq_len, args.eval_windows)
    base = evaluate(reference, windows, progress=True)
    result = evaluate(cm, windows, ref_fn=reference, progress=True)
    return [
        ("perplexity (original)", f"{base['perplexity']:.3f}"),
        ("perplexity (compiled)", f"{result['perplexity']:.3f}"),
        ("KL vs original", f"{result['kl']:.4f}"),
        ("top-1 agreement", f"{result['top1']:.2%}"),
        ("eval text", f"{windows.shape[0]} windows x {windows.shape[1]} tokens (Python tutorial, python3-doc)"),
    ]


MATCHED_FIELDS = (("model_type", "model_type"), ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                  ("num_layers", "num_hidden_layers"))


def _check_program_matches(args: argparse.Namespace) -> None:
    """--program must have been compiled from --model: compare the recorded sizes with the model's config."""
    from transformers import AutoConfig

    from fxpress.models import resolve_model_path
    from fxpress.serialize import read_manifest

    try:
        info = read_manifest(args.program).get("info", {})
    except ArtifactError as err:
        raise ArtifactError(f"--program: {err} (give the program/ folder that `fxpress compile --out DIR` wrote)") from err
    config = AutoConfig.from_pretrained(resolve_model_path(args.model, args.allow_download),
                                        local_files_only=not args.allow_download)
    for recorded, attribute in MATCHED_FIELDS:
        ours, theirs = info.get(recorded), getattr(config, attribute, None)
        if ours is not None and theirs is not None and ours != theirs:
            source = f" ('{info['source']}')" if info.get("source") else ""
            raise ConfigError(
                f"--program '{args.program}' was compiled from another model than --model '{args.model}' "
                f"({recorded}: {ours} in the program, {theirs} in the model): pass the --model it was compiled from{source}"
            )


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a model, or of a saved compiled program against its original model."""
    import fxpress
    from fxpress.models import load_causal_lm

    _check_model(args, needs_tokenizer=True)
    if args.program:
        _check_program_matches(args)
    model, tokenizer = load_causal_lm(args.model, allow_download=args.allow_download)
    cm = fxpress.load(args.program) if args.program else fxpress.compile(model, passes=[], progress=False)
    args.eval_windows = args.windows
    _console().print(_results_table(f"fxpress eval {args.program or args.model}", _eval_rows(_logits_of(model), cm, tokenizer, args)))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but misuse raises a ConfigError: main prints it as one line (no usage block) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}: see `{self.prog} --help`")


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum, named in the error when it is not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: give an integer >= {minimum}")
        return value

    return parse


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    if model:
        p.add_argument("--model", default="smollm2", help="'smollm2' (embedded default), a local checkpoint "
                       "directory, or a Hugging Face id already in the local cache")
        p.add_argument("--allow-download", action="store_true",
                       help="fetch a --model that is not local from the Hugging Face Hub (off: no network)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxpress", description="Compile, evaluate and export compressed models.")
    _common(parser, model=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passes", help="list the registered passes and their fields")
    _common(p, model=False)
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("compile", help="run passes on a model and export artifacts")
    _common(p)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="load the model in this float type and compute in it (weights stay in it)")
    p.add_argument("--recipe", help="a recipe file (.json/.yaml)")
    p.add_argument("--passes", help="comma-separated pass names, e.g. rotate,fold_hadamard,quantize")
    p.add_argument("--set", action="append", metavar="PASS.FIELD=VALUE", help="override a pass field")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files under --out that fxpress did not write (they are refused otherwise)")
    p.add_argument("--export", help="comma-separated export targets, e.g. onnx,tvm")
    p.add_argument("--max-memory", help="bound the peak resident memory of the process, e.g. 4GiB: the checkpoint's "
                   "weights are read on demand, rewritten ones spilled to disk beyond it (default: no bound)")
    p.add_argument("--device", default="cpu", help="where calibration runs: cpu or cuda (cuda:N)")
    p.add_argument("--seq-len", type=_at_least(1), default=256)
    p.add_argument("--calib-samples", type=_at_least(1), default=32)
    p.add_argument("--eval-windows", type=_at_least(0), default=0, help="evaluate on this many windows of real text")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("eval", help="perplexity, KL and top-1 agreement on real text")
    _common(p)
    p.add_argument("--program", help="a directory written by `fxpress compile` (its program/ folder)")
    p.add_argument("--windows", type=_at_least(1), default=16)
    p.add_argument("--seq-len", type=_at_least(1), default=256)
    p.set_defaults(func=cmd_eval)
    return parser


def _one_line(err: Exception) -> str:
    """The error as one line: fxpress's own messages name the problem and the fix; anything else is a bug."""
    text = " ".join(str(err).split())
    if isinstance(err, FxpressError):
        return text
    return f"unexpected {type(err).__name__}: {text[:300]}: rerun with --debug for the traceback, and report it"


def main(argv: list[str] | None = None) -> int:
    """Run the command; every failure is exit code 2 and one line on stderr (--debug: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Exception as err:
        if "--debug" in argv:
            raise
        print(f"fxpress: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
