"""Benchmark of the chunked all-reduce: vs one flat all_reduce, and chunked_ddp vs ddp step time (2 gloo ranks)."""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORLD = 2
GRAD_MB = 256  # total fp32 gradient bytes of the all-reduce comparison
REPEATS = 3
STEP_WARMUP, STEP_TIMED = 1, 6
STEP_SEQ, STEP_MICRO, STEP_DEPTH = 64, 2, (1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, port: int, out_file: str, chunk_mib: float) -> None:
    import torch
    import torch.distributed as dist

    from recdepth.dist.strategy import ChunkBuffers, chunk_numel_for, chunked_mean_allreduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    total = GRAD_MB * 2**20 // 4
    # varied sizes like a model: one embedding-sized tensor, several matrices, many small vectors
    sizes = [total * 3 // 10, total // 5, total // 5, total // 10, total // 10]
    sizes += [4096] * 64
    sizes.append(total - sum(sizes))
    params = [torch.nn.Parameter(torch.empty(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.numel())
    flat = torch.randn(total)
    buffers = ChunkBuffers()
    chunk = chunk_numel_for(chunk_mib)
    chunked_mean_allreduce(params, chunk, buffers=buffers)  # first call: consistency check, buffers
    dist.all_reduce(flat)
    flat_s, chunked_s = [], []
    for _ in range(REPEATS):  # interleaved, so both see the same machine load
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        flat.div_(WORLD)
        flat_s.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        n = chunked_mean_allreduce(params, chunk, buffers=buffers)
        chunked_s.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"flat_s": statistics.median(flat_s),
                                              "chunked_s": statistics.median(chunked_s),
                                              "collectives": n, "allocations": buffers.allocations}))
    dist.destroy_process_group()


def bench_allreduce(out: dict, chunk_mib: float = 64.0) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "allreduce.json")
        mp.start_processes(_allreduce_worker, args=(_free_port(), out_file, chunk_mib), nprocs=WORLD,
                           start_method="spawn", join=True)
        res = json.loads(Path(out_file).read_text())
    mb = GRAD_MB * 2**20 / 1e6
    out["allreduce_grad_mb"] = GRAD_MB
    out["allreduce_chunk_mib"] = chunk_mib
    out["allreduce_collectives"] = res["collectives"]
    out["allreduce_flat_s"] = res["flat_s"]
    out["allreduce_chunked_s"] = res["chunked_s"]
    out["allreduce_flat_mb_per_s"] = mb / res["flat_s"]
    out["allreduce_chunked_mb_per_s"] = mb / res["chunked_s"]
    out["chunked_vs_flat_throughput_ratio"] = res["flat_s"] / res["chunked_s"]


def _step_worker(fabric, out_file: str) -> None:
    """Alternate steps of a chunked_ddp model and a DDP-wrapped copy in one process group, so both see the
    same machine load; the DDP wrapper is what Fabric's DDPStrategy.setup_module builds on CPU."""
    import copy

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.nn.parallel import DistributedDataParallel

    import recdepth.config  # noqa: F401
    from recdepth.config import ModelConfig
    from recdepth.model import RecurrentLM

    torch.set_num_threads(1)
    with initialize_config_dir(str(ROOT / "conf" / "model"), version_base="1.3"):
        fields = OmegaConf.to_container(compose("raven_small"))
    cfg = ModelConfig(**{k: v for k, v in fields.items() if k in ModelConfig.__dataclass_fields__})
    module = RecurrentLM(cfg)
    ddp = DistributedDataParallel(copy.deepcopy(module))
    opt_ddp = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    chunked, opt_chunked = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(fabric.global_rank)
    x = torch.randint(0, cfg.vocab_size, (STEP_MICRO, STEP_SEQ + 1), generator=g)

    def step(name: str) -> float:
        fabric.barrier()
        t0 = time.perf_counter()
        if name == "ddp":
            ddp(x[:, :-1], labels=x[:, 1:], num_steps=STEP_DEPTH).loss.backward()
            opt_ddp.step()
            opt_ddp.zero_grad()
        else:
            fabric.backward(chunked(x[:, :-1], labels=x[:, 1:], num_steps=STEP_DEPTH).loss)
            opt_chunked.step()
            opt_chunked.zero_grad()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"ddp": [], "chunked_ddp": []}
    for i in range(STEP_WARMUP + STEP_TIMED):
        for name in (("ddp", "chunked_ddp") if i % 2 else ("chunked_ddp", "ddp")):
            elapsed = step(name)
            if i >= STEP_WARMUP:
                times[name].append(elapsed)
    if fabric.global_rank == 0:
        params = sum(p.numel() for p in module.parameters())
        Path(out_file).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()} | {"params": params}))


def bench_step(out: dict) -> None:
    from recdepth.config import ClusterConfig, ParallelismConfig
    from recdepth.dist.cluster import build_fabric

    with tempfile.TemporaryDirectory() as tmp:
        fabric = build_fabric(ClusterConfig(accelerator="cpu", devices=WORLD), ParallelismConfig(name="chunked_ddp"),
                              "32-true")
        out_file = str(Path(tmp) / "step.json")
        fabric.launch(_step_worker, out_file)
        res = json.loads(Path(out_file).read_text())
    out["step_model_params"] = res["params"]
    out["step_shape"] = f"raven_small, micro {STEP_MICRO} x seq {STEP_SEQ}, (n, k) = {STEP_DEPTH}, {WORLD} gloo ranks"
    out["step_ddp_s"] = res["ddp"]
    out["step_chunked_ddp_s"] = res["chunked_ddp"]
    out["chunked_vs_ddp_step_time_ratio"] = res["chunked_ddp"] / res["ddp"]


def bench_dist(out: dict) -> None:
    """Fill `out` with the figures and the two ratios (targets in `targets`)."""
    bench_allreduce(out)
    bench_step(out)
    out["targets"] = {"chunked_vs_flat_throughput_ratio": ">= 0.8", "chunked_vs_ddp_step_time_ratio": "<= 1.15"}


if __name__ == "__main__":
    figures: dict = {}
    bench_dist(figures)
    print(json.dumps(figures, indent=1))
