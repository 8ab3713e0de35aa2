"""Analytic FLOPs and parameter counts against the spec's reference numbers and against measurement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from recdepth.config import ModelConfig, RecurrenceConfig
from recdepth.model import RecurrentLM
from recdepth.model.flops import (
    FlopCount,
    count_params,
    expected_flops_per_token,
    flops_per_token,
    iteration_params,
    mean_depths,
    outer_params,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
MODEL_YAMLS = sorted((CONF / "model").glob("*.yaml"))


def load_model_cfg(name: str) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))


NEBEL = load_model_cfg("raven_3p5b")
TINY = ModelConfig(
    n_embd=64, n_heads=4, intermediate_size=96, vocab_size=128, block_size=32, n_prelude=1, n_core=2, n_coda=1
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_nebel_matmul_params():
    assert outer_params(NEBEL) == 1_927_495_680
    assert iteration_params(NEBEL) == 1_637_222_400


def test_nebel_flops_at_25_8():
    f = flops_per_token(NEBEL, 25, 8)  # block_size 4096, per-iteration checkpointing from the config
    assert round(f.model / 1e9) == 181
    assert round(f.hardware / 1e9) == 209
    assert f.model == f.forward + f.backward
    assert f.hardware == f.model + f.recompute


def test_checkpointing_switch():
    on = flops_per_token(NEBEL, 25, 8, checkpointing=True)
    off = flops_per_token(NEBEL, 25, 8, checkpointing=False)
    assert off.recompute == 0 and off.model == on.model
    none_cfg = load_model_cfg("gpt_baseline")  # activation_checkpointing: none
    assert flops_per_token(none_cfg, 0, 1).recompute == 0
    # recompute of one checkpointed iteration equals that iteration's forward
    one = flops_per_token(NEBEL, 0, 1, checkpointing=True)
    zero = flops_per_token(NEBEL, 0, 0, checkpointing=True)
    assert one.recompute == pytest.approx(one.forward - zero.forward)


def test_flops_grow_with_sequence_only_through_attention():
    a, b = flops_per_token(NEBEL, 25, 8, seq_len=1024), flops_per_token(NEBEL, 25, 8, seq_len=2048)
    attn_layers_fwd = NEBEL.n_prelude + NEBEL.n_coda + NEBEL.n_core * 33
    assert b.forward - a.forward == pytest.approx(2 * NEBEL.n_embd * 1024 * attn_layers_fwd)


def test_expected_flops_is_mean_over_draws():
    rec = RecurrenceConfig(scheme="poisson-lognormal-filling", mean=32, backprop_depth=8)
    n, k = mean_depths(rec, samples=200)
    e = expected_flops_per_token(NEBEL, rec, samples=200)
    from recdepth.model.sampler import DepthSampler

    draws = [DepthSampler(rec).draw(s) for s in range(1, 201)]
    mean_model = sum(flops_per_token(NEBEL, a, b).model for a, b in draws) / len(draws)
    assert e.model == pytest.approx(mean_model, rel=1e-12)
    assert e == flops_per_token(NEBEL, n, k)
    fixed = RecurrenceConfig(scheme="fixed", mean=8, backprop_depth=4)
    assert expected_flops_per_token(NEBEL, fixed, samples=10) == flops_per_token(NEBEL, 4, 4)


def test_nebel_param_breakdown():
    p = count_params(NEBEL)
    assert p["embedding"] == 346_030_080
    assert (p["block_wqkv"], p["block_attn_proj"], p["block_fc"], p["block_mlp_proj"]) == (
        83_635_200, 27_878_400, 189_235_200, 94_617_600
    )
    assert (p["block_qk_bias"], p["block_norms"]) == (10_560, 21_120)
    assert p["per_block"] == 395_398_080
    assert p["blocks"] == 3_163_184_640
    assert p["adapter"] == 55_756_800
    assert p["ln_f"] == 5_280
    assert p["total"] == 3_564_976_800
    assert p["core"] == 1_581_592_320
    assert p["non_recurrent"] == 1_983_384_480
    assert p["unfolded"] == 52_594_338_720
    assert count_params(NEBEL, r=64)["unfolded"] == 103_205_292_960


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_count_params_matches_meta_module(path):
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(path)))
    with torch.device("meta"):
        model = RecurrentLM(cfg)
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    core = sum(p.numel() for p in model.transformer.core_block.parameters())
    assert count_params(cfg)["core"] == core


def _measured(model: RecurrentLM, ids: torch.Tensor, n: int, k: int, backward: bool) -> dict[str, int]:
    """FlopCounterMode totals by op, with SDPA forced onto the math path so attention shows up as bmm."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids, labels=ids if backward else None, num_steps=(n, k))
        if backward:
            out.loss.backward()
    return {str(op): int(v) for op, v in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("n,k", [(2, 1), (0, 3), (3, 2)])
def test_forward_matches_flop_counter(n, k):
    """Linear layers: exact. Attention: the counter sees full S×S scores (math SDPA computes the masked
    half too), i.e. 4·S²·d per layer per sequence; our causal count is A_l·S = 2·d·S·(S+1)."""
    torch.manual_seed(0)
    model = RecurrentLM(TINY)
    B, S = 2, 16
    ids = torch.randint(0, TINY.vocab_size, (B, S))
    with torch.no_grad():
        got = _measured(model, ids, n, k, backward=False)
    f = flops_per_token(TINY, n, k, seq_len=S)
    layers = TINY.n_prelude + TINY.n_coda + TINY.n_core * (n + k)
    matmul = 2 * (outer_params(TINY) + (n + k) * iteration_params(TINY))
    assert got["aten.mm"] == matmul * B * S
    assert got["aten.bmm"] == 4 * S * S * TINY.n_embd * B * layers
    causal = got["aten.bmm"] * (S + 1) / (2 * S)
    assert got["aten.mm"] + causal == pytest.approx(f.forward * B * S, rel=1e-12)


@pytest.mark.parametrize("ckpt", ["per-iteration", "none"])
def test_forward_backward_recompute_match_flop_counter(ckpt):
    cfg = dataclasses.replace(TINY, activation_checkpointing=ckpt)
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    B, S, n, k = 2, 16, 2, 2
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    got = _measured(model, ids, n, k, backward=True)
    f = flops_per_token(cfg, n, k, seq_len=S)
    assert (f.recompute > 0) == (ckpt == "per-iteration")
    causal = got["aten.bmm"] * (S + 1) / (2 * S)
    assert got["aten.mm"] + causal == pytest.approx(f.hardware * B * S, rel=1e-12)


def test_flopcount_properties():
    f = FlopCount(forward=1.0, backward=2.0, recompute=0.5)
    assert (f.model, f.hardware) == (3.0, 3.5)
