"""Distributed training on CPU (gloo, 2 processes): DDP, deterministic sharding, rank-0-only outputs.

The fast test starts the two ranks as forked processes with torchrun's environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which is all :func:`init_distributed` reads; forking
avoids two fresh torch imports, which take tens of seconds on the loaded build machine. The slow test runs
the real ``torchrun --nproc_per_node 2 -m advdet train``.
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advdet.models.ssd_vgg import ssd_vgg_small
from advdet.training.distributed import DistContext, init_distributed, shard_positions, shutdown_distributed
from advdet.training.methods import MethodConfig, train_with_method
from advdet.training.standard import TrainConfig
from advdet.training.tensor_cache import TensorCache


def _train(out: Path, per_rank_batch: int, method: str) -> None:
    """SSD-AT (A_cls, interleaved, 2-step cycles) on a tiny SSD for 3 updates; world size from the env."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = 12  # one box of the same geometry per image: every rank has the same number of positives
    images = (torch.rand(n, 3, 64, 64, generator=g) * 80).to(torch.uint8)
    images[:, :, 16:44, 12:48] = 220
    cache = TensorCache(images, [torch.tensor([[12.0, 16, 48, 44]])] * n, [torch.tensor([i % 2]) for i in range(n)])
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    det = ssd_vgg_small(num_classes=2, input_size=64)
    cfg = TrainConfig(iters=3, batch_size=per_rank_batch, augment=False, optimizer="sgd", lr=1e-2,
                      lr_schedule="constant", warmup_iters=0, checkpoint_every=2, log_every=1, seed=0)
    try:
        card = train_with_method(method, det, cache, out, train_cfg=cfg, method_cfg=MethodConfig(pgd_steps=2),
                                 dist=ctx, command="test")
        torch.save({k: v.clone() for k, v in det.state_dict().items()}, out / f"rank{ctx.rank}.pt")
        assert card["world_size"] == ctx.world_size and card["finished"]
    finally:
        shutdown_distributed(ctx)


def _worker(rank: int, world: int, port: int, out: Path, per_rank_batch: int, method: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _train(out, per_rank_batch, method)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_positions_compose_to_the_global_halves():
    # per-rank batch 4 on 2 ranks: rank r takes its quarter of each global half
    assert shard_positions(8, 0, 2).tolist() == [0, 1, 4, 5]
    assert shard_positions(8, 1, 2).tolist() == [2, 3, 6, 7]
    assert shard_positions(6, 1, 2).tolist() == [3, 4, 5]  # odd per-rank batch: contiguous
    assert sorted(sum((shard_positions(12, r, 3).tolist() for r in range(3)), [])) == list(range(12))
    with pytest.raises(ValueError, match="does not split evenly"):
        shard_positions(7, 0, 2)


def test_single_process_context_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext() and not ctx.is_distributed and ctx.is_main
    assert ctx.all_gather_object(3) == [3] and ctx.broadcast_object("a") == "a"


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mp = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [mp.Process(target=_worker, args=(r, 2, port, tmp_path / "ddp", 2, "at-cls")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps the ranks identical
    saved = load_file(str(tmp_path / "ddp" / "weights.safetensors"))  # written by rank 0
    assert saved.keys() == r0.keys() and all(torch.equal(saved[k], r0[k]) for k in saved)
    ck = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["method_state_ranks"]) == 2 and ck["iteration"] == 3
    assert not torch.equal(ck["method_state_ranks"][0]["x0"], ck["method_state_ranks"][1]["x0"])  # own shards
    # one process with the global batch (4 = 2 ranks x 2): the same images in the same roles
    _train(tmp_path / "one", 4, "at-cls")
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for k in one:
        assert torch.allclose(one[k], r0[k], rtol=1e-4, atol=1e-5), (k, float((one[k] - r0[k]).abs().max()))
    torch.manual_seed(0)
    init = ssd_vgg_small(num_classes=2, input_size=64).state_dict()
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-3  # the 3 updates changed the weights


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """The real launcher: `torchrun --nproc_per_node 2 -m advdet train` (about a minute on the build machine)."""
    from advdet.data.shapes import generate_shapes

    generate_shapes(tmp_path / "shp", train=4, val=0, seed=0, workers=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "advdet", "train", "--method", "at-cls", "--model", "ssd_vgg", "--data",
                          str(tmp_path / "shp" / "train"), "--out", str(out), "--iters", "2", "--batch-size", "2",
                          "--pgd-steps", "1", "--device", "cpu", "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("at-cls on ssd_vgg: 2/2 updates") == 1  # only rank 0 prints
    card = json.loads((out / "weights.json").read_text())
    assert card["world_size"] == 2 and card["command"].startswith("torchrun --nproc_per_node 2 -m advdet train")
    assert card["finished"] and (out / "weights.safetensors").is_file()
