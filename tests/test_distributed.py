"""Calibration across processes (fxpress.distributed): 2 gloo ranks on CPU give one process's packed weights."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fxpress import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantize_tiny_llama() -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """GPTQ W4 with act-order, correcting its input quantizers' error, and W4 activations with the clip search on a
    tiny Llama: 5 chunks of 4 samples."""
    from fxpress.calibration import Calibration
    from fxpress.capture import capture
    from fxpress.passes import Quantize, run_passes
    from fxpress.passes.quantize import ActQuant, WeightQuant
    from fxpress.zoo import tiny_causal_lm

    program = capture(tiny_causal_lm("llama", seed=0))
    ids = torch.randint(0, program.info.vocab_size, (20, 32), generator=torch.Generator().manual_seed(0))
    program.calibration = Calibration(ids, batch_size=4)
    quantize = Quantize(weights=WeightQuant(bits=4, method="gptq", act_order=True, correct_act_error=True),
                        activations=ActQuant(bits=4, clip_search=True))
    stats = run_passes(program, [quantize], progress=False)[-1].stats
    packed = {k: v.clone() for k, v in program.module.named_buffers() if "_q4" in k}
    return packed, stats["act_clip_ratios"], {"samples": stats["calibration_samples"], "groups": stats["gptq_groups"]}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (rank, world, rank == 0)
        packed, ratios, stats = _quantize_tiny_llama()
        save_file(packed, str(Path(out) / f"rank{rank}.safetensors"))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"ratios": ratios, "stats": stats}))
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_torch_thread")
def test_two_gloo_ranks_give_the_packed_weights_of_one_process(tmp_path):
    """5 chunks split 3 + 2: Hessians and X^T X~ (float64) and clip errors are all-reduced, so both ranks apply the
    update one process applies, bit for bit."""
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    packed, ratios, stats = _quantize_tiny_llama()
    assert stats == {"samples": 20, "groups": 8}
    for rank in (0, 1):
        theirs = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert theirs.keys() == packed.keys() and len(packed) == 42
        assert all(torch.equal(theirs[k], packed[k]) for k in packed), rank
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"ratios": ratios, "stats": stats}


def test_without_a_process_group_everything_is_local():
    t = torch.arange(3.0)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    assert distributed.shard(list(range(5))) == list(range(5))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_shards_are_contiguous_cover_every_chunk_once_and_differ_by_at_most_one(world, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    shards = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard(list(range(5))))
    assert [x for s in shards for x in s] == list(range(5))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
