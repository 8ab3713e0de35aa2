"""Where processes run: Fabric construction, pre-flight validation, collective warm-up, SLURM plans.

Launch model: under SLURM (srun, including the submitit launcher) or torchrun the processes already exist
and Fabric only joins them. Otherwise, with more than one device, `build_fabric` selects the `spawn` start
method, so `fabric.launch(fn, *args)` starts the workers with torch.multiprocessing and runs `fn` (a
module-level, picklable function) in each. Fabric's default `popen` launcher is never used for that: it
re-executes `sys.argv`, which under a Hydra multirun would start extra sweeps.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric import Fabric
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning_fabric.strategies import DDPStrategy, FSDPStrategy
from lightning_fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from recdepth.config import ClusterConfig, ParallelismConfig
from recdepth.dist.signals import PreemptionFlag, any_rank_flag, seconds_left, time_to_stop
from recdepth.dist.strategy import MIB, ChunkedDDPStrategy
from recdepth.errors import ConfigError, DistributedError

__all__ = [
    "PreemptionFlag",
    "any_rank_flag",
    "build_fabric",
    "check_lockstep",
    "dry_run_plan",
    "frontier_max_minutes",
    "needs_dry_run",
    "processes_created_externally",
    "seconds_left",
    "time_to_stop",
    "validate_parallel",
    "warmup_collectives",
]

log = logging.getLogger(__name__)

CPU_PROCESSES_PER_CORE = 4  # gloo ranks on CPU may oversubscribe cores, within reason


# --------------------------------------------------------------------------------------------- validation


def world_size(cluster: ClusterConfig) -> int:
    return cluster.devices * cluster.num_nodes


def processes_created_externally() -> bool:
    """True under srun (SLURM) or torchrun, where Fabric must join the existing processes, not start any."""
    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def _uses_gpu(cluster: ClusterConfig) -> bool:
    if cluster.accelerator == "gpu":
        return True
    return cluster.accelerator == "auto" and torch.cuda.is_available()


def frontier_max_minutes(num_nodes: int) -> int:
    """Frontier's queue limit for a job of `num_nodes` nodes (training spec §14)."""
    if num_nodes > 184:
        return 720
    if num_nodes > 92:
        return 360
    return 120


def validate_cluster(cluster: ClusterConfig, check_devices: bool = True) -> None:
    """Cluster fields that must hold before anything is submitted or a process group starts."""
    if cluster.name in ("slurm", "frontier") and not (cluster.partition or cluster.account):
        raise ConfigError(
            f"cluster={cluster.name} needs cluster.partition or cluster.account (both are null); "
            f"e.g. cluster.account=<project> or cluster.partition=<queue>"
        )
    if cluster.name == "frontier" and cluster.time_min > frontier_max_minutes(cluster.num_nodes):
        raise ConfigError(
            f"cluster.time_min={cluster.time_min} is invalid: expected <= {frontier_max_minutes(cluster.num_nodes)} "
            f"(Frontier's queue limit for cluster.num_nodes={cluster.num_nodes})"
        )
    if not check_devices:
        return
    if _uses_gpu(cluster):
        available = torch.cuda.device_count()
        if cluster.devices > available:
            raise ConfigError(
                f"cluster.devices={cluster.devices} is invalid: expected <= {available} "
                f"(GPUs visible on this machine)"
            )
    else:
        limit = (os.cpu_count() or 1) * CPU_PROCESSES_PER_CORE
        if cluster.devices > limit:
            raise ConfigError(
                f"cluster.devices={cluster.devices} is invalid: expected <= {limit} CPU processes "
                f"({os.cpu_count()} cores x {CPU_PROCESSES_PER_CORE})"
            )


def validate_parallel(run_cfg: Any, check_devices: bool | None = None) -> None:
    """Pre-flight checks of the parallel layout; raises one ConfigError line before any process group starts.

    `run_cfg` is a RunConfig (or a DictConfig of the same shape). Devices are only counted when the job would
    run here, not when it is about to be planned or submitted for a cluster (see `needs_dry_run`).
    """
    cluster, par, train = run_cfg.cluster, run_cfg.parallelism, run_cfg.train
    if check_devices is None:
        check_devices = not needs_dry_run(run_cfg)
    validate_cluster(cluster, check_devices=check_devices)
    world = world_size(cluster)
    if par.name == "single" and world > 1:
        raise ConfigError(
            f"parallelism=single runs one process but cluster.devices x cluster.num_nodes = {world}; "
            "expected parallelism=ddp|chunked_ddp|fsdp or cluster.devices=1"
        )
    per_step = world * train.micro_batch_size
    if train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is invalid: expected a multiple of "
            f"world size x train.micro_batch_size = {world} x {train.micro_batch_size} = {per_step}"
        )


def needs_dry_run(run_cfg: Any) -> bool:
    """A cluster config run outside a SLURM allocation: print the plan instead of trying to start."""
    return run_cfg.cluster.name in ("slurm", "frontier") and not os.environ.get("SLURM_JOB_ID")


# ---------------------------------------------------------------------------------------------- fabric


def _accelerator(cluster: ClusterConfig) -> str:
    return "cuda" if _uses_gpu(cluster) else "cpu"


def build_fabric(
    cluster: ClusterConfig, parallelism: ParallelismConfig, precision: str, loggers: Any = None
) -> Fabric:
    """A Fabric for this layout; call `fabric.launch(fn, *args)` next (it creates or joins the process group).

    Validates the device count first, applies `cluster.env` to this process (NCCL/libfabric read it when the
    communicator starts), and picks the start method described in the module docstring.
    """
    validate_cluster(cluster, check_devices=True)
    world = world_size(cluster)
    if parallelism.name == "single" and world > 1:
        raise ConfigError(f"parallelism=single runs one process but the cluster asks for {world}")
    for key, value in cluster.env.items():
        os.environ[key] = str(value)
    start_method = "popen" if processes_created_externally() or world == 1 else "spawn"
    timeout = timedelta(seconds=parallelism.timeout_s)
    strategy: Any
    if parallelism.name == "single":
        strategy = "auto"
    elif parallelism.name == "ddp":
        strategy = DDPStrategy(start_method=start_method, timeout=timeout)
    elif parallelism.name == "chunked_ddp":
        strategy = ChunkedDDPStrategy(chunk_mib=parallelism.chunk_mib, start_method=start_method, timeout=timeout)
    elif parallelism.name == "fsdp":
        strategy = SpawningFSDPStrategy(timeout=timeout) if start_method == "spawn" else FSDPStrategy(timeout=timeout)
    else:
        raise ConfigError(f"parallelism.name={parallelism.name!r} is invalid: expected single|ddp|chunked_ddp|fsdp")
    return Fabric(
        accelerator=_accelerator(cluster),
        devices=cluster.devices,
        num_nodes=cluster.num_nodes,
        strategy=strategy,
        precision=precision,  # type: ignore[arg-type]
        loggers=loggers,
    )


class SpawningFSDPStrategy(FSDPStrategy):
    """FSDP whose local multi-process launch uses torch.multiprocessing spawn instead of re-running argv."""

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _MultiProcessingLauncher(self, start_method="spawn")


# ------------------------------------------------------------------------------------ collective checks


def _wait(work: Any, timeout_s: float, what: str) -> None:
    """Poll an async collective so a dead peer fails this rank in `timeout_s`, not after the PG timeout."""
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise DistributedError(
                f"{what} did not complete within {timeout_s:.0f} s on rank {dist.get_rank()}: a peer is missing, "
                "slow or misconfigured (check MASTER_ADDR/MASTER_PORT, NCCL_SOCKET_IFNAME and the launcher env)"
            )
        time.sleep(0.0005)
    work.wait()


def warmup_collectives(fabric: Any, sizes_mib: list[float], timeout_s: float) -> list[tuple[float, float]]:
    """All-reduce prefixes of one buffer at each size (training spec §11); return (MiB, seconds) per stage.

    Each rank contributes rank+1, so the result is also checked: a wrong sum raises like a timeout does.
    """
    if not (dist.is_available() and dist.is_initialized()) or fabric.world_size == 1 or not sizes_mib:
        return []
    world, rank = dist.get_world_size(), dist.get_rank()
    largest = max(1, int(max(sizes_mib) * MIB) // 4)
    buf = torch.empty(largest, dtype=torch.float32, device=fabric.device)
    expected = world * (world + 1) / 2
    out: list[tuple[float, float]] = []
    for mib in sizes_mib:
        numel = max(1, int(mib * MIB) // 4)
        view = buf[:numel]
        view.fill_(rank + 1)
        t0 = time.perf_counter()
        work = dist.all_reduce(view, op=dist.ReduceOp.SUM, async_op=True)
        _wait(work, timeout_s, f"all-reduce warm-up of {mib:g} MiB")
        if view.is_cuda:
            torch.cuda.synchronize(view.device)
        elapsed = time.perf_counter() - t0
        if view.min().item() != expected or view.max().item() != expected:
            raise DistributedError(
                f"all-reduce warm-up of {mib:g} MiB returned a wrong sum on rank {rank} "
                f"(expected {expected:g} everywhere)"
            )
        out.append((mib, elapsed))
        if rank == 0:
            log.info("all-reduce warm-up %8.2f MiB: %8.2f ms (%.2f GB/s algbw)", mib, elapsed * 1e3,
                     numel * 4 / max(elapsed, 1e-9) / 1e9)
    _wait(dist.barrier(async_op=True), timeout_s, "barrier after the all-reduce warm-up")
    return out


def check_lockstep(fabric: Any, n: int, k: int) -> None:
    """All-gather each rank's (n, k); raise DistributedError naming the ranks that differ from rank 0."""
    if fabric.world_size == 1:
        return
    mine = torch.tensor([int(n), int(k)], dtype=torch.int64, device=fabric.device)
    rows = fabric.all_gather(mine).reshape(-1, 2).tolist()
    ref = tuple(rows[0])
    bad = [r for r, row in enumerate(rows) if tuple(row) != ref]
    if bad:
        detail = ", ".join(f"rank {r}: {tuple(rows[r])}" for r in bad)
        raise DistributedError(
            f"recurrence depth (n, k) is not in lockstep: rank 0 drew {ref} but {detail}; "
            "every rank must draw the same depth (recurrence.lockstep=true and the same step counter)"
        )


# ------------------------------------------------------------------------------------------- SLURM plan


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def sbatch_script(run_cfg: Any, overrides: list[str] | None = None) -> str:
    """The batch script that runs this config under SLURM: #SBATCH lines, setup, env, and the srun line."""
    c = run_cfg.cluster
    world = world_size(c)
    job = f"recdepth-{run_cfg.model.name}"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}"]
    for flag, value in (("account", c.account), ("partition", c.partition), ("qos", c.qos),
                        ("constraint", c.constraint)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [
        f"#SBATCH --nodes={c.num_nodes}",
        f"#SBATCH --ntasks-per-node={c.devices}",
        f"#SBATCH --cpus-per-task={c.cpus_per_task}",
    ]
    if c.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={c.gpus_per_node}")
    lines += [
        f"#SBATCH --time={_hhmm(c.time_min)}",
        f"#SBATCH --signal=USR2@{c.signal_delay_s}",
        "#SBATCH --output=logs/%x_%A_%a.log",
        "#SBATCH --open-mode=append",
    ]
    if c.array > 1:
        lines.append(f"#SBATCH --array=1-{c.array}%1")
    lines += list(c.setup)
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in c.env.items()]
    lines += [
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))",
    ]
    if "OMP_NUM_THREADS" not in c.env:
        lines.append(f"export OMP_NUM_THREADS={c.cpus_per_task}")
    args = [a for a in (overrides if overrides is not None else _current_overrides()) if not a.startswith("hydra.")]
    # one fixed run dir for all ranks and all requeued segments, so resume=auto finds the checkpoints
    args.append(f"out_dir=runs/{job}")
    srun = [
        "srun", "--unbuffered", "-l", "--kill-on-bad-exit=1",
        f"-N {c.num_nodes}", f"-n {world}", f"-c {c.cpus_per_task}", f"--ntasks-per-node={c.devices}",
    ]
    if c.gpus_per_node:
        srun.append(f"--gpus-per-node={c.gpus_per_node}")
    srun += list(c.srun_args)
    lines.append(" ".join(srun) + " python -u run.py " + " ".join(shlex.quote(a) for a in args))
    return "\n".join(lines)


def _current_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # HydraConfig is not set: not inside a Hydra app (tests, tools)
        return [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]


def memory_per_device(run_cfg: Any) -> dict[str, float]:
    """Bytes per device: fp32 weights, grads, optimizer state (2 per parameter), activations (estimate).

    Activations assume per-iteration checkpointing: prelude/coda blocks keep ~(17 + 5·I/d) tensors of B·S·d,
    each grad iteration keeps its input state, one core iteration is live again during its recompute, and the
    fp32 logits plus their gradient are B·S·V each.
    """
    from recdepth.model.flops import count_params

    m, t, c = run_cfg.model, run_cfg.train, run_cfg.cluster
    params = count_params(m)["total"]
    weight_bytes = 2 if t.precision == "bf16-true" else 4
    act_bytes = 4 if t.precision == "32-true" else 2
    shard = {"none": 1, "node": c.devices, "world": world_size(c)}[run_cfg.optim.shard]
    unit = t.micro_batch_size * m.block_size * m.n_embd * act_bytes
    per_block = 17 + 5 * m.intermediate_size / m.n_embd
    k = run_cfg.recurrence.backprop_depth if run_cfg.recurrence.scheme != "non-recurrent" else 1
    if m.activation_checkpointing == "per-iteration":
        saved = (m.n_prelude + m.n_coda) * per_block + k + 1 + m.n_core * per_block
    else:
        saved = (m.n_prelude + m.n_coda + k * m.n_core) * per_block + k
    logits = 2 * t.micro_batch_size * m.block_size * m.vocab_size * 4
    return {
        "weights": params * weight_bytes,
        "gradients": params * weight_bytes,
        "optimizer": 2 * params * 4 / shard,
        "activations": unit * saved + logits,
    }


def dry_run_plan(run_cfg: Any, overrides: list[str] | None = None) -> str:
    """What a cluster run would do and cost, printed instead of starting where there is no allocation."""
    from recdepth.model.flops import count_params, expected_flops_per_token

    m, r, t, c, p = run_cfg.model, run_cfg.recurrence, run_cfg.train, run_cfg.cluster, run_cfg.parallelism
    world = world_size(c)
    params = count_params(m)["total"]
    flops = expected_flops_per_token(m, r)
    tokens = t.global_batch_size * m.block_size
    gas = max(1, t.global_batch_size // max(1, world * t.micro_batch_size))
    mem = memory_per_device(run_cfg)
    gib = 2**30
    lines = [
        f"dry run: cluster={c.name} is not available here (no SLURM_JOB_ID); this is what would be submitted.",
        "",
        f"model            {m.name}: {params:,} parameters",
        f"recurrence       {r.scheme}, mean depth {r.mean}, backprop depth {r.backprop_depth}, lockstep {r.lockstep}",
        (f"FLOPs per token  {flops.model:.4g} (forward + backward at the schedule's mean depth), "
        f"{flops.hardware:.4g} incl. recompute"),
        f"layout           {c.num_nodes} nodes x {c.devices} devices = {world} ranks, parallelism={p.name}"
        + (f" ({p.chunk_mib:g} MiB messages)" if p.name == "chunked_ddp" else "")
        + f", precision {t.precision}",
        (f"tokens per step  {tokens:,} = global batch {t.global_batch_size} x {m.block_size} "
        f"(micro batch {t.micro_batch_size}/rank, {gas} micro-step(s) per optimizer step)"),
        (f"memory/device    weights {mem['weights'] / gib:.1f} GiB + grads {mem['gradients'] / gib:.1f} GiB + "
        f"optimizer {mem['optimizer'] / gib:.1f} GiB (2 fp32 states, optim.shard={run_cfg.optim.shard}) + "
        f"activations ~{mem['activations'] / gib:.1f} GiB = ~{sum(mem.values()) / gib:.1f} GiB"),
    ]
    if c.device_mem_gib and sum(mem.values()) / gib > c.device_mem_gib:
        lines.append(f"WARNING          estimate exceeds cluster.device_mem_gib={c.device_mem_gib:g}; consider "
                     "optim.shard=node, a smaller train.micro_batch_size or parallelism=fsdp")
    if c.device_tflops > 0:
        step_s = flops.hardware * tokens / (world * c.device_tflops * 1e12)
        lines.append(f"step time        {step_s:.2f} s at {c.device_tflops:g} TFLOP/s per device (100% utilisation; "
                     f"{step_s / 0.4:.2f} s at 40%); {t.max_steps} steps = {t.max_steps * step_s / 0.4 / 3600:.1f} h "
                     "at 40%")
    try:
        validate_parallel(run_cfg, check_devices=False)
    except ConfigError as exc:
        lines.append(f"PROBLEM          {exc}")
    lines += ["", "sbatch script (save as job.sbatch, submit with `sbatch job.sbatch`):", "",
              sbatch_script(run_cfg, overrides), "",
              "or through Hydra's submitit launcher: python run.py -m " + " ".join(
                  overrides if overrides is not None else _current_overrides())]
    return "\n".join(lines)
