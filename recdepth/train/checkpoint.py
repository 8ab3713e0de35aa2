"""Atomic, resumable checkpoints: one directory per optimizer step, complete only once `COMPLETE` exists.

    <run_dir>/checkpoints/step-<optimizer_step:08d>/
        model.safetensors       clean huginn-0125 keys, fp32 (tied head stored once)
        optim/rank-0.pt         optimizer state (a sharded state is consolidated on rank 0 first)
        data/rank-<r>.json      data-stream position of this rank
        rng/rank-<r>.pt         torch RNG states of this rank
        trainer.json            counters, world size, model shape, data fingerprint, config hash
        config.yaml             the resolved run config
        COMPLETE                written last, after every rank has finished writing

Everything is written to `step-<n>.tmp/` first and renamed by rank 0 after a barrier, so a crash mid-write
leaves the previous checkpoint intact and the partial one invisible to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recdepth.config import ModelConfig
from recdepth.errors import CheckpointError

COMPLETE = "COMPLETE"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_shape(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that must match for a checkpoint's weights to load into a model."""
    d = asdict(cfg)
    return {k: d[k] for k in ("n_embd", "n_heads", "intermediate_size", "vocab_size", "block_size",
                              "n_prelude", "n_core", "n_coda", "qk_bias", "tie_embeddings")}


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the tied head dropped (safetensors stores one name per tensor); contiguous CPU fp32."""
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    config_yaml: str,
) -> Path:
    """Write checkpoint `step` atomically on every rank; returns the final directory."""
    rank, world = fabric.global_rank, fabric.world_size
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an interrupted write
        for sub in ("optim", "data", "rng"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
    fabric.barrier()

    if rank == 0:
        save_file(clean_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        trainer = dict(trainer_state, world_size=world, config_hash=config_hash(config_yaml),
                       model_shape=model_shape(model.cfg))
        _fsync_write(tmp / "trainer.json", json.dumps(trainer, indent=2, sort_keys=True).encode())
        _fsync_write(tmp / "config.yaml", config_yaml.encode())
    # every rank calls state_dict(): Fabric gathers a sharded (ZeRO) state on rank 0 collectively
    optim_state = optimizer.state_dict()
    if rank == 0:
        torch.save(optim_state, tmp / "optim" / "rank-0.pt")
    _fsync_write(tmp / "data" / f"rank-{rank}.json", json.dumps(data_state, sort_keys=True).encode())
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank-{rank}.pt")
    for sub in ("optim", "data", "rng"):
        _fsync_dir(tmp / sub)
    fabric.barrier()

    if rank == 0:
        if final.exists():  # same step saved again (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_write(final / COMPLETE, b"")
        _fsync_dir(final)
        _fsync_dir(Path(root))
    fabric.barrier()
    return final


def prune_checkpoints(root: Path, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep` complete checkpoints (and every `keep_every`-th step)."""
    done = complete_checkpoints(root)
    for path in done[:-keep] if keep > 0 else []:
        step = int(path.name.split("-")[1])
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((path / "trainer.json").read_text())


def check_compatible(path: Path, state: dict[str, Any], cfg: ModelConfig, world_size: int,
                     allow_world_change: bool = False) -> None:
    """Refuse a checkpoint of another model shape (or world size, unless allowed) before anything is loaded
    or written."""
    ours = model_shape(cfg)
    theirs = state.get("model_shape", {})
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {path} was written for a different model shape ({detail})")
    if state.get("world_size") != world_size and not allow_world_change:
        raise CheckpointError(
            f"checkpoint {path} was written with world size {state.get('world_size')}, this run has {world_size}; "
            "resume with the same number of processes, or set data.allow_reshard=true to continue on "
            f"{world_size} with a fresh data order (weights and optimizer state carry over; not an exact resume)"
        )


def load_checkpoint(
    path: Path, *, fabric, model: torch.nn.Module, optimizer: torch.optim.Optimizer, allow_world_change: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights, optimizer and RNG state into this rank; returns (trainer_state, data_state). On another
    world size (when allowed) a rank the checkpoint did not have keeps its seeded RNG and gets no data state."""
    path = Path(path)
    state = read_trainer_state(path)
    check_compatible(path, state, model.cfg, fabric.world_size, allow_world_change)
    rank = fabric.global_rank
    weights = load_file(str(path / "model.safetensors"))
    if getattr(model.cfg, "tie_embeddings", False):
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    model.load_state_dict(weights, strict=True)
    # the full state (a sharded optimizer keeps its own partition of it)
    optimizer.load_state_dict(torch.load(path / "optim" / "rank-0.pt", map_location="cpu", weights_only=True))
    rng_file = path / "rng" / f"rank-{rank}.pt"
    if rng_file.exists() or state.get("world_size") == fabric.world_size:
        torch.set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True)["torch"])
    data_file = path / "data" / f"rank-{rank}.json"
    data_state = json.loads(data_file.read_text()) if data_file.exists() else {}
    return state, data_state
