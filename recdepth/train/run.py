"""Wiring of the main job: validate the config, build Fabric, model, data and optimizer, then train.

Everything that can be wrong with the input is checked here, before a process group starts or a file is
written, and reported as one line naming the field.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from recdepth.config import RunConfig
from recdepth.errors import CheckpointError, ConfigError, RecdepthError
from recdepth.train import checkpoint as ckpt


def validate(dcfg: DictConfig) -> RunConfig:
    """The composed config as dataclasses (range checks run here) plus the checks that span sections."""
    try:
        cfg: RunConfig = OmegaConf.to_object(dcfg)
    except RecdepthError:
        raise
    except Exception as exc:  # OmegaConf wraps errors raised in __post_init__
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, RecdepthError):
            raise cause from None
        raise ConfigError(str(exc).splitlines()[0]) from None
    from recdepth.dist.cluster import needs_dry_run, validate_parallel
    from recdepth.train.schedule import validate_schedule

    validate_parallel(cfg)
    if cfg.parallelism.name == "fsdp" and not (torch.cuda.is_available() or cfg.dry_run or needs_dry_run(cfg)):
        raise ConfigError("parallelism=fsdp needs GPUs (torch FSDP has no CPU backend); "
                          "on CPU use parallelism=ddp or chunked_ddp")
    if cfg.optim.shard != "none" and cfg.parallelism.name not in ("ddp", "chunked_ddp"):
        raise ConfigError(f"optim.shard={cfg.optim.shard!r} needs parallelism=ddp or chunked_ddp "
                          f"(parallelism={cfg.parallelism.name}); fsdp shards optimizer state by itself")
    validate_schedule(cfg.optim, cfg.train.max_steps)
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume!r} is invalid: expected auto, never or an existing checkpoint dir")
    return cfg


def run_dir_of(cfg: RunConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def resume_path(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start."""
    if cfg.resume == "never":
        if ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
            raise CheckpointError(
                f"{run_dir / 'checkpoints'} already holds checkpoints and resume=never; use resume=auto to continue "
                "or another out_dir, so nothing is overwritten"
            )
        return None
    path = ckpt.latest_checkpoint(run_dir / "checkpoints") if cfg.resume == "auto" else Path(cfg.resume)
    if path is not None:  # refuse another shape or world size before anything is written
        ckpt.check_compatible(path, ckpt.read_trainer_state(path), cfg.model, cfg.cluster.devices * cfg.cluster.num_nodes,
                              allow_world_change=cfg.data.allow_reshard)
    return path


def main(dcfg: DictConfig) -> None:
    """Entry point of run.py: errors in the input end the job with one line and a non-zero exit."""
    from torch.multiprocessing import ProcessRaisedException

    try:
        train(dcfg)
    except RecdepthError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ProcessRaisedException as exc:  # a spawned rank failed; its traceback is in the message
        last = [line for line in str(exc).splitlines() if line.strip()][-1]
        if not last.startswith("recdepth.errors."):
            raise
        print(f"error (rank {exc.error_index}): {last.split(': ', 1)[-1]}", file=sys.stderr, flush=True)
        sys.exit(2)


def train(dcfg: DictConfig) -> str:
    cfg = validate(dcfg)
    from recdepth.dist.cluster import build_fabric, dry_run_plan, needs_dry_run

    if cfg.dry_run or needs_dry_run(cfg):
        print(dry_run_plan(cfg))
        return "planned"
    run_dir = run_dir_of(cfg)
    start = resume_path(cfg, run_dir)
    config_yaml = OmegaConf.to_yaml(dcfg, resolve=True)
    # the data is prepared once here (e.g. the sample corpus), before any worker process starts
    from recdepth.data import prepare_data

    prepare_data(cfg.data, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size)
    fabric = build_fabric(cfg.cluster, cfg.parallelism, cfg.train.precision, loggers=None)
    return fabric.launch(_train_process, cfg, run_dir, start, config_yaml)


def _shard_group(cfg: RunConfig, fabric):
    """The process group over which optimizer state is partitioned (optim.shard), or None."""
    if cfg.optim.shard == "none" or fabric.world_size == 1:
        return None
    if cfg.optim.shard == "world":
        return torch.distributed.group.WORLD
    group, _ = torch.distributed.new_subgroups(group_size=cfg.cluster.devices)  # this node's ranks
    return group


def _train_process(fabric, cfg: RunConfig, run_dir: Path, start: Path | None, config_yaml: str) -> str:
    from lightning_fabric.loggers import TensorBoardLogger

    from recdepth.data import build_data
    from recdepth.dist.cluster import warmup_collectives
    from recdepth.dist.signals import PreemptionFlag, any_rank_flag, time_to_stop
    from recdepth.model import RecurrentLM
    from recdepth.train.loop import Trainer
    from recdepth.train.optim import build_optimizer

    if fabric.world_size > 1:
        warmup_collectives(fabric, cfg.parallelism.warmup_mib, cfg.parallelism.timeout_s)
    data = build_data(cfg.data, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size,
                      micro_batch_size=cfg.train.micro_batch_size, rank=fabric.global_rank,
                      world_size=fabric.world_size, n_val_batches=cfg.eval.batches, seed=cfg.data.seed)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{data.vocab_size} ids; expected model.vocab_size >= {data.vocab_size}")
    with torch.device("cpu"):
        module = RecurrentLM(cfg.model, cfg.recurrence)
        module.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    module.rank = fabric.global_rank
    if cfg.train.compile:
        module.compile_blocks()
    optimizer = build_optimizer(module, cfg.optim, shard_group=_shard_group(cfg, fabric))
    model, optimizer = fabric.setup(module, optimizer)

    preempt = PreemptionFlag()
    preempt.install()

    def stop_requested() -> bool:
        local = preempt.is_set() or time_to_stop(cfg.cluster.save_before_end_min)
        return any_rank_flag(fabric, local)

    trainer = Trainer(cfg, fabric=fabric, model=model, module=module, optimizer=optimizer, data=data,
                      run_dir=run_dir, config_yaml=config_yaml, stop_requested=stop_requested)
    if start is not None:
        trainer.restore(start)
    if fabric.global_rank == 0:
        # version "" keeps one event dir per run dir; purge_step hides events of an interrupted segment
        resumed = trainer.state.step
        trainer.logger = TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="",
                                           default_hp_metric=False, purge_step=resumed + 1 if resumed else None)
        trainer.logger.log_hyperparams(OmegaConf.to_container(OmegaConf.create(config_yaml)))
        fabric.print(f"run dir: {run_dir}  |  {module.num_params():,} parameters  |  "
                     f"tensorboard --logdir {run_dir / 'tensorboard'}")
    reason = trainer.fit()
    if torch.distributed.is_initialized():
        # an orderly teardown: communicator threads alive at interpreter exit can abort the process
        fabric.barrier()
        torch.distributed.destroy_process_group()
    if reason == "preempted":
        preempt.hand_off()
    return reason
