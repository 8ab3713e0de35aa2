"""Depth sampler: how many no-grad (n) and grad (k) core iterations a micro-step runs.

Every draw comes from two fresh CPU generators seeded from the micro-step (and the rank unless lockstep),
exactly as huginn-0125 did, so a draw replays on resume, inside activation-checkpoint recompute and on
every rank. The global RNG is never touched.
"""

from __future__ import annotations

import math

import torch

from recdepth.config import RecurrenceConfig

SEED_N = 514229  # Fibonacci F29
SEED_K = 317811  # Fibonacci F28
_MOD = 2**31 - 1


def _randint(low: int, high_inclusive: int, gen: torch.Generator) -> int:
    """U{low..high} inclusive; degenerate ranges collapse to `low`."""
    if high_inclusive <= low:
        return int(low)
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=gen).item())


def _poisson(lam: float, gen: torch.Generator) -> int:
    return int(torch.poisson(torch.tensor([float(lam)]), generator=gen).item())


class DepthSampler:
    """`draw(step, rank) -> (n, k)`, a pure function of (step, rank if not lockstep, config)."""

    def __init__(self, cfg: RecurrenceConfig):
        self.cfg = cfg

    def base(self, step: int) -> tuple[int, int]:
        """(t, s) = (mean no-grad depth, mean grad depth), ramped by the curriculum if one is set."""
        mean, bptt = self.cfg.mean, self.cfg.backprop_depth
        t, s = max(mean - bptt, 0), bptt
        R = self.cfg.curriculum_steps
        if R > 0 and step <= R:
            slope = step / R
            t = max(math.ceil(slope * (mean - bptt)), 0)
            s = max(math.ceil(slope * bptt), 1)
        return t, s

    def generators(self, step: int, rank: int = 0) -> tuple[torch.Generator, torch.Generator]:
        seed_n = SEED_N + self.cfg.seed + step
        seed_k = SEED_K + self.cfg.seed + step
        if not self.cfg.lockstep:
            seed_n, seed_k = seed_n * (rank + 1), seed_k * (rank + 1)
        g_n = torch.Generator(device="cpu").manual_seed(seed_n % _MOD)
        g_k = torch.Generator(device="cpu").manual_seed(seed_k % _MOD)
        return g_n, g_k

    def draw(self, step: int, rank: int = 0) -> tuple[int, int]:
        scheme = self.cfg.scheme
        t, s = self.base(step)
        if scheme == "fixed":
            return t, s
        if scheme == "non-recurrent":
            return 0, 1
        g_n, g_k = self.generators(step, rank)
        if scheme == "poisson-lognormal-filling":
            sigma = 0.5
            mu = math.log(t + s) - sigma**2 / 2
            lam = torch.empty(1).log_normal_(mu, sigma, generator=g_n)
            p = torch.poisson(lam, generator=g_n) + 1
            n = torch.clamp(p - s, min=0).to(torch.long)
            k = torch.minimum(torch.as_tensor(s, dtype=p.dtype), p).to(torch.long)
            return int(n.item()), int(k.item())
        if scheme in ("poisson-lognormal-fill", "poisson-lognormal"):
            sigma = 0.5
            mu = math.log(max(t, 1)) - sigma**2 / 2
            lam = torch.empty(1).log_normal_(mu, sigma, generator=g_n)
            n = int(torch.poisson(lam, generator=g_n).item())
            k = s if scheme == "poisson-lognormal-fill" else _randint(1, 2 * s, g_k)
            return n, k
        if scheme == "poisson-unbounded":
            return _poisson(t, g_n), _randint(1, 2 * s, g_k)
        if scheme == "poisson-fill":
            return _poisson(t, g_n), s
        if scheme == "poisson-bounded":
            return min(_poisson(t, g_n), max(2 * t - 1, 0)), _randint(1, 2 * s, g_k)
        if scheme == "bptt":
            n = _randint(0, 2 * t - 1, g_n)
            return n, _randint(1, min(2 * t - n, 2 * s), g_k)
        if scheme == "non-uniform":
            k = _randint(1, 2 * min(t, s), g_k)
            return max(_randint(0, 2 * t - 1, g_n) - k, 0), k
        if scheme == "simple":
            return _randint(0, 2 * t - 1, g_n), _randint(1, 2 * s, g_k)
        if scheme == "gupta":
            n = _randint(0, 2 * t - 1, g_n)
            a = float(torch.rand(1, generator=g_k).item())
            q = _randint(2 * t, 8 * t - 1, g_k)
            # the reference returns a float k; iterations are whole, so round down (at least 1)
            return n, max(int(1 + (t - n) * a**q), 1)
        if scheme == "sobol":
            seed_n = (SEED_N + self.cfg.seed + step) * (1 if self.cfg.lockstep else rank + 1)
            engine = torch.quasirandom.SobolEngine(2, scramble=True, seed=seed_n % _MOD)
            a, b = engine.draw(1)[0].tolist()
            return int(a * 2 * t), int(b * 2 * s + 1)
        if scheme == "geometric":
            p = 1.0 / max(t, 1)
            u = float(torch.rand(1, generator=g_n).item())
            n = 1 if p >= 1 else max(1, math.ceil(math.log1p(-u) / math.log1p(-p)))
            return n, _randint(1, 2 * s, g_k)
        if scheme == "full":
            return 0, _randint(1, 2 * s, g_k)
        raise AssertionError(f"scheme {scheme!r} passed validation but has no sampler")  # pragma: no cover

    def eval_steps(self) -> tuple[int, int]:
        """Eval mode runs the mean depth without gradients."""
        return self.cfg.mean, 0
