"""aten.cat / aten.stack in TVM as one copy kernel: each input written to its slice of the output, row by row.

Why: TVM legalizes a concatenation of N tensors as one loop over the output whose every element picks its
input through N nested if_then_else; stacking SmolLM2's 30 per-layer KV tensors then costs 30 compares per
element (1.5 ms a step at 48 positions). Loop by loop, the concatenation is a sequence of contiguous copies
(the dims after the axis innermost) that LLVM turns into memcpy.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fxpress.lowering.tvm.relax_helpers import dtype_of, shape_of


def concat_source(count: int, rank: int, axis: int, stack: bool, dtype: str, picks: tuple = ()) -> str:
    """TVMScript of `count` inputs of rank `rank` concatenated along `axis` (or stacked along a new one).

    Every dim is a shape variable (bound by the inputs); per input, the loops copy its slab into the output at
    the running offset along the axis, the dims after the axis innermost (contiguous, a memcpy for LLVM).
    `picks[i]`, when not None, says input i is a stacked tensor of one more (leading) dim read at that index in
    place: a layer's past keys straight from the stacked cache, not a copy of them first.
    """
    picks = tuple(picks) or (None,) * count
    outer = [f"o{a}" for a in range(axis)]
    inner = [f"t{a}" for a in range(rank - axis - (0 if stack else 1))]
    along = [f"a{i}" for i in range(count)]
    lines = [
        "@T.prim_func(private=True)",
        f"def concat({', '.join(f'var_in{i}: T.handle' for i in range(count))}, var_out: T.handle):",
        '    T.func_attr({"tir.noalias": True})',
    ]
    lines += [f"    {v} = T.int64()" for v in outer + inner + ([] if stack else along)]
    for i in range(count):
        dims = outer + inner if stack else [*outer, along[i], *inner]
        dims = dims if picks[i] is None else [f"layers{i}", *dims]
        lines += [] if picks[i] is None else [f"    layers{i} = T.int64()"]
        lines.append(f'    in{i} = T.match_buffer(var_in{i}, ({", ".join(dims)},), "{dtype}")')
    middle = str(count) if stack else " + ".join(along)
    lines.append(f'    out = T.match_buffer(var_out, ({", ".join([*outer, middle, *inner])},), "{dtype}")')
    body, depth = [], 1
    for a, v in enumerate(outer):
        body.append("    " * depth + f"for i{a} in range({v}):")
        depth += 1
    src = [f"i{a}" for a in range(axis)]
    offset = "0"
    for i in range(count):
        level = depth
        if not stack:
            body.append("    " * level + f"for c in range({along[i]}):")
            level += 1
        for a, v in enumerate(inner):
            body.append("    " * level + f"for j{a} in range({v}):")
            level += 1
        tail = [f"j{a}" for a in range(len(inner))]
        position = str(i) if stack else f"{offset} + c"
        read = ([] if picks[i] is None else [str(picks[i])]) + src + ([] if stack else ["c"]) + tail
        body.append("    " * level + f"out[{', '.join([*src, position, *tail])}] = in{i}[{', '.join(read)}]")
        offset = along[i] if offset == "0" else f"{offset} + {along[i]}"
    return "\n".join(lines + body)


@lru_cache(maxsize=256)
def concat_kernel(count: int, rank: int, axis: int, stack: bool, dtype: str, picks: tuple = ()) -> Any:
    import tvm
    from tvm.script import tirx as T

    return tvm.script.from_source(concat_source(count, rank, axis, stack, dtype, picks), extra_vars={"T": T})


def emit_concat(bb: Any, tensors: list[Any], axis: int, stack: bool = False, picks: tuple = ()) -> Any:
    """Relax: `tensors` (same dtype and rank) concatenated along `axis`, or stacked along a new `axis`; an input
    with `picks[i]` not None is a stacked tensor whose entry picks[i] is the one concatenated (read in place)."""
    from tvm import relax

    picks = tuple(picks) or (None,) * len(tensors)
    shape = logical_shape(tensors[0], picks[0])
    rank = len(shape)
    axis = axis % (rank + 1 if stack else rank)
    if stack:
        out_shape = [*shape[:axis], len(tensors), *shape[axis:]]
    else:
        along = shape[axis]
        for other, pick in zip(tensors[1:], picks[1:]):
            along = along + logical_shape(other, pick)[axis]
        out_shape = [*shape[:axis], along, *shape[axis + 1:]]
    dtype = dtype_of(tensors[0])
    kernel = concat_kernel(len(tensors), rank, axis, stack, dtype, picks if any(p is not None for p in picks) else ())
    gv = bb.add_func(kernel, f"concat{len(tensors)}")
    return bb.emit(relax.call_tir(gv, list(tensors), out_ty=relax.TensorType(out_shape, dtype)))


def logical_shape(tensor: Any, pick: int | None) -> list:
    """The shape of the tensor concatenated: without the stacked dim when an entry of it is picked."""
    return shape_of(tensor)[1:] if pick is not None else shape_of(tensor)


def concatenable(tensors: list[Any], picks: tuple = ()) -> bool:
    """Tensors the kernel takes: at least two, one dtype, one rank (other cases keep TVM's own converter)."""
    if len(tensors) < 2 or any(not hasattr(t, "ty") or getattr(t.ty, "shape", None) is None for t in tensors):
        return False
    picks = tuple(picks) or (None,) * len(tensors)
    ranks = {len(logical_shape(t, p)) for t, p in zip(tensors, picks)}
    return len({dtype_of(t) for t in tensors}) == 1 and len(ranks) == 1
