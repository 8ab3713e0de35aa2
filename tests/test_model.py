"""Acceptance tests of RecurrentLM (issue 2): counts, forward semantics, sampler, init, truncated backprop."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recdepth.config import ModelConfig, RecurrenceConfig, to_dataclass
from recdepth.errors import ConfigError
from recdepth.model import DepthSampler, RecurrentLM
from recdepth.model.init import takase_std

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ModelConfig(
    n_embd=64, n_heads=4, intermediate_size=96, vocab_size=128, block_size=32, n_prelude=1, n_core=2, n_coda=1
)
HUGINN = RecurrenceConfig(scheme="poisson-lognormal-filling", mean=32, backprop_depth=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def yaml_model(name: str) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))


def build(cfg: ModelConfig = TINY, rec: RecurrenceConfig = HUGINN, seed: int = 0) -> RecurrentLM:
    model = RecurrentLM(cfg, rec)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def batch(cfg: ModelConfig = TINY, B: int = 2, S: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, S), generator=g), torch.randint(0, cfg.vocab_size, (B, S), generator=g)


def states(cfg: ModelConfig = TINY, B: int = 2, S: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, cfg.n_embd, generator=torch.Generator().manual_seed(seed)) * 0.6


# ------------------------------------------------------------------------------------------ parameters


def spec_block_params(cfg: ModelConfig) -> int:
    d, i = cfg.n_embd, cfg.intermediate_size
    return 4 * d * d + 3 * d * i + 2 * d + 4 * d  # model spec §8.1


def test_raven_3p5b_parameter_count_on_meta():
    with torch.device("meta"):
        model = RecurrentLM(yaml_model("raven_3p5b"))
    assert model.num_params() == 3_564_976_800
    assert model.transformer.wte.weight.numel() == 346_030_080
    assert model.lm_head.weight is model.transformer.wte.weight
    blocks = [*model.transformer.prelude, *model.transformer.core_block, *model.transformer.coda]
    assert len(blocks) == 8
    for blk in blocks:
        assert sum(p.numel() for p in blk.parameters()) == 395_398_080
        assert blk.attn.Wqkv.weight.numel() == 83_635_200
        assert blk.attn.proj.weight.numel() == 27_878_400
        assert blk.mlp.fc.weight.numel() == 189_235_200
        assert blk.mlp.proj.weight.numel() == 94_617_600
        assert blk.attn.qk_bias.numel() == 10_560
    assert sum(p.numel() for p in model.transformer.core_block.parameters()) == 1_581_592_320
    assert model.transformer.adapter.weight.numel() == 55_756_800
    assert model.transformer.ln_f.weight.numel() == 5_280
    assert model.freqs_cis.shape == (1, 4096, 1, 48, 2)


@pytest.mark.parametrize("name", ["gpt_baseline", "raven_small", "raven_tiny"])
def test_other_shapes_match_spec_formula(name):
    cfg = yaml_model(name)
    with torch.device("meta"):
        model = RecurrentLM(cfg)
    expected = cfg.vocab_size * cfg.n_embd + cfg.n_layers * spec_block_params(cfg) + 2 * cfg.n_embd**2 + cfg.n_embd
    assert model.num_params() == expected
    if name == "gpt_baseline":  # model spec §8.4: same parameters as nebel
        assert expected == 3_564_976_800


# ------------------------------------------------------------------------------------------- forward


def test_forward_backward_shapes():
    model = build()
    ids, labels = batch()
    out = model(ids, labels=labels, num_steps=(2, 2), telemetry=True)
    assert out.logits.shape == (2, 16, TINY.vocab_size) and out.logits.dtype == torch.float32
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.stats["num_steps_no_grad"] == 2 and out.stats["num_steps_with_grad"] == 2
    assert "recurrent_residual" in out.stats
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    labels[0, :5] = -100  # ignore_index
    assert torch.isfinite(model(ids, labels=labels, num_steps=(1, 1)).loss)


def test_sampler_path_equals_explicit_steps():
    model = build()
    ids, _ = batch()
    s0 = states()
    model.train()
    model.step = 3  # draw (25, 8)
    with torch.no_grad():
        drawn = model(ids, input_states=s0)
        explicit = model(ids, num_steps=(25, 8), input_states=s0)
        via_kwarg = model(ids, step=3, input_states=s0)
    assert (drawn.stats["num_steps_no_grad"], drawn.stats["num_steps_with_grad"]) == (25, 8)
    assert torch.equal(drawn.logits, explicit.logits)
    assert torch.equal(via_kwarg.logits, explicit.logits)
    # the same seeded generator gives the same initial state, so logits match without input_states too
    a = model(ids, num_steps=(2, 1), generator=torch.Generator().manual_seed(5)).logits
    b = model(ids, num_steps=(2, 1), generator=torch.Generator().manual_seed(5)).logits
    assert torch.equal(a, b)
    # the trainer's step attribute changes the draw
    seen = set()
    for step in range(1, 6):
        model.step = step
        with torch.no_grad():
            o = model(ids[:, :4], input_states=s0[:, :4])
        seen.add((o.stats["num_steps_no_grad"], o.stats["num_steps_with_grad"]))
    assert len(seen) >= 3


def test_eval_mode_runs_mean_depth_without_grad():
    model = build(rec=RecurrenceConfig(scheme="poisson-lognormal-filling", mean=6, backprop_depth=2))
    model.eval()
    ids, _ = batch(S=8)
    out = model(ids, input_states=states(S=8))
    assert (out.stats["num_steps_no_grad"], out.stats["num_steps_with_grad"]) == (6, 0)
    assert model.sampler.eval_steps() == (6, 0)
    assert torch.equal(out.logits, model(ids, num_steps=6, input_states=states(S=8)).logits)


# ------------------------------------------------------------------------------------------- sampler


def test_sampler_reference_draws():
    sampler = DepthSampler(HUGINN)
    draws = [sampler.draw(step) for step in range(1, 11)]
    assert draws == [(21, 8), (21, 8), (25, 8), (44, 8), (32, 8), (8, 8), (27, 8), (21, 8), (9, 8), (9, 8)]


def test_draw_is_pure_and_leaves_global_rng_alone():
    sampler = DepthSampler(HUGINN)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [sampler.draw(s) for s in range(1, 30)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global state changes nothing
    assert [sampler.draw(s) for s in reversed(range(1, 30))][::-1] == first


def test_lockstep_controls_rank_dependence():
    on = DepthSampler(HUGINN)
    off = DepthSampler(dataclasses.replace(HUGINN, lockstep=False))
    steps = range(1, 11)
    assert [on.draw(s, 0) for s in steps] == [on.draw(s, 1) for s in steps] == [on.draw(s, 5) for s in steps]
    rank0, rank1 = [off.draw(s, 0) for s in steps], [off.draw(s, 1) for s in steps]
    assert rank0 != rank1
    assert rank0 == [on.draw(s) for s in steps]  # rank 0 multiplies the seeds by 1


# ---------------------------------------------------------------------------------------- round trip


def test_export_import_round_trip_bit_exact(tmp_path):
    from recdepth.hf import export, load

    model = build()
    back = load(export(model, tmp_path / "hf", dtype=torch.float32))
    for key, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(
            model(ids, num_steps=(2, 1), input_states=states()).logits,
            back(ids, num_steps=(2, 1), input_states=states()).logits,
        )


# ---------------------------------------------------------------------------------------------- init


def truncated_std_factor(c: float = 3.0) -> float:
    """std of N(0,1) truncated to ±c (≈ 0.9866 for c = 3)."""
    pdf = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))
    return math.sqrt(1 - 2 * c * pdf / mass)


def test_takase_stds_match_spec():
    std, out = takase_std(yaml_model("raven_3p5b"), 32)
    assert std == pytest.approx(0.0087039, abs=5e-8)
    assert out == pytest.approx(0.00053569, abs=5e-9)
    assert takase_std(yaml_model("raven_3p5b"), 1)[1] == pytest.approx(0.0021760, abs=5e-8)
    assert truncated_std_factor() == pytest.approx(0.986, abs=1e-3)


def test_init_stds_per_role():
    cfg = ModelConfig(n_embd=512, n_heads=8, intermediate_size=1536, vocab_size=2048, block_size=64,
                      n_prelude=2, n_core=4, n_coda=2)
    model = build(cfg, HUGINN)
    std, out = takase_std(cfg, HUGINN.mean)
    assert out == pytest.approx(std / math.sqrt(2 * (2 + 2 + 4 * 32)))
    f = truncated_std_factor()

    def close(t: torch.Tensor, target: float, what: str) -> None:
        measured = t.float().std().item()
        assert measured == pytest.approx(f * target, rel=0.03), what
        assert t.abs().max().item() <= 3 * target * (1 + 1e-6), what

    d = cfg.n_embd
    close(model.transformer.wte.weight, std, "wte")
    close(model.transformer.adapter.weight, std, "adapter")
    for name, blk in [(f"block{i}", b) for i, b in enumerate(
            [*model.transformer.prelude, *model.transformer.core_block, *model.transformer.coda])]:
        for j, part in enumerate(blk.attn.Wqkv.weight.split(d)):
            close(part, std, f"{name}.Wqkv[{j}]")
        close(blk.attn.proj.weight, out, f"{name}.attn.proj")
        gate, up = blk.mlp.fc.weight.chunk(2)
        close(gate, std, f"{name}.fc.gate")
        close(up, std, f"{name}.fc.up")  # both halves σ (training code, not the HF σ_out)
        close(blk.mlp.proj.weight, out, f"{name}.mlp.proj")
        assert torch.count_nonzero(blk.attn.qk_bias) == 0
        for norm in (blk.norm_1, blk.norm_2, blk.norm_3, blk.norm_4):
            assert torch.all(norm.weight == 1)
    assert torch.all(model.transformer.ln_f.weight == 1)
    s0 = model.initial_state(torch.empty(4, 64, d), torch.Generator().manual_seed(0))
    assert s0.std().item() == pytest.approx(f * std * math.sqrt(d), rel=0.03)  # ≈ 0.624
    assert s0.abs().max().item() <= 3 * std * math.sqrt(d) * (1 + 1e-6)  # ±1.897


# ----------------------------------------------------------------------------------- truncated backprop


def grads(model: RecurrentLM, num_steps, s0: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ids, labels = batch()
    model(ids, labels=labels, num_steps=num_steps, input_states=s0).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_checkpointing_does_not_change_gradients():
    plain = build(dataclasses.replace(TINY, activation_checkpointing="none"))
    ckpt = build(dataclasses.replace(TINY, activation_checkpointing="per-iteration"))
    ckpt.load_state_dict(plain.state_dict())
    g_plain, g_ckpt = grads(plain, (3, 2), states()), grads(ckpt, (3, 2), states())
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_flows_only_through_last_k_iterations():
    model = build()
    ids, labels = batch()
    s0 = states().requires_grad_()
    model(ids, labels=labels, num_steps=(1, 2), input_states=s0).loss.backward()
    assert s0.grad is None  # the state entering the grad iterations is a constant
    model(ids, labels=labels, num_steps=(0, 2), input_states=s0).loss.backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0

    # (n, k) = (3, 2) equals (0, 2) started from the state after 3 no-grad iterations
    full = grads(model, (3, 2), states())
    with torch.no_grad():
        freqs = model.freqs_cis[:, :16]
        e = model.transformer.wte(ids) * model.embed_scale
        for blk in model.transformer.prelude:
            e = blk(e, freqs)
        s = states()
        for _ in range(3):
            s = model.core_step(s, e, freqs)
    short = grads(model, (0, 2), s)
    for name in full:
        torch.testing.assert_close(full[name], short[name], rtol=0, atol=1e-6, msg=name)
    for name in ("transformer.prelude.0.attn.Wqkv.weight", "transformer.wte.weight", "transformer.adapter.weight"):
        assert full[name].abs().sum() > 0, name


def saved_bytes(model: RecurrentLM, n: int, k: int) -> int:
    """Bytes autograd keeps for backward (the activation memory), counted by a saved-tensors hook."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    ids, labels = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=labels, num_steps=(n, k), input_states=states())
    out.loss.backward()
    return total


@pytest.mark.parametrize("ckpt", ["none", "per-iteration"])
def test_activation_memory_independent_of_n(ckpt):
    model = build(dataclasses.replace(TINY, activation_checkpointing=ckpt))
    base = saved_bytes(model, 0, 2)
    assert saved_bytes(model, 8, 2) == base
    assert saved_bytes(model, 8, 4) > base  # it does measure something: grows with k


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_embd": 100, "n_heads": 3}, "model.n_embd"),
        ({"n_embd": 96, "n_heads": 32}, "model.n_embd"),  # head_dim 3 is odd: RoPE needs pairs
        ({"n_heads": 0}, "model.n_heads"),
        ({"n_prelude": -1}, "model.n_prelude"),
        ({"n_core": 0}, "model.n_core"),
        ({"n_coda": -2}, "model.n_coda"),
        ({"block_size": 0}, "model.block_size"),
        ({"rope_base": -1.0}, "model.rope_base"),
        ({"activation_checkpointing": "per-block"}, "model.activation_checkpointing"),
    ],
)
def test_model_config_errors_name_field(kwargs, field):
    with pytest.raises(ConfigError, match=field + r"=.*expected"):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mean": -1}, "recurrence.mean"),
        ({"backprop_depth": 0}, "recurrence.backprop_depth"),
        ({"backprop_depth": -3}, "recurrence.backprop_depth"),
        ({"scheme": "poisson-lognormal-filing"}, "recurrence.scheme"),
        ({"curriculum_steps": -1}, "recurrence.curriculum_steps"),
        ({"scheme": "simple", "mean": 4, "backprop_depth": 8}, "recurrence.mean"),
    ],
)
def test_recurrence_config_errors_name_field(kwargs, field):
    with pytest.raises(ConfigError, match=field + r"=.*expected") as info:
        RecurrenceConfig(**kwargs)
    if "scheme" in kwargs and field.endswith("scheme"):
        assert "poisson-lognormal-filling" in str(info.value)  # lists the valid schemes


def test_sequence_beyond_rope_table():
    model = build()
    ids = torch.zeros(1, TINY.block_size + 1, dtype=torch.long)
    with pytest.raises(ConfigError, match=f"model.block_size={TINY.block_size}"):
        model(ids, num_steps=(1, 1))
    model(ids[:, : TINY.block_size], num_steps=(1, 0))  # the full table is fine


def test_negative_num_steps_rejected():
    model = build()
    ids, _ = batch()
    for bad in [(-1, 2), (2, -1), (0, 0)]:
        with pytest.raises(ValueError, match="num_steps"):
            model(ids, num_steps=bad)


def test_negative_num_steps_is_config_error():
    model = build()
    ids, _ = batch()
    with pytest.raises(ConfigError):
        model(ids, num_steps=(-1, 2))


def test_untied_head_builds():
    model = RecurrentLM(dataclasses.replace(TINY, tie_embeddings=False))
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_structured_config_type_errors_name_field():
    with pytest.raises(Exception, match="n_embd") as info:
        OmegaConf.merge(OmegaConf.structured(ModelConfig), {"n_embd": "abc"})
    assert "abc" in str(info.value)
    with pytest.raises(ConfigError, match="n_layer"):
        to_dataclass({"n_layer": 3}, ModelConfig)  # typo'd key: unknown field named
    with pytest.raises(ConfigError, match="model.n_heads"):
        to_dataclass(OmegaConf.create({"n_embd": 64, "n_heads": 5}), ModelConfig)
