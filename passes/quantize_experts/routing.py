"""How calibration data meets each MoE layer: every expert's routed rows and routing weights, and (for causal
LMs) the sampled-Fisher gradients of each routed row, all read from one run over the graph."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fxpress.calibration import for_each_activation, program_inputs
from fxpress.errors import ConfigError
from fxpress.graph import ExpertLayer, get_param

if TYPE_CHECKING:
    from fxpress.program import Program


# --- recording routing data ------------------------------------------------------------------------
@dataclass
class LayerData:
    """What calibration recorded for one layer: inputs, router logits, each expert's rows and weights."""

    inputs: torch.Tensor  # [T, H]
    logits: torch.Tensor  # [T, E]
    chosen: torch.Tensor  # [T, E] bool: expert e among token t's top-k
    rows: list[torch.Tensor]  # per expert [n_e, H]
    row_weights: list[torch.Tensor]  # per expert [n_e]
    row_fisher: list[torch.Tensor] | None = None  # per expert [n_e, S, H]: d log p(y_s) / d expert output row
    positions: int = 0  # output positions the Fisher rows were measured on
    row_text_grad: list[torch.Tensor] | None = None  # per expert [n_e, H]: d log p(next text token) / d row


def _wanted(layer: ExpertLayer) -> dict[str, Any]:
    names = {"input": layer.input.name, "logits": layer.router.node.name}
    if layer.fused:
        names.update(rows=layer.up[0].input.name, offsets=layer.offsets.name, row_weights=layer.row_weights.name,
                     expert_ids=layer.expert_ids.name)
    else:
        names["weights"] = [ex.weight.name for ex in layer.experts]
    return names


class _GradRecorder(torch.fx.Interpreter):
    """Runs the graph with the wanted nodes' outputs as leaves that require grad, to read d loss / d node."""

    def __init__(self, module: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(module)
        self.wanted = wanted
        self.leaves: dict[str, torch.Tensor] = {}

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return get_param(self.module, str(target))  # a store-backed weight is read from its store

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if n.name in self.wanted and isinstance(result, torch.Tensor):
            result = result.detach().requires_grad_(True)
            self.leaves[n.name] = result
        return result


def _grad_nodes(layer: ExpertLayer) -> list[str]:
    return [layer.down.node.name] if layer.fused else [ex.down.node.name for ex in layer.experts]


def record_fisher(program: Program, layers: list[ExpertLayer], batches: list[torch.Tensor], samples: int = 8,
                  seed: int = 0, text_gradient: bool = False) -> dict[str, list[torch.Tensor]]:
    """Per expert output row, `samples` gradients g_s = d log p(y_s) / d row with y_s drawn from the model.

    E_s[g_s g_s^T] is the Fisher of the model's next-token distributions w.r.t. that row, so a change
    delta of the row costs KL = 1/2 E_s[(g_s . delta)^2] to second order: the downstream layers, the
    LM head and the routing weight (the row is scaled by it before it reaches the output) are all in g.
    Labels are sampled, not the text's next tokens: the KL, not the loss on one text, is measured.
    With `text_gradient`, one more slot holds d log p(next token of the text) / d row (first-order
    term of the calibration loss). Stored as [rows, (samples + text_gradient) * hidden] per batch.
    """
    wanted = sorted({name for layer in layers for name in _grad_nodes(layer)})
    store: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        recorder = _GradRecorder(program.module, set(wanted))
        with torch.enable_grad():
            out = recorder.run(*program_inputs(program, batch))
            logp = F.log_softmax((out[0] if isinstance(out, (tuple, list)) else out).float(), -1)
            flat = logp.reshape(-1, logp.shape[-1])
            labels = torch.multinomial(flat.detach().exp(), samples, replacement=True, generator=gen)  # [P, S]
            if text_gradient:
                nxt = torch.cat([batch[:, 1:], batch[:, :1]], 1).reshape(-1, 1)  # last position: masked below
                keep = torch.ones_like(batch, dtype=flat.dtype)
                keep[:, -1] = 0
                labels = torch.cat([labels, nxt], 1)
            leaves = [recorder.leaves[n] for n in wanted]
            per_sample = []
            slots = labels.shape[1]
            for s in range(slots):
                picked = flat.gather(1, labels[:, s : s + 1]).squeeze(1)
                if text_gradient and s == samples:
                    picked = picked * keep.reshape(-1)
                grads = torch.autograd.grad(picked.sum(), leaves, retain_graph=s + 1 < slots, allow_unused=True)
                per_sample.append([torch.zeros_like(leaf) if g is None else g.detach() for leaf, g in zip(leaves, grads)])
        for i, name in enumerate(wanted):
            g = torch.stack([ps[i].reshape(-1, ps[i].shape[-1]) for ps in per_sample], 1)  # [rows, S, H]
            store[name].append(g.reshape(g.shape[0], -1).float())
    return store


def record_routing(program: Program, layers: list[ExpertLayer], samples: torch.Tensor | None = None,
                   fisher: bool = False, fisher_samples: int = 8, text_gradient: bool = False,
                   on_layer: Callable[[int, LayerData], Any] | None = None) -> list[Any]:
    """Run the calibration data once and split each layer's routed rows by expert.

    With `fisher` (causal LMs), also record each routed row's sampled Fisher gradients (see `record_fisher`).
    Without it, `on_layer(i, data)` (when given) receives layer i's data as soon as the run has passed the
    layer, and its result takes the data's place: a node-major run (`fxpress.execute`) then holds one
    layer's raw activations at a time, not the model's.
    """
    wanted = [_wanted(layer) for layer in layers]
    batches = _batches(program, samples)
    if fisher and program.is_causal_lm:
        store = _gather(program, wanted, batches, None)
        grads = record_fisher(program, layers, batches, fisher_samples, text_gradient=text_gradient)
        data = [_layer_data(layer, w, store) for layer, w in zip(layers, wanted)]
        slots = fisher_samples + int(text_gradient)
        for layer, w, d in zip(layers, wanted, data):
            split = [f.reshape(f.shape[0], slots, f.shape[1] // slots) for f in _split_fisher(layer, w, store, grads)]
            d.row_fisher = [f[:, :fisher_samples] for f in split]
            d.row_text_grad = [f[:, fisher_samples] for f in split] if text_gradient else None
            d.positions = sum(int(b.numel()) for b in batches)
        return [d if on_layer is None else on_layer(i, d) for i, d in enumerate(data)]
    done: dict[int, Any] = {}

    def finish(i: int, store: dict[str, list[torch.Tensor]]) -> None:
        d = _layer_data(layers[i], wanted[i], store)
        with torch.no_grad():
            done[i] = d if on_layer is None else on_layer(i, d)

    _gather(program, wanted, batches, finish)
    return [done[i] for i in range(len(layers))]


def _batches(program: Program, samples: torch.Tensor | None) -> list[torch.Tensor]:
    if samples is not None:
        return list(samples.split(4))
    if program.calibration is None:
        raise ConfigError("the MoE analysis needs calibration data: pass calibration=... to fxpress.compile")
    return list(program.calibration.chunks())


def _names(w: dict[str, Any]) -> set[str]:
    return {n for v in w.values() for n in (v if isinstance(v, list) else [v])}


def _gather(program: Program, wanted: list[dict[str, Any]], batches: list[torch.Tensor],
            finish: Callable[[int, dict], None] | None) -> dict[str, list[torch.Tensor]]:
    """Every wanted node's value on every batch; `finish(i, store)` runs once layer i's values are all in, and
    a value no unfinished layer reads is dropped after it."""
    per_layer = [_names(w) for w in wanted]
    readers = {n: sum(n in names for names in per_layer) for names in per_layer for n in names}
    store: dict[str, list[torch.Tensor]] = {n: [] for n in readers}
    open_layers = set(range(len(wanted)))

    def record(name: str, value: torch.Tensor) -> None:
        store[name].append(value)
        if finish is None or len(store[name]) < len(batches):
            return
        for i in sorted(open_layers):
            if all(len(store[n]) == len(batches) for n in per_layer[i]):
                open_layers.discard(i)
                finish(i, store)
                for n in per_layer[i]:
                    readers[n] -= 1
                    if readers[n] == 0:
                        store[n] = []

    for_each_activation(program, readers, record, batches)
    return store


def _split_fisher(layer: ExpertLayer, w: dict[str, Any], store, grads) -> list[torch.Tensor]:
    """Per expert, the Fisher rows aligned with `LayerData.rows`."""
    out: list[list[torch.Tensor]] = [[] for _ in range(layer.num_experts)]
    if layer.fused:
        for g, offs in zip(grads[layer.down.node.name], store[w["offsets"]]):
            start = 0
            for e, end in enumerate(offs.to(torch.int64).tolist()):
                out[e].append(g[start:end])
                start = end
    else:
        for e, (ex, name) in enumerate(zip(layer.experts, w["weights"])):
            col = torch.cat([t.reshape(-1) for t in store[name]])
            out[e].append(torch.cat(grads[ex.down.node.name])[col != 0])
    return [torch.cat(o) for o in out]


def _layer_data(layer: ExpertLayer, w: dict[str, Any], store: dict[str, list[torch.Tensor]]) -> LayerData:
    e_count = layer.num_experts
    inputs = torch.cat([t.reshape(-1, t.shape[-1]) for t in store[w["input"]]]).float()
    logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in store[w["logits"]]]).float()
    rows: list[list[torch.Tensor]] = [[] for _ in range(e_count)]
    weights: list[list[torch.Tensor]] = [[] for _ in range(e_count)]
    if layer.fused:
        chosen = []
        for x, offs, rw, ids in zip(store[w["rows"]], store[w["offsets"]], store[w["row_weights"]], store[w["expert_ids"]]):
            mask = F.one_hot(ids.reshape(-1).long().clamp(0, e_count - 1), e_count).bool()
            rw = rw.reshape(-1)
            start = 0
            for e, end in enumerate(offs.to(torch.int64).tolist()):
                rows[e].append(x[start:end].float())
                weights[e].append(rw[start:end].float())
                start = end
            chosen.append(mask)
        flat = torch.cat(chosen)
        k = max(1, flat.shape[0] // inputs.shape[0])
        chosen_t = flat.reshape(inputs.shape[0], k, e_count).any(1)
    else:
        dense = []
        for e, name in enumerate(w["weights"]):
            col = torch.cat([t.reshape(-1) for t in store[name]]).float()
            keep = col != 0
            rows[e].append(inputs[keep])
            weights[e].append(col[keep])
            dense.append(keep)
        chosen_t = torch.stack(dense, 1)
    return LayerData(inputs, logits, chosen_t, [torch.cat(r) for r in rows], [torch.cat(r) for r in weights])


def calibration_rows(data: LayerData, e: int, min_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Expert e's rows and weights; when it has fewer than min_rows, add the tokens its router likes most."""
    x, w = data.rows[e], data.row_weights[e]
    missing = min_rows - x.shape[0]
    if missing <= 0:
        return x, w, 0
    scores = data.logits[:, e].masked_fill(data.chosen[:, e], -math.inf)
    take = scores.topk(min(missing, int((~data.chosen[:, e]).sum()))).indices
    all_w = torch.cat(data.row_weights)
    fill = float(all_w.mean()) if all_w.numel() else 1.0 / max(1, data.chosen.sum(1).float().mean().item())
    return torch.cat([x, data.inputs[take]]), torch.cat([w, torch.full((len(take),), fill)]), len(take)


def fisher_kl(data: LayerData, e: int, delta: torch.Tensor) -> float:
    """1/2 E_s[(g_s . delta_r)^2] summed over expert e's routed rows, per output position: the model's
    mean KL to second order when those rows change by `delta` (its first rows; extra rows routed
    on purpose do not reach the model and are ignored)."""
    g = data.row_fisher[e]
    proj = torch.einsum("rsh,rh->rs", g.double(), delta[: g.shape[0]].double())
    kl = 0.5 * float(proj.square().mean(1).sum()) / max(1, data.positions)
    if data.row_text_grad is None:
        return kl
    # calibration loss change to second order: -g_text . delta + the KL term (the Gauss-Newton part)
    first = -float((data.row_text_grad[e].double() * delta[: g.shape[0]].double()).sum()) / max(1, data.positions)
    return first + kl
