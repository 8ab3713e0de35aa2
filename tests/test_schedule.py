"""LR schedule values at hand-computed points, validation, and apply_lr reaching every group."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from recdepth.config import ModelConfig, OptimConfig
from recdepth.errors import ConfigError
from recdepth.model import RecurrentLM
from recdepth.train.optim import build_optimizer
from recdepth.train.schedule import apply_lr, lr_at, validate_schedule

PEAK, LOW = 1e-3, 1e-4


def cfg(schedule: str, warmup: int = 10, cooldown: int = 20, min_lr: float = LOW, **kw) -> OptimConfig:
    return OptimConfig(
        lr=PEAK, min_lr=min_lr, schedule=schedule, warmup_steps=warmup, cooldown_steps=cooldown, **kw
    )


@pytest.mark.parametrize("schedule", ["trapezoid", "constant", "linear", "cosine"])
def test_warmup_counts_optimizer_steps_from_one(schedule):
    c = cfg(schedule)
    assert lr_at(1, c, 100) == pytest.approx(PEAK / 10)
    assert lr_at(4, c, 100) == pytest.approx(PEAK * 4 / 10)
    assert lr_at(10, c, 100) == pytest.approx(PEAK)


def test_trapezoid_plateau_and_cooldown():
    c = cfg("trapezoid")  # T=100, W=10, C=20: flat on 11..80, cooldown on 81..100
    assert lr_at(11, c, 100) == pytest.approx(PEAK)
    assert lr_at(50, c, 100) == pytest.approx(PEAK)
    assert lr_at(80, c, 100) == pytest.approx(PEAK)
    assert lr_at(81, c, 100) == pytest.approx(PEAK * 19 / 20)
    assert lr_at(90, c, 100) == pytest.approx(PEAK * 10 / 20)
    assert lr_at(98, c, 100) == pytest.approx(LOW)  # 1e-3 · 2/20 = 1e-4: exactly the floor
    assert lr_at(99, c, 100) == pytest.approx(LOW)  # 5e-5 floored at min_lr
    assert lr_at(100, c, 100) == pytest.approx(LOW)
    assert lr_at(100, cfg("trapezoid", min_lr=0.0), 100) == 0.0
    assert lr_at(250, c, 100) == pytest.approx(LOW)  # past the end: the value at T


def test_linear_main_phase_and_cooldown_without_jump():
    c = cfg("linear")  # ρ = (t − 10) / 90
    assert lr_at(55, c, 100) == pytest.approx(PEAK - 0.5 * (PEAK - LOW))
    at_start = PEAK - (70 / 90) * (PEAK - LOW)  # main-phase value at T − C = 80
    assert lr_at(80, c, 100) == pytest.approx(at_start)
    assert lr_at(81, c, 100) == pytest.approx(at_start * 19 / 20)
    assert lr_at(90, c, 100) == pytest.approx(max(at_start * 10 / 20, LOW))
    assert lr_at(100, c, 100) == pytest.approx(LOW)


def test_cosine_main_phase_and_cooldown_without_jump():
    c = cfg("cosine", warmup=10, cooldown=0)
    assert lr_at(60, c, 110) == pytest.approx((PEAK + LOW) / 2)  # ρ = ½
    assert lr_at(110, c, 110) == pytest.approx(LOW)
    c = cfg("cosine")
    at_start = LOW + 0.5 * (1 + math.cos(math.pi * 70 / 90)) * (PEAK - LOW)
    assert lr_at(80, c, 100) == pytest.approx(at_start)
    assert lr_at(81, c, 100) == pytest.approx(max(at_start * 19 / 20, LOW))
    assert lr_at(100, c, 100) == pytest.approx(LOW)


@pytest.mark.parametrize("schedule", ["trapezoid", "constant", "linear", "cosine"])
def test_never_increases_after_warmup_and_never_below_floor(schedule):
    c = cfg(schedule, warmup=7, cooldown=13)
    values = [lr_at(t, c, 60) for t in range(7, 61)]
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(values))
    assert min(values) >= LOW - 1e-15
    # the cooldown continues from the main phase: its first step is at most one cooldown slice lower
    assert lr_at(48, c, 60) - lr_at(47, c, 60) <= 0
    assert lr_at(47, c, 60) - lr_at(48, c, 60) <= lr_at(47, c, 60) / 13 + 1e-15


def test_no_warmup_and_no_cooldown_edges():
    c = cfg("linear", warmup=0, cooldown=0)
    assert lr_at(1, c, 10) == pytest.approx(PEAK - 0.1 * (PEAK - LOW))
    assert lr_at(10, c, 10) == pytest.approx(LOW)
    full = cfg("trapezoid", warmup=4, cooldown=6)  # W + C = T: straight from warmup into cooldown
    assert [lr_at(t, full, 10) for t in (4, 5, 7, 10)] == pytest.approx([PEAK, PEAK * 5 / 6, PEAK / 2, LOW])


def test_warmup_plus_cooldown_longer_than_run_is_rejected():
    c = OptimConfig(warmup_steps=500, cooldown_steps=20)
    with pytest.raises(ConfigError) as err:
        validate_schedule(c, 300)
    for part in ("optim.warmup_steps=500", "optim.cooldown_steps=20", "train.max_steps=300"):
        assert part in str(err.value)
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps"):
        lr_at(1, c, 300)
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        validate_schedule(OptimConfig(warmup_steps=0, cooldown_steps=0), 0)
    with pytest.raises(ConfigError, match=r"optim\.cooldown_steps=20"):
        validate_schedule(OptimConfig(warmup_steps=290, cooldown_steps=20), 300)  # each fits, not both
    validate_schedule(OptimConfig(warmup_steps=280, cooldown_steps=20), 300)


def test_negative_lr_is_rejected():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        OptimConfig(lr=-1e-3)
    with pytest.raises(ConfigError, match=r"optim\.min_lr"):
        OptimConfig(lr=1e-3, min_lr=-1.0)


# --------------------------------------------------------------------------------------------- apply_lr


def tiny_model() -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(
        ModelConfig(n_embd=32, n_heads=2, intermediate_size=64, vocab_size=64, block_size=16,
                    n_prelude=1, n_core=1, n_coda=1)
    )


@pytest.mark.parametrize("name", ["adamw", "ellis_adam"])
def test_apply_lr_reaches_every_group_and_the_update(name):
    model = tiny_model()
    c = OptimConfig(name=name, lr=1e-2, weight_decay=0.0, eps=1e-12, atan_adam=name == "ellis_adam")
    opt = build_optimizer(model, c)
    opt.param_groups[0]["base_lr"] = 0.5  # a μP-style multiplier on the weights
    apply_lr(opt, 4e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 4e-3, 4e-3]

    before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    # first step from zero moments: m = 0.1·g, v̂ = g², so |Δp| = lr (Adam) or lr·atan(0.1)/0.1 (atan2)
    per_unit = 1.0 if name == "adamw" else math.atan(0.1) / 0.1
    for g, olds in zip(opt.param_groups, before, strict=True):
        for p, old in zip(g["params"], olds, strict=True):
            torch.testing.assert_close((p.detach() - old).abs(), torch.full_like(p, g["lr"] * per_unit))


def test_apply_lr_after_resume_overrides_checkpointed_lr():
    model = tiny_model()
    c = cfg("trapezoid", name="adamw")
    opt = build_optimizer(model, c)
    apply_lr(opt, 1e-5)
    saved = opt.state_dict()
    resumed = build_optimizer(model, c)
    resumed.load_state_dict(saved)
    assert all(g["lr"] == 1e-5 for g in resumed.param_groups)  # the stale value comes back with the state
    apply_lr(resumed, lr_at(50, c, 100))
    assert all(g["lr"] == pytest.approx(PEAK * g["base_lr"]) for g in resumed.param_groups)


def test_schedule_drives_all_groups_over_a_run():
    model = tiny_model()
    c = cfg("cosine", warmup=3, cooldown=4, name="ellis_adam")
    opt = build_optimizer(model, c)
    for t in range(1, 21):
        lr = lr_at(t, c, 20)
        apply_lr(opt, lr)
        assert all(g["lr"] == lr * g["base_lr"] for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(LOW)


def test_apply_lr_requires_base_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(KeyError, match="base_lr"):
        apply_lr(opt, 0.01)
