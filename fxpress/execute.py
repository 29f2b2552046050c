"""The execution engine: an FX graph run node by node over chunks of inputs, weights fetched as nodes need them.

Every calibration job (activation recording, GPTQ, the activation clip search) and the reference run of
store-backed programs (`run_graph`) go through `Executor`, so models larger than memory run block by block:

- **node-major over chunks**: each node runs for every chunk before the next node starts (llm-compressor's
  sequential pipeline, done on the graph). A weight (`get_attr`, served by `G.get_param`, so by the weight
  store) is fetched once per run, just before its first use, and dropped after its last use; the chunks'
  activations advance through the graph together and are freed after their last use too.
- **hooks**: a subclass takes over the nodes in `hooked`: `prepare(node, inputs)` first sees every chunk's
  inputs (GPTQ builds a Hessian and quantizes), then `call(node, index, args, kwargs)` computes each chunk's
  output (with the quantized weight: later blocks see earlier blocks' quantized outputs). `observe(node,
  index, value)` sees the values of the nodes in `observed`; `finish(node)` follows a hooked node's last chunk.
- **stop early**: `run(chunks, until=nodes)` runs only what those nodes need and stops after the last one
  (the full-vocabulary logits of a calibration set are never computed unless asked for).
- **an activation budget** (bytes): beyond it, chunk values that the running node does not read are spilled
  to safetensors files in a temporary folder (the one needed furthest in the future first) and read back
  when needed; results are bit-identical with and without spilling.
- **a device**: chunk inputs and fetched weights are moved to it (device arguments in the graph, such as
  `arange(..., device=cpu)`, are redirected to it); outputs come back to the CPU.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate, map_arg
from torch.utils._pytree import tree_map_only

from fxpress import graph as G
from fxpress.errors import ConfigError
from fxpress.heap import trim_heap
from fxpress.spill import Spilled, SpillFolder, spillable

Device = str | torch.device | None


@dataclass
class RunStats:
    """What one `Executor.run` did: weights fetched, nodes run, bytes spilled, the peak of live chunk values."""

    fetches: int = 0
    nodes: int = 0
    spilled_files: int = 0
    spilled_bytes: int = 0
    peak_bytes: int = 0


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class _Plan:
    """The nodes one run executes (get_attr excluded: fetched on demand) and what each needs and frees."""

    nodes: list[Node]
    chunked: set[Node]  # nodes whose value differs per chunk; the others run once, shared by all chunks
    written: set[Node]  # values that may be written in place (see `_written`)
    calls: dict[Node, tuple[Any, Any]]  # (args, kwargs), device arguments redirected
    attrs: dict[Node, list[Node]]  # the get_attr inputs of each node
    frees: dict[Node, list[Node]]  # values dropped after each node ran
    uses: dict[Node, list[int]]  # positions (in `nodes`) of each value's users, for choosing what to spill
    placeholders: dict[Node, int]


def _needed(nodes: list[Node], until: Collection[Node]) -> list[Node]:
    """The nodes up to the last of `until` that it (transitively) reads, in graph order."""
    wanted = set(until)
    last = max((i for i, n in enumerate(nodes) if n in wanted), default=-1)
    needed: set[Node] = set()
    for node in reversed(nodes[: last + 1]):
        if node in wanted or any(u in needed for u in node.users):
            needed.add(node)
    return [n for n in nodes[: last + 1] if n in needed]


@functools.cache
def _alias_table(op: torch._ops.OpOverload) -> tuple[tuple[str, ...], dict[str, tuple[bool, bool]]]:
    """An op's positional argument names and, per argument it may alias: (the result aliases it, written in place)."""
    schema = op._schema
    returns_alias = any(r.alias_info is not None for r in schema.returns)
    table = {a.name: (returns_alias, a.alias_info.is_write) for a in schema.arguments if a.alias_info is not None}
    return tuple(a.name for a in schema.arguments if not a.kwarg_only), table


def _aliasing(node: Node) -> tuple[list[Node], list[Node]]:
    """(inputs the node's value may share memory with, inputs it writes in place), from the op's schema;
    a call without one (operator.getitem, a submodule) may alias every input and writes none."""
    if not (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)):
        return node.all_input_nodes, []
    positional, table = _alias_table(node.target)
    if not table:
        return [], []
    bound = dict(zip(positional, node.args)) | dict(node.kwargs)
    aliases: list[Node] = []
    writes: list[Node] = []
    for name, (returned, written) in table.items():
        found = G.flat_nodes(bound.get(name))
        aliases += found if returned else []
        writes += found if written else []
    return aliases, writes


def _written(nodes: list[Node]) -> set[Node]:
    """Nodes whose value may share memory with a tensor some op writes in place: these run per chunk (never
    shared by the chunks) and are never spilled (a copy on disk would miss the write)."""
    parent: dict[Node, Node] = {}

    def root(n: Node) -> Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    written: list[Node] = []
    for node in nodes:
        aliases, writes = _aliasing(node)
        for a in aliases:
            parent[root(a)] = root(node)
        written += writes
    roots = {root(w) for w in written}
    return {n for n in {*parent, *written} if root(n) in roots}


def _redirect(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    return map_aggregate(value, lambda a: device if isinstance(a, torch.device) else a)


def _plan(gm: GraphModule, until: Collection[Node] | None, device: torch.device | None, forced: set[Node]) -> _Plan:
    nodes = list(gm.graph.nodes)
    placeholders = {n: i for i, n in enumerate(n for n in nodes if n.op == "placeholder")}
    run = nodes if until is None else _needed(nodes, until)
    steps = [n for n in run if n.op != "get_attr"]
    plan = _Plan(steps, set(), _written(steps), {}, {}, {}, {}, placeholders)
    last_user: dict[Node, Node] = {}
    per_chunk = forced | plan.written
    for pos, node in enumerate(plan.nodes):
        inputs = node.all_input_nodes
        if node.op == "placeholder" or node in per_chunk or any(a in plan.chunked for a in inputs):
            plan.chunked.add(node)
        plan.calls[node] = (_redirect(node.args, device), _redirect(node.kwargs, device))
        plan.attrs[node] = [a for a in inputs if a.op == "get_attr"]
        for a in inputs:
            last_user[a] = node
            plan.uses.setdefault(a, []).append(pos)
    for value, node in last_user.items():
        plan.frees.setdefault(node, []).append(value)
    for node in plan.nodes:
        if node not in last_user and node.op != "output":
            plan.frees.setdefault(node, []).append(node)
    return plan


class ChunkInputs(Sequence):
    """Every chunk's (args, kwargs) for one node, built one chunk at a time (spilled values are read back)."""

    def __init__(self, executor: Executor, node: Node):
        self.executor, self.node = executor, node

    def __len__(self) -> int:
        return self.executor.chunk_count

    def __getitem__(self, index: int) -> tuple[tuple, dict]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.executor.args_of(self.node, index)

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        return (self[i] for i in range(len(self)))


class Executor:
    """Runs `gm` node-major over chunks of inputs; subclass it to take over nodes or watch values.

    `device`: where chunk inputs and weights go (None: leave them where they are). `activation_budget`:
    bytes of chunk values kept in memory before spilling to safetensors files under `spill_dir` (None:
    no limit). After `run`, `stats` says what it did.
    """

    hooked: Collection[Node] = ()  # nodes whose chunks go through prepare() and call()
    observed: Collection[Node] = ()  # nodes whose chunk values go to observe()

    def __init__(self, gm: GraphModule, device: Device = None, activation_budget: int | None = None,
                 spill_dir: str | os.PathLike | None = None):
        if activation_budget is not None and (isinstance(activation_budget, bool) or not isinstance(activation_budget, int)
                                              or activation_budget < 0):
            raise ConfigError(f"activation_budget is {activation_budget!r}: give bytes >= 0 (0 keeps nothing that can "
                              "go to disk in memory), or None for no limit")
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"device {device!r} is not a torch device: give 'cpu', 'cuda' or 'cuda:N'") from err
        self.gm = gm
        self.activation_budget = activation_budget
        self.spill_dir = spill_dir
        self.stats = RunStats()
        self.chunk_count = 0

    # -- hooks for subclasses --------------------------------------------------------------------------
    def prepare(self, node: Node, inputs: ChunkInputs) -> None:
        """Called once for each node in `hooked` before it runs, with every chunk's inputs."""

    def call(self, node: Node, index: int, args: tuple, kwargs: dict) -> Any:
        """One chunk's output of a node in `hooked` (default: the node's own operation)."""
        return self._execute(node, args, kwargs)

    def finish(self, node: Node) -> None:
        """Called after a node in `hooked` ran on every chunk (to drop what `prepare` kept for it)."""

    def observe(self, node: Node, index: int, value: Any) -> None:
        """Called with each chunk's value of the nodes in `observed`, in chunk order."""

    # -- running -----------------------------------------------------------------------------------------
    def run(self, chunks: Sequence[Sequence[Any]], until: Collection[Node] | None = None) -> list[Any] | None:
        """Run every chunk (the graph's inputs, one tuple per chunk); return each chunk's output (on the CPU),
        or None when `until` is given: then only those nodes and what they read run, up to the last one."""
        hooked, observed = set(self.hooked), set(self.observed)
        self._plan = _plan(self.gm, until, self.device, hooked | observed)
        self._hooked, self._observed = hooked, observed
        self._chunks = [tuple(self.gm.graph._codegen.process_inputs(*c)) for c in chunks]
        self._check_arity()
        self.chunk_count = len(self._chunks)
        self.stats = RunStats()
        self._shared: dict[Node, Any] = {}
        self._values: dict[Node, list[Any]] = {}
        self._files: dict[Node, list[str]] = {}
        self._live, self._pos = 0, 0
        self._spill = SpillFolder(self.spill_dir)
        try:
            with torch.no_grad():
                return self._loop()
        finally:
            self.stats.spilled_files, self.stats.spilled_bytes = self._spill.files, self._spill.bytes
            self._spill.close()
            self._shared, self._values, self._files, self._chunks = {}, {}, {}, []
            trim_heap()

    def _loop(self) -> list[Any] | None:
        plan = self._plan
        for self._pos, node in enumerate(plan.nodes):
            if node.op == "output":
                return self._outputs(node)
            try:
                for attr in plan.attrs[node]:
                    if attr not in self._shared:
                        self.fetch(attr)
                if node in plan.chunked:
                    self._run_chunked(node)
                else:
                    self._shared[node] = self._execute(node, *map_arg(plan.calls[node], self._shared.__getitem__))
            except Exception as err:
                err.add_note(f"while fxpress.execute ran node {node.format_node()}")
                raise
            self.stats.nodes += 1
            self._free(plan.frees.get(node, ()))
        return None

    def _check_arity(self) -> None:
        wanted = len(self._plan.placeholders)
        for i, chunk in enumerate(self._chunks):
            if len(chunk) != wanted:
                raise ConfigError(f"chunk {i} has {len(chunk)} inputs but the graph takes {wanted} "
                                  f"({', '.join(n.name for n in self._plan.placeholders)}): give one value per input")

    def _run_chunked(self, node: Node) -> None:
        values: list[Any] = []
        self._values[node] = values
        if node.op == "placeholder":
            k = self._plan.placeholders[node]
            for i, chunk in enumerate(self._chunks):
                value = self._to_device(chunk[k])
                self._keep(node, values, value)
                if node in self._observed:  # a graph input can be wanted too (the first linear's input)
                    self.observe(node, i, value)
            return
        hooked = node in self._hooked
        if hooked:
            self.prepare(node, ChunkInputs(self, node))
        for i in range(self.chunk_count):
            args, kwargs = self.args_of(node, i)
            out = self.call(node, i, args, kwargs) if hooked else self._execute(node, args, kwargs)
            self._keep(node, values, out)
            if node in self._observed:
                self.observe(node, i, out)
        if hooked:
            self.finish(node)

    def _execute(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        raise ConfigError(f"node {node.name}: cannot execute op '{node.op}'")

    def _outputs(self, node: Node) -> list[Any]:
        codegen = self.gm.graph._codegen
        outs = []
        for i in range(self.chunk_count):
            out = map_arg(node.args[0], lambda n, i=i: self._value(n, i))
            outs.append(codegen.process_outputs(tree_map_only(torch.Tensor, lambda t: t.cpu(), out)))
        return outs

    # -- values --------------------------------------------------------------------------------------------
    def fetch(self, node: Node) -> Any:
        """The value of a get_attr node: fetched with `G.get_param` (the weight store) once, moved to the device,
        and kept until its last user in this run has run."""
        if node in self._shared:
            return self._shared[node]
        value = self._to_device(G.get_param(self.gm, node))
        self.stats.fetches += 1
        if node in self._plan.uses:
            self._shared[node] = value
        return value

    def args_of(self, node: Node, index: int) -> tuple[tuple, dict]:
        """(args, kwargs) of `node` for chunk `index`; spilled inputs are read back (not kept)."""
        return map_arg(self._plan.calls[node], lambda n: self._value(n, index))

    def _value(self, node: Node, index: int) -> Any:
        if node in self._shared:
            return self._shared[node]
        if node.op == "get_attr":
            return self.fetch(node)
        value = self._values[node][index]
        return SpillFolder.load(value) if type(value) is Spilled else value

    def _to_device(self, value: Any) -> Any:
        if self.device is None or not isinstance(value, torch.Tensor):
            return value
        return value.to(self.device)

    def _keep(self, node: Node, values: list[Any], value: Any) -> None:
        values.append(value)
        self._live += _nbytes(value)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self._live)
        if self.activation_budget is not None and self._live > self.activation_budget:
            self._spill_until_under(set(node.all_input_nodes))

    def _free(self, nodes: Collection[Node]) -> None:
        for node in nodes:
            self._shared.pop(node, None)
            values = self._values.pop(node, None)
            if values:
                self._live -= sum(_nbytes(v) for v in values if type(v) is not Spilled)
            for path in self._files.pop(node, ()):
                self._spill.remove(path)

    # -- spilling -----------------------------------------------------------------------------------------
    def _next_use(self, node: Node) -> int:
        uses = self._plan.uses.get(node, [])
        at = bisect.bisect_right(uses, self._pos)
        return uses[at] if at < len(uses) else len(self._plan.nodes)

    def _spill_until_under(self, protected: set[Node]) -> None:
        """Spill whole nodes' in-memory chunk values, the one used furthest ahead first, until under budget."""
        budget = self.activation_budget
        assert budget is not None
        candidates = [n for n, vals in self._values.items()
                      if n not in protected and n not in self._plan.written and any(spillable(v) for v in vals)]
        for node in sorted(candidates, key=self._next_use, reverse=True):
            if self._live <= budget:
                return
            values = self._values[node]
            path, refs = self._spill.write({i: v for i, v in enumerate(values) if spillable(v)})
            for i, ref in refs.items():
                self._live -= _nbytes(values[i])
                values[i] = ref
            self._files.setdefault(node, []).append(path)


def run_graph(gm: GraphModule, inputs: Sequence[Any], device: Device = None) -> Any:
    """One run of the whole graph on `inputs`, as `gm(*inputs)` returns it, each weight fetched (`G.get_param`)
    when its first user runs and dropped after its last: the reference path of store-backed programs."""
    outputs = Executor(gm, device=device).run([tuple(inputs)])
    assert outputs is not None
    return outputs[0]
