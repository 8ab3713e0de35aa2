"""Preemption and time-limit signals: a flag set by handlers, agreed on by all ranks at step boundaries."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

log = logging.getLogger(__name__)

# submitit's warning signal is USR2 (older releases and plain `sbatch --signal` setups use USR1); SLURM sends
# TERM at the time limit and on preemption. All three only set the flag.
PREEMPT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

Handler = Callable[[int, FrameType | None], Any] | int | None


class PreemptionFlag:
    """Signal handlers that only record that a stop was requested; the loop saves at the next step boundary.

    Handlers run between bytecodes of the main thread, possibly inside a collective's Python wrapper, so they
    must not communicate or save. The previous handler of each signal (submitit's requeue handler) is kept so
    `hand_off()` can pass control to it once the checkpoint is complete.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = signals
        self.previous: dict[int, Handler] = {}
        self.received: int | None = None
        self._event = threading.Event()

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must run in the main thread (Python signal rule)")
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            if previous is not self._handle:
                self.previous.setdefault(int(sig), previous)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install()`."""
        for sig, previous in self.previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        self._event.set()

    def set(self) -> None:
        """Request a stop without a signal (e.g. a guardrail)."""
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self.is_set()

    def hand_off(self) -> bool:
        """After the checkpoint: call the handler that was installed before ours for the received signal.

        Under submitit this is its USR2 handler: on global rank 0 it requeues the job and exits; on other ranks it
        only logs. Returns False when there is nothing to call (no signal, or the previous handler was
        SIG_DFL/SIG_IGN), in which case the caller simply returns.
        """
        if self.received is None:
            return False
        previous = self.previous.get(self.received)
        if not callable(previous):
            return False
        log.info("handing signal %s to the previous handler %r", signal.Signals(self.received).name, previous)
        previous(self.received, None)
        return True


def any_rank_flag(fabric: Any, local_flag: bool) -> bool:
    """True on every rank if any rank's flag is set (all-reduce MAX); must be called by all ranks together."""
    if fabric.world_size == 1:
        return bool(local_flag)
    t = torch.tensor(1.0 if local_flag else 0.0, device=fabric.device)
    return bool(fabric.all_reduce(t, reduce_op="max").item() > 0)


def job_end_time(environ: dict[str, str] | None = None) -> float | None:
    """Unix time at which SLURM ends this job (`SLURM_JOB_END_TIME`), or None outside a time-limited job."""
    value = (os.environ if environ is None else environ).get("SLURM_JOB_END_TIME", "")
    try:
        end = float(value)
    except ValueError:
        return None
    return end if end > 0 else None


def seconds_left(environ: dict[str, str] | None = None, now: float | None = None) -> float | None:
    end = job_end_time(environ)
    if end is None:
        return None
    return end - (time.time() if now is None else now)


def time_to_stop(save_before_end_min: float, environ: dict[str, str] | None = None, now: float | None = None) -> bool:
    """True once fewer than `save_before_end_min` minutes remain before the SLURM job's end time."""
    left = seconds_left(environ, now)
    return left is not None and left <= save_before_end_min * 60.0
