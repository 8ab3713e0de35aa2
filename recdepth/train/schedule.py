"""Learning-rate schedule in optimizer steps (warmup, main phase, cooldown) and applying it (spec §3)."""

from __future__ import annotations

import math
from typing import Any

import torch

from recdepth.config import OptimConfig
from recdepth.errors import ConfigError, require


def validate_schedule(cfg: OptimConfig, total_steps: int) -> None:
    """Check the schedule fits the run: warmup and cooldown must not overlap (training spec §15 #8)."""
    require(total_steps >= 1, "train.max_steps", total_steps, "an integer >= 1")
    if cfg.warmup_steps + cfg.cooldown_steps > total_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.warmup_steps} + optim.cooldown_steps={cfg.cooldown_steps} exceeds "
            f"train.max_steps={total_steps}: shorten warmup/cooldown or train longer"
        )


def _main_phase(t: int, cfg: OptimConfig, total_steps: int) -> float:
    """The schedule's shape over (W, T], before cooldown."""
    peak, low, w = cfg.lr, cfg.min_lr, cfg.warmup_steps
    if cfg.schedule in ("constant", "trapezoid"):
        return peak
    rho = min(max((t - w) / (total_steps - w), 0.0), 1.0) if total_steps > w else 1.0
    if cfg.schedule == "linear":
        return peak - rho * (peak - low)
    if cfg.schedule == "cosine":
        return low + 0.5 * (1.0 + math.cos(math.pi * rho)) * (peak - low)
    valid = "one of trapezoid, cosine, linear, constant"
    raise ConfigError(f"optim.schedule={cfg.schedule!r} is invalid: expected {valid}")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR of optimizer step t = `step` (the first update is t = 1) of a run of T = `total_steps` updates.

    Warmup η·t/W for t ≤ W; then the main phase; for t > T − C the main-phase value at T − C times (T − t)/C,
    floored at η_min, so cooldown continues from where cosine/linear are instead of jumping back to the peak.
    Steps past T keep the value at T.
    """
    validate_schedule(cfg, total_steps)
    t = min(max(step, 0), total_steps)
    w, c = cfg.warmup_steps, cfg.cooldown_steps
    if w > 0 and t <= w:
        return cfg.lr * t / w
    if t > total_steps - c:
        start = _main_phase(total_steps - c, cfg, total_steps)
        return max(start * (total_steps - t) / c, cfg.min_lr)
    return _main_phase(t, cfg, total_steps)


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The optimizer and those it wraps (Fabric's `.optimizer`, ZeRO's `.optim`); the innermost updates."""
    found: list[Any] = []
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "param_groups"):
            found.append(optimizer)
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not None else getattr(optimizer, "optim", None)
    return found


def apply_lr(optimizer: Any, lr: float) -> None:
    """Set `group["lr"] = lr * group["base_lr"]` on every group of the optimizer and of every one it wraps.

    Setting only a wrapper's groups left the updating optimizer at a stale LR in the reference (spec §15 #1).
    """
    targets = _optimizers(optimizer)
    if not targets:
        raise TypeError(f"{type(optimizer).__name__} has no param_groups to set the learning rate on")
    for opt in targets:
        for i, group in enumerate(opt.param_groups):
            if "base_lr" not in group:
                name = group.get("name", "unnamed")
                raise KeyError(
                    f"param group {i} ({name}) of {type(opt).__name__} has no 'base_lr'; "
                    "build groups with recdepth.train.optim.param_groups"
                )
            group["lr"] = lr * group["base_lr"]
