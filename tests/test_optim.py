"""Parameter groups, ELLISAdam (closed form and every option), the builder and state-dict round trips."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from recdepth.config import ModelConfig, OptimConfig, to_dataclass
from recdepth.errors import ConfigError
from recdepth.model import RecurrentLM
from recdepth.train.optim import ELLISAdam, build_optimizer, param_groups

CONF = Path(__file__).resolve().parents[1] / "conf" / "optim"
PRODUCTION = {"atan_adam": True, "update_clipping": True, "running_init": True, "decouple_wd": True}


def tiny_model() -> RecurrentLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_embd=32, n_heads=2, intermediate_size=64, vocab_size=64, block_size=16,
        n_prelude=1, n_core=1, n_coda=1,
    )
    return RecurrentLM(cfg)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------ param groups


def test_param_groups_nebel_shape_on_meta():
    cfg = ModelConfig(
        name="raven_3p5b", n_embd=5280, n_heads=55, intermediate_size=17920, vocab_size=65536, block_size=4096
    )
    with torch.device("meta"):
        model = RecurrentLM(cfg)
    ocfg = OptimConfig(weight_decay=4e-5, no_wd_for_bias_and_norm=True)
    groups = param_groups(model, ocfg)
    assert [g["name"] for g in groups] == ["weights", "embedding", "scale_and_norm"]
    assert [len(g["params"]) for g in groups] == [33, 1, 41]
    assert [g["weight_decay"] for g in groups] == [4e-5, 4e-5, 0.0]
    assert all(g["base_lr"] == 1.0 for g in groups)
    # every trainable tensor exactly once; the tied embedding is the only member of its group
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert groups[1]["params"][0] is model.get_parameter("transformer.wte.weight")
    names = {id(p): n for n, p in model.named_parameters()}
    assert "transformer.adapter.weight" in {names[id(p)] for p in groups[0]["params"]}
    assert all(any(k in names[id(p)] for k in ("qk_bias", "norm", "ln_f")) for p in groups[2]["params"])

    keep_cfg = OptimConfig(weight_decay=0.1, no_wd_for_bias_and_norm=False, no_wd_on_embedding=True)
    keep = param_groups(model, keep_cfg)
    assert [g["weight_decay"] for g in keep] == [0.1, 0.0, 0.1]


def test_param_groups_reject_unmatched_parameter():
    model = nn.Module()
    model.register_parameter("gain", nn.Parameter(torch.ones(4)))
    with pytest.raises(ConfigError, match="gain"):
        param_groups(model, OptimConfig())


def test_param_groups_skip_frozen_and_keep_all_groups():
    model = tiny_model()
    model.transformer.wte.weight.requires_grad_(False)
    groups = param_groups(model, OptimConfig())
    assert [g["name"] for g in groups] == ["weights", "embedding", "scale_and_norm"]
    assert groups[1]["params"] == []


# ------------------------------------------------------------------------------------ production closed form


def closed_form_run(p0, grads, lrs, init_lr, wd, betas, eps):
    """The spec's production update, written out with plain float64 tensor ops."""
    b1, b2 = betas
    p = p0.double().clone()
    m = v = None
    trace = {"clipped": False, "floored": False}
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = g.double()
        if m is None:  # running init
            m, v = g.clone(), g * g
        m = b1 * m + (1 - b1) * g
        raw = b2 * v + (1 - b2) * g * g
        v = torch.maximum(raw, torch.full_like(raw, eps * eps))
        trace["floored"] |= bool((raw < eps * eps).any())
        rms = torch.sqrt(torch.mean(g * g / v)).item()
        trace["clipped"] |= rms > 1
        a = lr / max(rms, 1.0) / (1 - b1**t)
        p = p * (1 - (lr / init_lr) * wd) - a * torch.atan2(m, torch.sqrt(v / (1 - b2**t)))
    return p, trace


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_production_flags_match_closed_form(dtype):
    gen = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    grad_scale = [1.0, 1e-7, 3.0]  # the tiny one exercises the ε² floor on v
    wds = [0.1, 0.0, 0.03]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    p0 = [p.detach().clone() for p in params]
    init_lr, betas, eps = 1e-2, (0.9, 0.95), 1e-6
    lrs = [2e-3, 1e-2, 7e-3, 4e-3, 1e-3]
    opt = ELLISAdam(
        [{"params": [p], "weight_decay": wd} for p, wd in zip(params, wds, strict=True)],
        lr=init_lr, init_lr=init_lr, betas=betas, eps=eps, **PRODUCTION,
    )
    grads = [[] for _ in params]
    for step, lr in enumerate(lrs):
        for i, p in enumerate(params):
            # growing gradients at step 2 and 4 push √mean(g²/v) above 1 (update clipping active)
            growth = 4.0 if step in (2, 4) else 1.0
            g = torch.randn(p.shape, generator=gen, dtype=dtype) * grad_scale[i] * growth
            grads[i].append(g)
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    rtol = 1e-6 if dtype == torch.float32 else 1e-10
    clipped = floored = False
    for i, p in enumerate(params):
        want, trace = closed_form_run(p0[i], grads[i], lrs, init_lr, wds[i], betas, eps)
        clipped |= trace["clipped"]
        floored |= trace["floored"]
        torch.testing.assert_close(p.detach().double(), want, rtol=rtol, atol=0)
        if dtype == torch.float64:  # also the accumulated update itself, not only p
            torch.testing.assert_close(p.detach() - p0[i], want - p0[i], rtol=1e-8, atol=0)
    assert clipped and floored  # the test covered both non-trivial branches of the closed form
    assert all(int(opt.state[p]["step"]) == len(lrs) for p in params)


def first_update(grad: torch.Tensor, lr: float, **flags) -> torch.Tensor:
    p = nn.Parameter(torch.zeros_like(grad))
    opt = ELLISAdam([p], lr=lr, init_lr=lr, betas=(0.9, 0.95), weight_decay=0.0, **flags)
    p.grad = grad.clone()
    opt.step()
    return p.detach().clone()


def test_first_update_with_running_init_is_2p2_eta():
    lr = 1e-3
    g = torch.randn(4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = g / g.pow(2).mean().sqrt()  # rms 1
    step = first_update(g, lr, **PRODUCTION)
    expect = 10 * lr * math.atan(math.sqrt(0.05))
    torch.testing.assert_close(step, -torch.sign(g) * expect, rtol=1e-12, atol=0)
    assert abs(expect / lr - 2.2) < 0.02

    # zero init: √mean(g²/v) = √20 → ≈ 0.22η with update clipping, ≈ 1.0η without
    zero_clip = first_update(g, lr, atan_adam=True, update_clipping=True)
    torch.testing.assert_close(zero_clip.abs(), torch.full_like(g, lr * math.atan(0.1) / 0.1 / math.sqrt(20)))
    assert abs(zero_clip.abs().mean().item() / lr - 0.22) < 0.01
    zero_plain = first_update(g, lr, atan_adam=True)
    torch.testing.assert_close(zero_plain.abs(), torch.full_like(g, lr * math.atan(0.1) / 0.1))
    assert abs(zero_plain.abs().mean().item() / lr - 1.0) < 0.01


# --------------------------------------------------------------------------------------- other options


def two_steps(flags: dict, grads: list[torch.Tensor], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, wd=0.0):
    p = nn.Parameter(torch.zeros_like(grads[0]))
    opt = ELLISAdam([p], lr=lr, init_lr=lr, betas=betas, eps=eps, weight_decay=wd, **flags)
    updates = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        updates.append(p.detach() - before)
    return updates, opt.state[p]


def adam_moments(grads, b1, b2):
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    out = []
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append((m, v))
    return out


def test_eps_adjustment_puts_eps_inside_the_root():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) * 0.05 for _ in range(2)]
    lr, (b1, b2), eps = 1e-2, (0.9, 0.95), 0.02  # ε comparable to √v so the two forms differ visibly
    adjusted, _ = two_steps({"eps_adjustment": True}, grads, lr=lr, eps=eps)
    plain, _ = two_steps({}, grads, lr=lr, eps=eps)
    moments = adam_moments(grads, b1, b2)
    for t, ((m, v), got_adj, got_plain) in enumerate(zip(moments, adjusted, plain, strict=True), start=1):
        vhat = v / (1 - b2**t)
        a = lr / (1 - b1**t)
        torch.testing.assert_close(got_adj, -a * m / torch.sqrt(vhat + eps * eps), rtol=1e-10, atol=0)
        torch.testing.assert_close(got_plain, -a * m / (torch.sqrt(vhat) + eps), rtol=1e-10, atol=0)
        assert not torch.allclose(got_adj, got_plain, rtol=1e-3)


def test_nesterov_uses_lookahead_momentum_and_keeps_plain_ema():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(30, generator=gen, dtype=torch.float64) for _ in range(3)]
    lr, (b1, b2), eps = 1e-2, (0.9, 0.95), 1e-6
    got, state = two_steps({"nesterov": True}, grads, lr=lr)
    for t, ((m, v), g, upd) in enumerate(zip(adam_moments(grads, b1, b2), grads, got, strict=True), start=1):
        lookahead = b1 * m + (1 - b1) * g
        want = -lr / (1 - b1**t) * lookahead / (torch.sqrt(v / (1 - b2**t)) + eps)
        torch.testing.assert_close(upd, want, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(state["exp_avg"], adam_moments(grads, b1, b2)[-1][0], rtol=1e-12, atol=1e-15)
    plain, _ = two_steps({}, grads, lr=lr)
    assert not torch.allclose(plain[-1], got[-1], rtol=1e-3)


def test_tensor_wise_finite_check_skips_the_tensor_without_counting_a_step():
    def run(check: bool):
        a = nn.Parameter(torch.ones(5))
        b = nn.Parameter(torch.ones(5))
        opt = ELLISAdam([a, b], lr=1e-2, weight_decay=0.1, tensor_wise_finite_check=check, **PRODUCTION)
        a.grad, b.grad = torch.full((5,), 0.5), torch.full((5,), 0.5)
        opt.step()
        a_state = copy.deepcopy(opt.state[a])
        a_before, b_before = a.detach().clone(), b.detach().clone()
        a.grad = torch.tensor([1.0, float("nan"), 1.0, float("inf"), 1.0])
        b.grad = torch.full((5,), 0.5)
        opt.step()
        return a, b, a_before, b_before, a_state, opt

    a, b, a_before, b_before, a_state, opt = run(check=True)
    assert torch.equal(a.detach(), a_before)
    assert int(opt.state[a]["step"]) == 1
    assert all(torch.equal(opt.state[a][k], a_state[k]) for k in a_state)
    assert not torch.equal(b.detach(), b_before) and int(opt.state[b]["step"]) == 2

    a, *_ = run(check=False)
    assert not torch.isfinite(a.detach()).all()


def test_tensor_wise_gradient_normalization_feeds_unit_norm_gradients():
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(40, generator=gen, dtype=torch.float64) * s for s in (30.0, 0.01)]
    unit = [g / torch.linalg.vector_norm(g) for g in grads]
    lr, (b1, b2), eps = 1e-2, (0.9, 0.95), 0.05  # ε not negligible: the scale of g matters
    got, state = two_steps({"tensor_wise_gradient_normalization": True}, grads, lr=lr, eps=eps)
    moments = adam_moments(unit, b1, b2)
    for t, ((m, v), upd) in enumerate(zip(moments, got, strict=True), start=1):
        want = -lr / (1 - b1**t) * m / (torch.sqrt(v / (1 - b2**t)) + eps)
        torch.testing.assert_close(upd, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], moments[-1][1], rtol=1e-12, atol=0)
    raw, _ = two_steps({}, grads, lr=lr, eps=eps)
    assert not torch.allclose(raw[-1], got[-1], rtol=1e-3)


@pytest.mark.parametrize("decouple", [True, False])
def test_weight_decay_follows_schedule_ratio_when_decoupled(decouple):
    init_lr, lr_t, wd = 1e-3, 2.5e-4, 0.2
    p = nn.Parameter(torch.linspace(-2, 2, 9, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = ELLISAdam([p], lr=init_lr, init_lr=init_lr, weight_decay=wd, decouple_wd=decouple, **{
        k: v for k, v in PRODUCTION.items() if k != "decouple_wd"
    })
    opt.param_groups[0]["lr"] = lr_t
    p.grad = torch.zeros_like(p)  # zero gradient: atan2(0, ·) = 0, only the decay moves p
    opt.step()
    factor = 1 - (lr_t / init_lr) * wd if decouple else 1 - lr_t * wd
    torch.testing.assert_close(p.detach(), p0 * factor, rtol=1e-14, atol=0)


def test_init_lr_is_explicit_not_the_group_lr():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    # groups built at a different lr than η₀: the decay ratio must use η₀ = init_lr
    opt = ELLISAdam([{"params": [p], "lr": 5e-4}], lr=1e-3, init_lr=2e-3, weight_decay=0.4, **PRODUCTION)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full_like(p, 1 - (5e-4 / 2e-3) * 0.4), rtol=1e-14, atol=0)


def test_kahan_sum_keeps_tiny_updates_in_bf16_and_leaves_grad_alone():
    gen = torch.Generator().manual_seed(6)
    # bf16 spacing in [2, 8) is 2^-6..2^-5 while each update is ~1e-3; values start bf16-representable, and
    # the gradients have a consistent sign so the exact trajectory drifts by many update sizes
    start = (torch.randn(256, generator=gen) + 4.0).to(torch.bfloat16).float()
    grads = [(1.0 + 0.5 * torch.randn(256, generator=gen)).to(torch.bfloat16).float() for _ in range(60)]

    def run(dtype: torch.dtype, kahan: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p = nn.Parameter(start.to(dtype, copy=True))
        opt = ELLISAdam(
            [p], lr=1e-3, weight_decay=1e-3, kahan_sum=kahan, buffer_dtype="float32", **PRODUCTION
        )
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
            assert torch.equal(p.grad, g.to(dtype))  # the gradient is never written
        residual = opt.state[p]["kahan"] if kahan else torch.zeros(())
        return p.detach().float(), residual

    exact, _ = run(torch.float32, kahan=False)
    plain, _ = run(torch.bfloat16, kahan=False)
    compensated, residual = run(torch.bfloat16, kahan=True)
    spacing = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)
    assert ((compensated - exact).abs() <= spacing / 2 + 1e-6).all()  # as close as bf16 can be
    torch.testing.assert_close(compensated + residual, exact, rtol=0, atol=1e-5)  # nothing lost
    assert (plain - exact).abs().mean() > 4 * (compensated - exact).abs().mean()


# ------------------------------------------------------------------------------- state dict, builder


def drive(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (t + 1) / steps * g["base_lr"]
        opt.step()


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "ellis_adam", **PRODUCTION, "weight_decay": 4e-5, "eps": 1e-6},
        {"name": "ellis_adam", **PRODUCTION, "kahan_sum": True, "buffer_dtype": "float32",
         "param_dtype": "bf16"},
        {"name": "ellis_adam", "nesterov": True, "tensor_wise_gradient_normalization": True},
        {"name": "adamw"},
    ],
)
def test_state_dict_roundtrip_continues_bit_identically(overrides):
    overrides = dict(overrides)
    bf16 = overrides.pop("param_dtype", None) == "bf16"
    cfg = OptimConfig(**overrides)
    model = tiny_model()
    if bf16:
        model = model.to(torch.bfloat16)
    opt = build_optimizer(model, cfg)
    drive(model, opt, steps=3, seed=10)

    saved_model = roundtrip(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    twin = tiny_model()
    if bf16:
        twin = twin.to(torch.bfloat16)
    twin.load_state_dict(saved_model)
    twin_opt = build_optimizer(twin, cfg)
    twin_opt.load_state_dict(saved_opt)
    if bf16:  # buffers keep their own dtype through the round trip
        assert all(s["exp_avg"].dtype == torch.float32 for s in twin_opt.state.values())

    drive(model, opt, steps=3, seed=11)
    drive(twin, twin_opt, steps=3, seed=11)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state_dict()["state"].values(), twin_opt.state_dict()["state"].values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_optimizer_wires_config():
    model = tiny_model()
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=3e-3, weight_decay=0.05, betas=[0.8, 0.9]))
    assert type(adamw) is torch.optim.AdamW
    assert [g["name"] for g in adamw.param_groups] == ["weights", "embedding", "scale_and_norm"]
    assert all(g["fused"] and g["betas"] == (0.8, 0.9) for g in adamw.param_groups)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.05, 0.0]

    cfg = OptimConfig(name="ellis_adam", lr=4e-5, eps=1e-6, nesterov=True, **PRODUCTION)
    ellis = build_optimizer(model, cfg)
    assert isinstance(ellis, ELLISAdam)
    for g in ellis.param_groups:
        assert g["init_lr"] == 4e-5 and g["nesterov"] and g["atan_adam"] and not g["eps_adjustment"]
        assert "base_lr" in g and "name" in g


def test_optim_yaml_files_are_valid_configs():
    adamw = to_dataclass(OmegaConf.load(CONF / "adamw.yaml"), OptimConfig)
    assert adamw.name == "adamw"
    ellis = to_dataclass(OmegaConf.load(CONF / "ellis_adam.yaml"), OptimConfig)
    assert ellis.name == "ellis_adam"
    assert (ellis.atan_adam, ellis.update_clipping, ellis.running_init, ellis.decouple_wd) == (True,) * 4
    assert (ellis.weight_decay, list(ellis.betas), ellis.eps) == (4e-5, [0.9, 0.95], 1e-6)
    assert not (ellis.eps_adjustment or ellis.nesterov or ellis.kahan_sum)


def test_bad_optimizer_config_names_the_field():
    with pytest.raises(ConfigError, match=r"optim\.lr=-0\.001"):
        OptimConfig(lr=-1e-3)
    with pytest.raises(ConfigError, match=r"optim\.buffer_dtype"):
        OptimConfig(buffer_dtype="float8")
    with pytest.raises(ValueError, match="init_lr"):
        ELLISAdam([nn.Parameter(torch.ones(1))], init_lr=0.0)
