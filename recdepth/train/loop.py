"""The Trainer: optimizer steps of accumulated micro-batches, logging, depth evaluation, checkpoints.

One optimizer step t (1-based) runs GAS(t) micro-steps; the micro-step counter seeds the depth sampler and
the initial-state noise, so a resumed run replays the same (n, k) draws and the same noise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recdepth.config import RunConfig
from recdepth.errors import DataError, TrainingError
from recdepth.train import checkpoint as ckpt
from recdepth.train.evaluate import depth_table, eval_depths, evaluate, save_depth_curve
from recdepth.train.metrics import (
    Window,
    device_peak_tflops,
    grad_scalars,
    memory_scalars,
    param_scalars,
    window_scalars,
)
from recdepth.train.schedule import apply_lr, lr_at


@dataclass
class TrainerState:
    """Counters that make a run resumable; saved in trainer.json."""

    step: int = 0  # optimizer steps completed
    micro_step: int = 0  # micro-batches consumed (feeds the depth sampler)
    tokens_seen: int = 0  # per rank
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    data_segment: int = 0  # +1 at each resume that re-lays the data out (data.allow_reshard)
    data_segment_step: int = 0  # the optimizer step the current data segment began after

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def accumulation_steps(t: int, cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per rank in optimizer step t, ramped from 1 over train.batch_ramp_steps steps."""
    full = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)
    ramp = cfg.train.batch_ramp_steps
    if ramp > 0 and t <= ramp:
        return max(1, math.ceil(t / ramp * full))
    return full


def _checksum(batches) -> float:
    """Position-weighted sum of the step's input ids: equal iff (almost surely) the same rows in order."""
    total = 0
    for inputs, _ in batches:
        flat = inputs.reshape(-1).long()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.long) % 65521
        total = (total + int((flat.cpu() * weights).sum())) % (2**52)
    return float(total)


def _flops(model_cfg, n: int, k: int, seq_len: int) -> tuple[float, float]:
    from recdepth.model.flops import flops_per_token

    f = flops_per_token(model_cfg, n, k, seq_len)
    return float(f.model), float(f.hardware)


class Trainer:
    def __init__(self, cfg: RunConfig, *, fabric, model, module, optimizer, data, run_dir: Path, config_yaml: str,
                 logger=None, stop_requested: Callable[[], bool] | None = None):
        self.cfg = cfg
        self.fabric = fabric
        self.model = model  # Fabric-wrapped: call this one
        self.module = module  # the plain RecurrentLM: state dicts, counters
        self.optimizer = optimizer
        self.data = data
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.config_yaml = config_yaml
        self.logger = logger
        self.stop_requested = stop_requested or (lambda: False)
        self.state = TrainerState()
        self.depths = eval_depths(cfg.eval, cfg.recurrence)
        self.peak = device_peak_tflops(cfg.train.peak_tflops)
        self.last_eval: dict[int, float] = {}
        self._flop_cache: dict[tuple[int, int, int], tuple[float, float]] = {}
        self._saved_step = -1
        self.last_draw = (0, 0)
        self.last_lr = 0.0

    # ------------------------------------------------------------------------------------ checkpoints

    def restore(self, path: Path) -> None:
        reshard = self.cfg.data.allow_reshard
        trainer_state, data_state = ckpt.load_checkpoint(path, fabric=self.fabric, model=self.module,
                                                         optimizer=self.optimizer, allow_world_change=reshard)
        self.state = TrainerState.from_dict(trainer_state)
        try:
            if trainer_state.get("data_fingerprint") != self.data.fingerprint:
                raise DataError(
                    f"checkpoint {path} was written for data {trainer_state.get('data_fingerprint')!r}, this run "
                    f"reads {self.data.fingerprint!r}; resume with the same data config, start a new run dir, or set "
                    "data.allow_reshard=true to continue with a fresh data order"
                )
            self.data.train.load_state_dict(data_state)
        except DataError as e:
            if not reshard:
                raise
            # every rank reads the same trainer.json and fails the same check, so all agree on the segment
            self.state.data_segment += 1
            self.state.data_segment_step = self.state.step
            self.data.train.start_segment(self.state.data_segment)
            self.fabric.print(f"data.allow_reshard: {e}\n  continuing with data segment {self.state.data_segment}: "
                              "a fresh order of the data from its start (not an exact resume)")
        self._truncate_metrics()
        self.fabric.print(f"resumed from {path} at optimizer step {self.state.step}")

    def save(self) -> Path | None:
        if self._saved_step == self.state.step:
            return None
        self._saved_step = self.state.step
        trainer_state = dict(self.state.to_dict(), data_fingerprint=self.data.fingerprint)
        path = ckpt.save_checkpoint(self.ckpt_root, self.state.step, fabric=self.fabric, model=self.module,
                                    optimizer=self.optimizer, trainer_state=trainer_state,
                                    data_state=self.data.train.state_dict(), config_yaml=self.config_yaml)
        if self.fabric.global_rank == 0:
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every)
        self.fabric.barrier()
        return path

    # ------------------------------------------------------------------------------------------ steps

    def _micro_flops(self, n: int, k: int, seq_len: int) -> tuple[float, float]:
        key = (n, k, seq_len)
        if key not in self._flop_cache:
            self._flop_cache[key] = _flops(self.module.cfg, n, k, seq_len)
        return self._flop_cache[key]

    def _state_generator(self, device: torch.device) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + self.state.micro_step) * 4099 + self.fabric.global_rank
        return torch.Generator(device=device).manual_seed(seed % (2**63 - 1))

    def train_step(self, batches, window: Window, telemetry: bool) -> tuple[float, bool]:
        """One optimizer step over `batches` (one per micro-step). Returns (grad_norm, update_applied)."""
        t = self.state.step + 1
        gas = len(batches)
        self.last_lr = lr_at(t, self.cfg.optim, self.cfg.train.max_steps)
        apply_lr(self.optimizer, self.last_lr)
        finite_loss = True
        for i, (inputs, labels) in enumerate(batches):
            self.state.micro_step += 1
            self.module.step = self.state.micro_step
            last = i == gas - 1
            with self.fabric.no_backward_sync(self.model, enabled=not last):
                out = self.model(inputs, labels=labels, step=self.state.micro_step,
                                 generator=self._state_generator(inputs.device), telemetry=telemetry and last,
                                 return_logits=False)
                self.fabric.backward(out.loss / gas)
            loss = float(out.loss.detach())
            finite_loss &= math.isfinite(loss)
            n, k = int(out.stats["num_steps_no_grad"]), int(out.stats["num_steps_with_grad"])
            self.last_draw = (n, k)
            mf, hf = self._micro_flops(n, k, inputs.shape[1])
            window.add_micro(loss, n, k, mf, hf, inputs.numel())
            if telemetry and last:
                window.telemetry = {k2: v for k2, v in out.stats.items() if not k2.startswith("num_steps")}
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(self.fabric.clip_gradients(self.model, self.optimizer, max_norm=clip, error_if_nonfinite=False))
        if telemetry:
            window.telemetry.update(grad_scalars(self.module))
        applied = finite_loss and math.isfinite(grad_norm)  # else skip the update, count, zero the grads
        if applied:
            self.optimizer.step()
            self.state.nonfinite_in_row = 0
        else:
            self.state.nonfinite_in_row += 1
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = t
        return grad_norm, applied

    # ------------------------------------------------------------------------------------------- loop

    def log(self, scalars: dict[str, float]) -> None:
        """Rank 0 writes to TensorBoard and appends one JSON line per call to metrics.jsonl."""
        if self.fabric.global_rank != 0:
            return
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=self.state.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.state.step, **scalars}) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop metric lines an interrupted segment wrote after the step we resume from."""
        path = self.run_dir / "metrics.jsonl"
        if self.fabric.global_rank != 0 or not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.state.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def run_eval(self) -> dict[int, float]:
        results = evaluate(self.model, self.data.val, self.depths, self.cfg.eval.seed, self.fabric)
        self.last_eval = results
        scalars = {f"val/loss_{d}": v for d, v in results.items()}
        scalars.update({f"val/ppl_{d}": math.exp(min(v, 50.0)) for d, v in results.items()})
        mean = self.cfg.recurrence.mean
        scalars["val/loss"] = results[mean]
        scalars["val/ppl"] = math.exp(min(results[mean], 50.0))
        self.log(scalars)
        if self.fabric.global_rank == 0:
            save_depth_curve(results, self.run_dir / "eval", self.state.step)
        return results

    def fit(self) -> str:
        """Train until max_steps (or a stop request); returns why it stopped: done | preempted | exhausted."""
        cfg, fabric = self.cfg, self.fabric
        T = cfg.train.max_steps
        world = fabric.world_size
        train_iter = iter(self.data.train)
        window = Window()
        bar = None
        if fabric.global_rank == 0 and cfg.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=T, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
        reason = "done"
        try:
            while self.state.step < T:
                t = self.state.step + 1
                log_now = t % cfg.train.log_every == 0 or t == T
                t0 = time.perf_counter()
                try:
                    batches = [next(train_iter) for _ in range(accumulation_steps(t, cfg, world))]
                except StopIteration:
                    reason = "exhausted"
                    break
                grad_norm, applied = self.train_step(batches, window, telemetry=log_now)
                window.seconds += time.perf_counter() - t0
                self._check_lockstep(t)
                self.state.tokens_seen += sum(b[0].numel() for b in batches)
                if log_now:
                    window.checksum = _checksum(batches)
                if bar is not None:
                    bar.update(1)
                    if window.losses:
                        bar.set_postfix(loss=f"{window.losses[-1]:.3f}",
                                        tok_s=f"{window.tokens * world / max(window.seconds, 1e-9):,.0f}")
                if log_now:
                    scalars = window_scalars(window, world_size=world, peak_tflops=self.peak)
                    scalars.update({
                        "data/checksum": window.checksum,
                        "optim/lr": self.last_lr,
                        "optim/grad_norm": grad_norm,
                        "optim/skipped_steps": float(self.state.skipped_steps),
                        "train/tokens_seen": float(self.state.tokens_seen * world),
                        "train/micro_step": float(self.state.micro_step),
                    })
                    scalars.update(param_scalars(self.module))
                    scalars.update(memory_scalars(fabric.device))
                    self._guardrail(scalars.get("train/loss", 0.0))
                    self.log(scalars)
                    window = Window()
                if self.state.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    self.save()
                    raise TrainingError(
                        f"{self.state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                        f"(train.max_nonfinite_in_row={cfg.train.max_nonfinite_in_row}); saved step {self.state.step}"
                    )
                if cfg.eval.every and t % cfg.eval.every == 0 and t < T:
                    self.run_eval()
                    t0 = time.perf_counter()  # evaluation is not training time
                stop = self.stop_requested()
                if stop or (cfg.checkpoint.every and t % cfg.checkpoint.every == 0 and t < T):
                    self.save()
                step_seconds = time.perf_counter() - t0
                self.state.train_seconds += step_seconds
                if stop:
                    reason = "preempted"
                    break
        finally:
            if bar is not None:
                bar.close()
        if reason == "done":
            self.run_eval()
        self.save()
        if self.logger is not None and fabric.global_rank == 0:
            self.logger.finalize("success")
        if reason == "done" and fabric.global_rank == 0:
            fabric.print("\nvalidation loss by recurrence depth (test-time compute):\n" + depth_table(self.last_eval))
        return reason

    def _check_lockstep(self, t: int) -> None:
        """With lockstep on, every rank must have drawn the same (n, k); checked cheaply every few steps."""
        every = self.cfg.parallelism.lockstep_check_every
        if self.fabric.world_size > 1 and self.cfg.recurrence.lockstep and every and (t == 1 or t % every == 0):
            from recdepth.dist.cluster import check_lockstep

            check_lockstep(self.fabric, *self.last_draw)

    def _guardrail(self, loss: float) -> None:
        cfg = self.cfg.train
        tokens = self.state.tokens_seen * self.fabric.world_size
        if cfg.loss_guard_max > 0 and tokens > cfg.loss_guard_tokens and loss > cfg.loss_guard_max:
            self.save()
            raise TrainingError(
                f"loss {loss:.3f} > train.loss_guard_max={cfg.loss_guard_max} after {tokens:,} tokens; saved step "
                f"{self.state.step}"
            )
