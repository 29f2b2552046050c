"""Check a saved `program.json` against what fxpress writes, before torch.export's deserializer reads it.

torch's deserializer hands every symbolic `expr_str` to `sympy.sympify` (which evaluates Python), compiles
`guards_code` strings into the loaded module, and resolves op `target` strings by attribute lookup on
`torch`/`operator`. A crafted file could therefore run code during `fxpress.load` or on the first call.
Here every such string is parsed by a strict grammar of our own and printed back from the parse tree, so
the deserializer only ever sees text this module wrote; op targets must be on an allow-list. Anything else
is an `ArtifactError` naming the string and the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxpress.errors import ArtifactError

# sympy/torch functions in the `expr_str`s torch writes (srepr form) for the programs fxpress saves
SYMPY_FUNCTIONS = frozenset({
    "Add", "Mul", "Integer", "Symbol", "FloorDiv", "Mod", "PythonMod", "Min", "Max", "CeilToInt", "FloorToInt",
    "CleanDiv", "CeilDiv", "ModularIndexing", "PowByNatural", "GreaterThan", "LessThan", "StrictGreaterThan",
    "StrictLessThan", "Eq", "Ne", "Not", "And", "Or",
})
GUARD_FUNCTIONS = frozenset({"min", "max"})  # the Python builtins torch's guard printer emits
SYMBOL_KWARGS = frozenset({"integer", "positive", "nonnegative", "real"})
SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]+", re.ASCII)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_TOKEN = re.compile(r"\s*(?:(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|'(?P<str>[A-Za-z_][A-Za-z0-9_]*)'"
                    r"|(?P<op>//|==|!=|<=|>=|[-+*%(),\[\]=<>.]))", re.ASCII)
COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")

# op targets: fxpress's own ops, ATen, transformers' MoE fallback op, and the symbolic-shape helpers torch writes
OP_TARGET = re.compile(r"torch\.ops\.(aten|fxpress|transformers)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)",
                       re.ASCII)
ATEN_DUNDERS = frozenset({"__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "__iand__", "__ior__",
                          "__ixor__", "__ilshift__", "__irshift__"})
SYM_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "eq", "ne",
                                "le", "ge", "lt", "gt", "and_", "or_")]
    + [f"torch.sym_{n}" for n in ("not", "int", "float", "ite", "max", "min", "sqrt")] + ["math.trunc"]
)
VERIFIERS = frozenset({"", "ATEN", "TRAINING"})


class _Reject(Exception):
    """Raised inside the parser; turned into an ArtifactError that names the string and the file."""


def _tokens(text: str) -> list[str]:
    """Split `text` into tokens; any character outside the grammar (unicode lookalikes, quotes, ...) is refused."""
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Reject(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        out.append(m.group(0).strip() if m.group("str") is None else f"'{m.group('str')}'")
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over symbols, integers, + - * // %, calls to allow-listed functions and, for guards,
    comparisons and `L['input'].size()[i]`; `parse` returns the canonical text printed from the parse tree."""

    def __init__(self, text: str, guard: bool) -> None:
        self.toks, self.i, self.guard = _tokens(text), 0, guard

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Reject(f"expected {expected or 'more'!r}, found {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> str:
        out = self.disjunction() if self.guard else self.expr()
        if self.peek() is not None:
            raise _Reject(f"unexpected {self.peek()!r}")
        return out

    def binary(self, ops: tuple[str, ...], operand: Callable[[], str]) -> str:
        """Left-associative `operand (op operand)*`, each step printed in parentheses."""
        out = operand()
        while self.peek() in ops:
            op = self.take()
            out = f"({out} {op} {operand()})"
        return out

    def disjunction(self) -> str:
        """Guards join comparisons with `or` / `and` / `not` (torch prints e.g. `a == 1 or b == c` for a dim
        that may broadcast)."""
        return self.binary(("or",), self.conjunction)

    def conjunction(self) -> str:
        return self.binary(("and",), self.negation)

    def negation(self) -> str:
        if self.peek() == "not":
            self.take()
            return f"(not {self.negation()})"
        return self.comparison()

    def comparison(self) -> str:
        left = self.expr()
        if self.peek() in COMPARISONS:
            op = self.take()
            return f"{left} {op} {self.expr()}"
        return left

    def expr(self) -> str:
        return self.binary(("+", "-"), self.term)

    def term(self) -> str:
        return self.binary(("*", "//", "%"), self.unary)

    def unary(self) -> str:
        if self.peek() == "-":
            self.take()
            return f"(-{self.unary()})"
        return self.atom()

    def atom(self) -> str:
        tok = self.take()
        if tok.isdigit():
            return str(int(tok))
        if tok == "(":
            out = f"({self.disjunction()})" if self.guard else self.expr()  # kept: `(a == b) == c` is no chain
            self.take(")")
            return out
        if self.guard and tok == "L":
            return self.input_size()
        if self.peek() == "(":
            return self.call(tok)
        if not self.guard and SYMBOL_NAME.fullmatch(tok):
            return tok
        raise _Reject(f"{tok!r} is not a symbol, integer or allowed function")

    def input_size(self) -> str:
        """`L['name'].size()[i]`: a dimension of a named input, the only thing a guard may read."""
        self.take("[")
        name = self.take()
        if not name.startswith("'"):
            raise _Reject(f"expected an input name after L[, found {name!r}")
        for tok in ("]", ".", "size", "(", ")", "["):
            self.take(tok)
        dim = self.take()
        if not dim.isdigit():
            raise _Reject(f"expected a dimension index, found {dim!r}")
        self.take("]")
        return f"L[{name}].size()[{int(dim)}]"

    def call(self, name: str) -> str:
        allowed = GUARD_FUNCTIONS if self.guard else SYMPY_FUNCTIONS
        if name not in allowed:
            raise _Reject(f"function {name!r} is not allowed")
        self.take("(")
        if name == "Symbol":
            return self.symbol()
        args = [self.expr()]
        while self.peek() == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        return f"{name}({', '.join(args)})"

    def symbol(self) -> str:
        """`Symbol('s10', positive=True, integer=True)`: a shape symbol name and its assumptions, nothing else."""
        name = self.take()
        if not (name.startswith("'") and SYMBOL_NAME.fullmatch(name[1:-1])):
            raise _Reject(f"{name} is not a shape symbol name")
        kwargs = []
        while self.peek() == ",":
            self.take()
            key = self.take()
            self.take("=")
            value = self.take()
            if key not in SYMBOL_KWARGS or value not in ("True", "False"):
                raise _Reject(f"symbol assumption {key}={value} is not allowed")
            kwargs.append(f"{key}={value}")
        self.take(")")
        return f"Symbol({', '.join([name, *kwargs])})"


def canonical(text: Any, guard: bool = False) -> str:
    """`text` printed back from our parse tree; raises _Reject when it is not in the grammar."""
    if not isinstance(text, str) or len(text) > 100_000:
        raise _Reject("not a string of reasonable length")
    try:
        return _Parser(text, guard).parse()
    except RecursionError:
        raise _Reject("nested too deeply") from None


def check_target(target: Any) -> None:
    """Allow only fxpress's, ATen's and transformers' registered ops and torch's symbolic-shape helpers."""
    if isinstance(target, str) and target in SYM_TARGETS:
        return
    m = OP_TARGET.fullmatch(target) if isinstance(target, str) else None
    if m is None or (m.group(2).startswith("__") and m.group(2) not in ATEN_DUNDERS) or m.group(3).startswith("__"):
        raise _Reject("op target is not on the allow-list (torch.ops.aten/fxpress/transformers ops, _operator "
                      "arithmetic, torch.sym_*)")


def _refuse(where: str, what: str, value: Any, err: _Reject) -> ArtifactError:
    return ArtifactError(f"{where}: refusing {what} {str(value)[:200]!r}: {err}; this file was not written by fxpress "
                         "(or was edited): load only artifacts you saved, or save it again")


def _check_entry(key: str, value: Any, where: str) -> Any:
    """The entry's value to keep (canonicalized for expressions); ArtifactError when it is refused."""
    try:
        if key == "expr_str":
            return canonical(value)
        if key == "as_operator":
            check_target(value)
        elif key == "source_fn_stack" and isinstance(value, str):
            for item in value.split(";"):
                check_target(item.rpartition(",")[2])
        elif key == "custom_obj_values" and value:
            raise _Reject("fxpress programs hold no custom (script) objects")
    except _Reject as err:
        raise _refuse(where, key, value, err) from None
    if key == "nodes" and isinstance(value, list):
        for node in value:
            target = node.get("target") if isinstance(node, dict) else node
            try:
                check_target(target)
            except _Reject as err:
                raise _refuse(where, "target", target, err) from None
    return value


def _walk(obj: Any, where: str) -> None:
    """Canonicalize every `expr_str` and check every op target in the (nested) graph, in place."""
    if isinstance(obj, list):
        for item in obj:
            _walk(item, where)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _check_entry(key, value, where)
            _walk(obj[key], where)


def _range_constraints(ranges: Any, where: str) -> None:
    """Range constraints are symbol names with integer (or open) bounds: no expression text at all."""
    if not isinstance(ranges, dict):
        raise ArtifactError(f"{where}: range_constraints is not a mapping; save the program again")
    for name, bounds in ranges.items():
        ok = SYMBOL_NAME.fullmatch(str(name)) and isinstance(bounds, dict) and set(bounds) <= {"min_val", "max_val"}
        ok = ok and all(v is None or (type(v) is int) for v in bounds.values())
        if not ok:
            raise ArtifactError(f"{where}: refusing range constraint {name!r}: {str(bounds)[:200]!r} (a symbol name "
                                "with integer bounds is expected); save the program again")


def _guards(guards: Any, where: str) -> list[str]:
    """Guard code is compiled by torch into the loaded module: keep only guards in our grammar, reprinted."""
    if not isinstance(guards, list):
        raise ArtifactError(f"{where}: guards_code is not a list; save the program again")
    out = []
    for guard in guards:
        try:
            out.append(canonical(guard, guard=True))
        except _Reject as err:
            raise ArtifactError(f"{where}: refusing guards_code entry {str(guard)[:200]!r}: {err}; only shape "
                                "relations between inputs are allowed; save the program again") from None
    return out


def safe_program_json(raw: bytes, path: str | Path) -> bytes:
    """The validated, canonicalized `program.json` for torch's deserializer; ArtifactError for anything else."""
    import json

    where = str(path)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{where} is not valid JSON ({err}): the file is corrupt; save the program again") from err
    if not isinstance(data, dict) or not isinstance(data.get("graph_module"), dict):
        raise ArtifactError(f"{where} is not a torch.export program (no graph_module); save the program again")
    verifiers = data.get("verifiers", [])
    if not isinstance(verifiers, list) or not set(map(str, verifiers)) <= VERIFIERS:
        raise ArtifactError(f"{where}: refusing verifiers {str(verifiers)[:200]!r}; save the program again")
    _range_constraints(data.get("range_constraints", {}), where)
    data["guards_code"] = _guards(data.get("guards_code", []), where)
    _walk(data["graph_module"], where)
    return json.dumps(data).encode()
