"""prune_tokens: the gather/scatter rewrite, decode consistency, export, the pass, and quality vs ShortGPT."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

from fxpress.calibration import Calibration
from fxpress.capture import capture
from fxpress.errors import ConfigError, PassError, RecipeError
from fxpress.evaluate import paired_bootstrap, perplexity, window_metrics
from fxpress.passes import PruneTokens, pass_from_dict, run_passes
from fxpress.passes.prune_tokens import baselines
from fxpress.passes.prune_tokens.flops import prune_flops
from fxpress.passes.prune_tokens.router import (
    FEATURES,
    HeuristicRouter,
    MaskGate,
    TokenRouter,
    block_costs,
    find_blocks,
    route_blocks,
)
from fxpress.passes.prune_tokens.search import ScheduleSearch, SearchSettings
from fxpress.passes.prune_tokens.training import RouterTraining, collect, fit_guide, masked_module
from fxpress.passes.quantize import WeightQuant
from fxpress.zoo import tiny_causal_lm

LAYERS = 4


@pytest.fixture(scope="module")
def tiny_program():
    torch.manual_seed(0)
    return capture(tiny_causal_lm("llama", num_hidden_layers=LAYERS))


def clone(program):
    twin = copy.copy(program)
    twin.module = copy.deepcopy(program.module)
    twin.history, twin.report, twin.metadata = [], [], {}
    return twin


def routed(program, mode: str, schedule: list[float], seed: int = 1, router: TokenRouter | None = None):
    """A copy of the program's graph with a random (or the given) router, in gather or mask form."""
    twin = clone(program)
    router = router or TokenRouter(LAYERS, hidden=16, seed=seed)
    router.sparsity.copy_(torch.tensor(schedule))
    route_blocks(twin.module, router, mode, schedule, probes=4, gate=MaskGate(router) if mode == "mask" else None)
    return twin


def full_run(program, ids, past: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kh, kd = program.info.key_shape
    keys = torch.randn(LAYERS, ids.shape[0], kh, past, kd, generator=gen)
    values = torch.randn(LAYERS, ids.shape[0], kh, past, kd, generator=gen)
    with torch.no_grad():
        return program.run(ids, keys, values)


def test_finds_one_block_per_layer_with_residual_bounds(tiny_program):
    blocks = find_blocks(tiny_program.module)
    assert len(blocks) == LAYERS
    for block in blocks:
        assert len(block.residual_adds) == 2  # attention add, MLP add
        assert block.sdpa in block.query_side and block.h_out in block.query_side
        assert block.query_path and block.sdpa not in block.query_path


def test_gather_graph_equals_mask_graph_logits_and_cache(tiny_program):
    schedule = [0.0, 0.5, 0.3, 0.25]
    gather, mask = routed(tiny_program, "gather", schedule), routed(tiny_program, "mask", schedule)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for past in (0, 5):
        out_g, out_m, out_d = full_run(gather, ids, past), full_run(mask, ids, past), full_run(tiny_program, ids, past)
        for a, b in zip(out_g, out_m):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (out_g[0] - out_d[0]).abs().max() > 1e-3  # tokens really skipped blocks
        assert out_g[1].shape == out_d[1].shape  # every position keeps its keys/values


def test_short_chunks_and_decode_are_never_pruned(tiny_program):
    schedule = [0.0, 0.3, 0.3, 0.3]
    gather = routed(tiny_program, "gather", schedule)
    for seq in (1, 3):  # floor(0.3 * seq) == 0: every token kept
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        for a, b in zip(full_run(gather, ids, past=7), full_run(tiny_program, ids, past=7)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefill_then_decode_uses_the_pruned_cache(tiny_program):
    gather = routed(tiny_program, "gather", [0.0, 0.5, 0.5, 0.5])
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    keys, values = gather.empty_cache(1)
    with torch.no_grad():
        _, keys, values = gather.run(ids[:, :19], keys, values)
        step = gather.run(ids[:, 19:], keys, values)
        dense_step = tiny_program.run(ids[:, 19:], keys, values)
    assert step[1].shape[3] == 20
    torch.testing.assert_close(step[0], dense_step[0], atol=1e-5, rtol=1e-5)


def test_dropped_block_is_layer_dropping_without_router(tiny_program):
    schedule = [0.0, 1.0, 0.25, 0.0]
    gather = routed(tiny_program, "gather", schedule)
    mask = routed(tiny_program, "mask", schedule)
    routers = [n for n in gather.graph.nodes if getattr(n.target, "__name__", "") == "select_tokens"]
    assert len(routers) == 1  # block 2 routed; block 1 dropped, block 3 untouched
    dropped = clone(tiny_program)
    baselines.drop(dropped, [(1, "block")])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    for a, b in zip(full_run(gather, ids, 5), full_run(mask, ids, 5)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for seq in (1, 3):  # decode: the dropped block stays dropped; nothing else is pruned
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        for a, b in zip(full_run(gather, ids, 7), full_run(dropped, ids, 7)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    meta = {"blocks": [block_costs(b) for b in find_blocks(tiny_program.module)], "probes": 4, "head_macs": 0}
    flops = prune_flops(meta, 24, [0.0, 1.0, 0.0, 0.0])
    macs = baselines.sub_block_macs(find_blocks(tiny_program.module)[1], 24)["block"]
    assert flops["dense"] - flops["pruned"] == pytest.approx(macs)  # same count as the ShortGPT baseline


def test_first_token_is_never_skipped(tiny_program):
    gather = routed(tiny_program, "gather", [0.0, 0.9, 0.9, 0.9], seed=5)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5))
    pruned, dense = full_run(gather, ids)[0], full_run(tiny_program, ids)[0]
    torch.testing.assert_close(pruned[:, 0], dense[:, 0], atol=1e-5, rtol=1e-5)  # it ran every block
    assert (pruned[:, 1:] - dense[:, 1:]).abs().max() > 1e-3


def test_schedule_search_stays_in_budget_and_finds_the_cheapest_blocks():
    def flops(s):  # six equal blocks, pruned multiply-adds
        return sum(1.0 - x for x in s)

    def score(s):  # blocks 4 and 5 are nearly free to drop, the others cost more the later they are
        return sum(x * (0.1 if i >= 4 else 1.0 + 0.1 * i) for i, x in enumerate(s))

    search = ScheduleSearch(score, flops, 4.0, [0, 4, 4, 4, 4, 4], 4, random.Random(0))
    seed = search.fill([1, 2, 3, 4, 5])  # ShortGPT-like seed: drop blocks 1 and 2
    assert seed == (0, 4, 4, 0, 0, 0)
    best, kl = search.run([seed], 30)
    assert all(search.feasible(s) for s in search.pool)
    assert best == (0, 0, 0, 0, 4, 4) and kl < search.pool[seed]


def test_block_only_search_is_the_whole_block_ablation():
    def flops(s):  # six equal blocks
        return sum(1.0 - x for x in s)

    def score(s):  # half-routing blocks 1-3 is cheaper than dropping any block whole
        return sum(x * x * 4.0 * (0.5 if 1 <= i <= 3 else 1.0) for i, x in enumerate(s))

    search = ScheduleSearch(score, flops, 4.5, [0, 4, 4, 4, 4, 4], 4, random.Random(0))
    search.evaluate((0, 2, 2, 2, 0, 0))  # a routed schedule: the block-only twin must not inherit it
    search.evaluate((0, 0, 0, 0, 4, 4))
    blocks = search.whole_blocks()
    assert blocks.top == [0, 1, 1, 1, 1, 1] and blocks.pool == {(0, 0, 0, 0, 1, 1): 8.0}  # shared score
    best, kl = blocks.run([blocks.fill([1, 2, 3, 4, 5])], 20)
    assert set(best) <= {0, 1} and sum(best) == 2 and kl == pytest.approx(4.0)  # drops two of blocks 1-3
    mixed = search.fill_mixed([5, 1, 2, 3, 4], drops=0, level=2)
    assert search.feasible(mixed) and max(mixed) == 2
    routed_best, routed_kl = search.run([mixed, tuple(lv * 4 for lv in best)], 30)
    assert routed_kl <= 1.5 < kl  # partial sparsity spread over blocks (e.g. (0, 2, 2, 2, 0, 0)) beats dropping


def test_heuristic_router_scores_by_one_feature_in_both_graph_forms(tiny_program):
    schedule = [0.0, 0.5, 1.0, 0.25]
    forms = {mode: routed(tiny_program, mode, schedule, router=HeuristicRouter(LAYERS, "hidden_norm", -1.0))
             for mode in ("gather", "mask")}
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    for a, b in zip(full_run(forms["gather"], ids, 3), full_run(forms["mask"], ids, 3)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    feats = torch.randn(2, 5, len(FEATURES))
    torch.testing.assert_close(HeuristicRouter(LAYERS, "attention").score_features(feats),
                               feats[..., FEATURES.index("attention")])
    with pytest.raises(ConfigError, match="feature"):
        HeuristicRouter(LAYERS, "loudness")


def test_hidden_state_direction_helps_the_router_fit_the_oracle(tiny_program):
    """The per-block learned direction (one more low-dimensional factor) ranks tokens closer to the oracle."""
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(8))
    losses = {}
    for width in (0, tiny_program.info.hidden_size):
        router = TokenRouter(LAYERS, hidden=16, seed=0, width=width)
        records = collect(masked_module(tiny_program, router, 4), router, tiny_program, samples)
        assert ("hidden" in records[1]) == bool(width)
        losses[width] = fit_guide(router, records, [0, 4, 4, 4], 4, 150, 0)
    assert losses[tiny_program.info.hidden_size] < 0.8 * losses[0]


def test_window_metrics_and_paired_bootstrap(tiny_program):
    windows = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(7))
    half = routed(tiny_program, "gather", [0.0, 1.0, 1.0, 0.0])
    m = window_metrics(tiny_program, {"same": tiny_program, "half": half}, windows, batch_size=4)
    assert m["same"]["nll"].shape == (6,) and float(m["same"]["kl"].abs().max()) < 1e-9
    assert float(m["same"]["top1"].min()) == 1.0 and float(m["half"]["kl"].min()) > 0
    assert math.exp(float(m["same"]["nll"].mean())) == pytest.approx(perplexity(tiny_program, windows), rel=1e-5)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    shifted = paired_bootstrap(a, a + 0.5, "mean")  # a constant paired shift: an interval of width 0
    assert shifted["diff"] == pytest.approx(-0.5) and shifted["lo"] == pytest.approx(-0.5) == shifted["hi"]
    assert shifted["windows_better"] == 1.0
    noisy = paired_bootstrap(a, a.flip(0), "ppl")  # same values paired in reverse: 0 lies inside the interval
    assert noisy["diff"] == pytest.approx(0.0) and noisy["lo"] < 0 < noisy["hi"]
    with pytest.raises(ValueError, match="per-window"):
        paired_bootstrap(a, a[:3])


def test_rejects_bad_configs_before_work(tiny_program):
    with pytest.raises(ConfigError, match="sparsity"):
        PruneTokens(sparsity=1.5).validate()
    with pytest.raises(ConfigError, match="max_block_sparsity"):
        PruneTokens(sparsity=0.6, search=SearchSettings(max_block_sparsity=0.5)).validate()
    with pytest.raises(ConfigError, match="schedule"):
        PruneTokens(schedule=[]).validate()
    twin = clone(tiny_program)
    twin.calibration = Calibration(torch.randint(0, 256, (4, 16)))
    with pytest.raises(PassError, match="protect fewer blocks"):
        run_passes(twin, [PruneTokens(sparsity=0.6, protect_first=3)], progress=False)
    twin.calibration = None
    with pytest.raises(ConfigError, match="calibration"):
        run_passes(twin, [PruneTokens()], progress=False)


def test_pass_guides_searches_distills_and_rewrites(tiny_program):
    program = clone(tiny_program)
    program.calibration = Calibration(torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0)))
    cfg = PruneTokens(sparsity=0.3, router=RouterTraining(guide_steps=30, train_steps=2, probes=4),
                      search=SearchSettings(search_evals=4, refine_evals=1, block_search_evals=3), progress=False)
    stats = run_passes(program, [cfg], progress=False)[0].stats
    schedule = program.metadata["prune_tokens"]["schedule"]
    assert schedule[0] == 0.0 and all(s * cfg.search.levels == round(s * cfg.search.levels) for s in schedule)  # on the grid
    assert stats["flops_ratio@32"] <= stats["flops_budget@32"] + 1e-9 < 0.8
    for seed in ("uniform", "shortgpt", "sensitivity", "block_only"):  # ShortGPT's order and the best
        assert stats["search_kl_best"] <= stats[f"search_kl_{seed}"] + 1e-9  # whole-block schedule are seeds
    block_only = stats["block_only_schedule"]  # the ablation: the same search, {0, 1} per block
    assert set(block_only) <= {0.0, 1.0} and block_only[0] == 0.0 and stats["block_only_scored"] >= 3
    assert prune_flops(program.metadata["prune_tokens"], 32, block_only)["ratio"] <= stats["flops_budget@32"] + 1e-9
    if stats.get("distill_kept"):  # distillation is kept only when it lowers held-out KL
        assert stats["refine_kl_best"] <= stats["distill_kl_before"] + 1e-9
    assert prune_flops(program.metadata["prune_tokens"], 256)["ratio"] < 0.85
    routed = [i for i, s in enumerate(schedule) if 0 < s < 1]
    targets = [str(n.target) for n in program.graph.nodes]
    assert targets.count("aten.topk.default") == len(routed)
    if routed:
        assert stats["distill_loss_first"] is not None
    assert all(n.op != "call_module" or n.target == "_guards_fn" for n in program.graph.nodes)
    for seq in (1, 7, 40):  # dynamic sequence length, decode included
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        assert program(ids).shape == (2, seq, 256)


def test_composes_with_rotate_and_quantize_and_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import fxpress
    from fxpress.passes import Quantize, Rotate

    torch.manual_seed(0)
    model = tiny_causal_lm("llama", num_hidden_layers=LAYERS)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    prune = PruneTokens(sparsity=0.25, router=RouterTraining(guide_steps=20, train_steps=1, probes=4),
                        search=SearchSettings(search_evals=2, refine_evals=0, max_block_sparsity=0.75,
                                              sensitivity_probes=False), progress=False)  # routed, none dropped
    cm = fxpress.compile(model, passes=[Rotate(), Quantize(weights=WeightQuant(bits=4, group_size=32)), prune], calibration=calib,
                         progress=False)
    assert cm.program.history == ["rotate", "quantize", "prune_tokens"]
    result = cm.program.report[-1]
    assert any("distillation skipped" in w for w in result.warnings)  # quantized ops carry no gradient
    from fxpress.lowering.onnx import export_onnx

    path = tmp_path / "composed.onnx"
    export_onnx(cm.program, path, fused=False)  # the stacked-cache signature fed below
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    kh, kd = cm.program.info.key_shape
    for seq, past in ((40, 0), (1, 9)):
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        keys, values = torch.randn(LAYERS, 2, kh, past, kd), torch.randn(LAYERS, 2, kh, past, kd)
        expected = cm.program.run(ids, keys, values)[0].numpy()
        got = session.run(None, dict(zip(names, (ids.numpy(), keys.numpy(), values.numpy()))))[0]
        assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


def test_version_3_recipe_loads_into_the_same_grouped_config():
    flat = {"sparsity": 0.4, "schedule": None, "levels": 4, "max_block_sparsity": 0.75, "protect_first": 2,
            "protect_last": 1, "router_hidden": 32, "router_projection": False, "probes": 8, "guide_steps": 50,
            "train_steps": 4, "train_batch": 3, "lr": 1e-3, "sensitivity_probes": False, "search_evals": 10,
            "block_search_evals": 2, "refine_evals": 3, "heldout_fraction": 0.5, "seed": 7, "progress": False}
    loaded = pass_from_dict({"type": "prune_tokens", "version": 3, "fields": flat})
    assert loaded == PruneTokens(
        sparsity=0.4, protect_first=2, protect_last=1, seed=7, progress=False,
        router=RouterTraining(hidden=32, projection=False, probes=8, guide_steps=50, train_steps=4, train_batch=3,
                              lr=1e-3),
        search=SearchSettings(levels=4, max_block_sparsity=0.75, sensitivity_probes=False, search_evals=10,
                              block_search_evals=2, refine_evals=3, heldout_fraction=0.5),
    )
    assert pass_from_dict({"type": "prune_tokens", "version": 3, "fields": {"lr": 0.01}}).router.lr == 0.01
    assert pass_from_dict(loaded.to_dict()) == loaded  # version 4 writes the groups nested
    assert loaded.to_dict()["fields"]["router"]["hidden"] == 32
    with pytest.raises(RecipeError, match="prune_tokens.router"):
        pass_from_dict({"type": "prune_tokens", "fields": {"router": {"router_hidden": 32}}})
