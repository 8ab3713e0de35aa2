"""Cluster configs, pre-flight validation, dry-run plans and signal flags (no process group needed)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import recdepth.config  # noqa: F401  (registers run_schema)
from recdepth.config import ClusterConfig, ParallelismConfig, RunConfig
from recdepth.dist.cluster import (
    build_fabric,
    dry_run_plan,
    frontier_max_minutes,
    memory_per_device,
    needs_dry_run,
    validate_parallel,
)
from recdepth.dist.signals import PreemptionFlag, time_to_stop
from recdepth.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"

# The group order conf/train.yaml needs for cluster presets: parallelism before cluster (a preset overrides
# it), and `_self_` before cluster (so a preset's train.precision/batch sizes beat the primary's values).
ConfigStore.instance().store(
    name="_cluster_test_primary",
    node={
        "defaults": ["run_schema", {"model": "raven_tiny"}, {"recurrence": "huginn"}, {"parallelism": "single"},
                     {"optim": "adamw"}, "_self_", {"cluster": "local"}],
        "train": {"precision": "32-true", "global_batch_size": 16, "micro_batch_size": 8},
    },
)


def _compose(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("_cluster_test_primary", overrides=overrides, return_hydra_config=hydra_cfg)


def _run_cfg(overrides: list[str]) -> RunConfig:
    return OmegaConf.to_object(_compose(overrides))


@pytest.fixture
def no_slurm(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(key)


# ------------------------------------------------------------------------------------------ composition


def test_frontier_preset_sets_other_groups_and_cli_wins():
    cfg = _compose(["model=raven_3p5b", "cluster=frontier"], hydra_cfg=True)
    assert cfg.cluster.name == "frontier" and cfg.cluster.devices == 8
    assert cfg.parallelism.name == "chunked_ddp"
    assert cfg.train.precision == "bf16-mixed" and cfg.train.micro_batch_size == 1
    assert cfg.cluster.env.NCCL_SOCKET_IFNAME == "hsn" and cfg.cluster.env.FI_CXI_ATS == "0"
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (512, 8, 8)
    assert launcher["timeout_min"] == 720 and launcher["signal_delay_s"] == 600
    assert any("module load" in line for line in launcher["setup"])
    # an explicit choice on the command line beats the preset's defaults-list override
    cfg = _compose(["cluster=frontier", "parallelism=ddp", "train.precision=32-true"])
    assert cfg.parallelism.name == "ddp" and cfg.train.precision == "32-true"


def test_local_and_slurm_presets_compose():
    cfg = _compose([], hydra_cfg=True)
    assert cfg.cluster.name == "local" and cfg.parallelism.name == "single"
    assert "BasicLauncher" in cfg.hydra.launcher._target_
    cfg = _compose(["cluster=slurm", "cluster.partition=gpu", "cluster.num_nodes=2"], hydra_cfg=True)
    assert cfg.parallelism.name == "ddp"
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["partition"] == "gpu" and launcher["nodes"] == 2
    for name in ("single", "ddp", "chunked_ddp", "fsdp"):
        assert _compose([f"parallelism={name}"]).parallelism.name == name


def test_unknown_cluster_key_is_rejected():
    with pytest.raises(Exception, match="not_a_field"):
        _compose(["cluster.not_a_field=1"])  # a typo in a cluster key fails at composition


# ------------------------------------------------------------------------------------------- validation


def test_bad_input_raises_config_error_before_any_process_group(no_slurm):
    cfg = _run_cfg(["cluster.devices=2", "parallelism=ddp", "train.global_batch_size=20",
                    "train.micro_batch_size=4", "cluster.accelerator=cpu"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=20 .* 2 x 4 = 8"):
        validate_parallel(cfg)
    cfg = _run_cfg(["cluster.devices=100000", "parallelism=ddp", "cluster.accelerator=cpu"])
    with pytest.raises(ConfigError, match=r"cluster.devices=100000 .* CPU processes"):
        validate_parallel(cfg)
    cfg = _run_cfg(["cluster.devices=2", "cluster.accelerator=cpu"])
    with pytest.raises(ConfigError, match="parallelism=single"):
        validate_parallel(cfg)
    cfg = _run_cfg(["cluster=slurm"])
    with pytest.raises(ConfigError, match="cluster=slurm needs cluster.partition or cluster.account") as info:
        validate_parallel(cfg)
    assert "\n" not in str(info.value)
    cfg = _run_cfg(["cluster=frontier", "cluster.num_nodes=16"])
    with pytest.raises(ConfigError, match=r"cluster.time_min=720 .* <= 120"):
        validate_parallel(cfg)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="GPUs visible"):
            build_fabric(ClusterConfig(accelerator="gpu", devices=2), ParallelismConfig(name="ddp"), "32-true")
    assert not torch.distributed.is_initialized()


def test_valid_layouts_pass(no_slurm):
    validate_parallel(_run_cfg(["cluster.devices=2", "cluster.accelerator=cpu", "parallelism=chunked_ddp"]))
    validate_parallel(_run_cfg(["cluster=slurm", "cluster.account=proj"]), check_devices=False)
    assert frontier_max_minutes(92) == 120 and frontier_max_minutes(93) == 360 and frontier_max_minutes(185) == 720


def test_build_fabric_picks_strategy(no_slurm):
    from lightning_fabric.strategies import DDPStrategy, SingleDeviceStrategy

    from recdepth.dist.strategy import ChunkedDDPStrategy

    cpu2 = ClusterConfig(accelerator="cpu", devices=2)
    fabric = build_fabric(cpu2, ParallelismConfig(name="chunked_ddp", chunk_mib=1.0), "32-true")
    assert isinstance(fabric.strategy, ChunkedDDPStrategy) and fabric.strategy.chunk_numel == 2**18
    assert fabric.strategy._start_method == "spawn"  # never re-executes sys.argv
    fabric = build_fabric(cpu2, ParallelismConfig(name="ddp"), "32-true")
    assert type(fabric.strategy) is DDPStrategy and fabric.strategy._start_method == "spawn"
    fabric = build_fabric(ClusterConfig(accelerator="cpu"), ParallelismConfig(name="single"), "32-true")
    assert isinstance(fabric.strategy, SingleDeviceStrategy)


# ---------------------------------------------------------------------------------------------- dry run


def test_dry_run_plan_for_raven_3p5b_on_frontier(no_slurm):
    cfg = _run_cfg(["model=raven_3p5b", "cluster=frontier"])
    assert needs_dry_run(cfg)
    validate_parallel(cfg)  # no devices are counted for a plan
    plan = dry_run_plan(cfg, overrides=["model=raven_3p5b", "cluster=frontier"])
    assert "3,564,976,800 parameters" in plan
    assert "512 nodes x 8 devices = 4096 ranks, parallelism=chunked_ddp (64 MiB messages)" in plan
    assert "tokens per step  16,777,216" in plan
    for line in ("#SBATCH --account=csc569", "#SBATCH --nodes=512", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00", "#SBATCH --constraint=nvme",
                 "#SBATCH --signal=USR2@600", "export NCCL_SOCKET_IFNAME=hsn", "export FI_CXI_ATS=0",
                 "srun --unbuffered -l --kill-on-bad-exit=1 -N 512 -n 4096 -c 7 --ntasks-per-node=8 "
                 "--gpus-per-node=8 python -u run.py model=raven_3p5b cluster=frontier out_dir=runs/"):
        assert line in plan, line
    assert "step time" in plan and "PROBLEM" not in plan
    mem = memory_per_device(cfg)
    assert mem["weights"] == 3_564_976_800 * 4 and mem["optimizer"] == 2 * mem["weights"]


def test_dry_run_reports_problems_instead_of_crashing(no_slurm, monkeypatch):
    cfg = _run_cfg(["cluster=frontier", "train.global_batch_size=100"])
    plan = dry_run_plan(cfg, overrides=[])
    assert "PROBLEM" in plan and "train.global_batch_size=100" in plan
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert not needs_dry_run(cfg)


# ----------------------------------------------------------------------------------------------- signals


def test_preemption_flag_hands_off_to_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        flag = PreemptionFlag().install()
        assert not flag.is_set() and not flag.hand_off()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.is_set() and flag.received == signal.SIGUSR2
        assert calls == []  # the handler itself only sets the flag
        assert flag.hand_off() and calls == [signal.SIGUSR2]
        flag.uninstall()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_time_to_stop_uses_slurm_job_end_time():
    assert not time_to_stop(5.0, environ={})
    assert not time_to_stop(5.0, environ={"SLURM_JOB_END_TIME": "1000"}, now=1000 - 301)
    assert time_to_stop(5.0, environ={"SLURM_JOB_END_TIME": "1000"}, now=1000 - 299)
    assert not time_to_stop(5.0, environ={"SLURM_JOB_END_TIME": "garbage"}, now=0)
