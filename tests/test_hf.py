"""Hugging Face export/import: layout, config values, exact round trips, clear errors on bad files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recdepth.config import ModelConfig, RecurrenceConfig
from recdepth.errors import CheckpointError
from recdepth.hf import export, hf_config, hf_state_dict_keys, hf_state_dict_shapes, load
from recdepth.model import RecurrentLM

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ModelConfig(
    name="hf_tiny", n_embd=64, n_heads=4, intermediate_size=96, vocab_size=256, block_size=32,
    n_prelude=1, n_core=2, n_coda=1,
)
REC = RecurrenceConfig(scheme="poisson-lognormal-filling", mean=4, backprop_depth=2, lockstep=False, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def yaml_cfg(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))


@pytest.fixture(scope="module")
def model() -> RecurrentLM:
    gen = torch.Generator().manual_seed(0)
    m = RecurrentLM(TINY, REC)
    m.reset_parameters(gen)
    with torch.no_grad():  # non-trivial norms and qk_bias, so a swapped tensor would show
        for name, p in m.named_parameters():
            if "norm" in name or "ln_f" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m


def logits(m: RecurrentLM, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids, num_steps=(3, 2), input_states=states).logits


def test_fp32_round_trip_is_bit_exact(model, tmp_path):
    out = export(model, tmp_path / "hf", dtype=torch.float32)
    back = load(out)
    assert back.cfg == model.cfg and back.recurrence == model.recurrence
    sd, sd2 = model.state_dict(), back.state_dict()
    assert list(sd) == list(sd2)
    for key in sd:
        assert sd2[key].dtype == torch.float32, key
        assert torch.equal(sd[key], sd2[key]), key
    assert back.lm_head.weight is back.transformer.wte.weight
    assert back.num_params() == model.num_params()
    assert all(p.requires_grad for p in back.parameters())
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    states = model.initial_state(torch.empty(2, 16, TINY.n_embd), torch.Generator().manual_seed(2))
    assert torch.equal(logits(model, ids, states), logits(back, ids, states))


def test_bf16_export_dtypes(model, tmp_path):
    out = export(model, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(hf_state_dict_keys(TINY))
    for key, t in tensors.items():
        assert t.dtype == (torch.float32 if key == "freqs_cis" else torch.bfloat16), key
    assert torch.equal(tensors["freqs_cis"], model.freqs_cis)
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load(out)  # fp32 model holding the bf16-rounded weights
    for key, t in model.state_dict().items():
        if key != "freqs_cis":
            assert torch.equal(back.state_dict()[key], t.to(torch.bfloat16).float()), key
    assert load(out, dtype=torch.bfloat16).transformer.wte.weight.dtype == torch.bfloat16


def test_nebel_key_set_on_meta():
    cfg = ModelConfig(**yaml_cfg("model", "raven_3p5b"))
    keys = hf_state_dict_keys(cfg)
    assert len(keys) == 77 and len(set(keys)) == 77
    with torch.device("meta"):
        m = RecurrentLM(cfg)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == hf_state_dict_shapes(cfg)
    shapes = hf_state_dict_shapes(cfg)
    assert shapes["freqs_cis"] == (1, 4096, 1, 48, 2)
    assert shapes["transformer.core_block.3.attn.qk_bias"] == (2, 1, 55, 96)
    assert shapes["transformer.prelude.1.attn.Wqkv.weight"] == (15840, 5280)
    assert shapes["transformer.coda.0.mlp.fc.weight"] == (35840, 5280)
    assert shapes["transformer.coda.1.mlp.proj.weight"] == (5280, 17920)
    assert shapes["transformer.adapter.weight"] == (5280, 10560)
    assert len(hf_state_dict_keys(TINY)) == 9 * TINY.n_layers + 5


def test_config_json_values_for_raven_3p5b():
    cfg = ModelConfig(**yaml_cfg("model", "raven_3p5b"))
    rec = RecurrenceConfig(**yaml_cfg("recurrence", "huginn"))
    c = json.loads(json.dumps(hf_config(cfg, rec)))
    expected = {
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "auto_map": {
            "AutoConfig": "raven_config_minimal.RavenConfig",
            "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM",
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.28.1",
        "name": cfg.name,
        "hf_config": {"org": "tomg-group-umd", "name": cfg.name},
        "block_size": 4096, "vocab_size": 65536, "padding_multiple": 4096, "tie_embeddings": True,
        "num_attention_heads": 55, "num_key_value_heads": 55,
        "n_embd": 5280, "intermediate_size": 17920, "bias": False,
        "architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-06,
        "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU",
        "init_strategy": "takase", "init_orthogonal": False,
        "state_init": "like-init", "injection_type": "linear",
        "n_layers_in_prelude": 2, "n_layers_in_recurrent_block": 4, "n_layers_in_coda": 2,
        "mean_recurrence": 32, "mean_backprop_depth": 8, "sampling_scheme": "poisson-lognormal-filling",
        "qk_bias": True, "activation_checkpoint_impl": "per-iteration",
        "n_heads": 55, "n_layers": 8, "rope_base": 50000.0,
    }
    for key, value in expected.items():
        assert c[key] == value, key
    assert '"norm_eps": 1e-06' in json.dumps(c)
    remote = hf_config(cfg, rec, code_repo="tomg-group-umd/huginn-0125")["auto_map"]
    assert remote["AutoConfig"] == "tomg-group-umd/huginn-0125--raven_config_minimal.RavenConfig"


def test_generation_config_and_tokenizer_copy(model, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 7, "content": "<|end_turn|>"}]}))
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "config.json").write_text('{"not": "ours"}')  # must not clobber the model config
    out = export(model, tmp_path / "hf", tokenizer_dir=tok, dtype=torch.float32)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": TINY.bos_token_id, "eos_token_id": [TINY.eos_token_id, 7],
                   "pad_token_id": TINY.pad_token_id, "do_sample": True, "temperature": 0.7}
    assert (out / "tokenizer.json").read_text() == (tok / "tokenizer.json").read_text()
    assert (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "huginn_raven"
    nebel_ids = ModelConfig(**yaml_cfg("model", "raven_3p5b"))
    from recdepth.hf import generation_config

    assert generation_config(nebel_ids)["eos_token_id"] == [65505, 65508]
    assert generation_config(nebel_ids)["bos_token_id"] == 65504
    assert generation_config(nebel_ids)["pad_token_id"] == 65509


def test_export_is_atomic_and_unwraps(model, tmp_path):
    out = tmp_path / "hf"
    export(torch.compile(model), out, dtype=torch.float32)  # wrapper prefixes must not leak into keys
    assert set(load_file(out / "model.safetensors")) == set(hf_state_dict_keys(TINY))
    (out / "stale.txt").write_text("from an older export")
    export(model, out, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or aside dirs left behind
    assert not (out / "stale.txt").exists()
    with pytest.raises(CheckpointError, match="tokenizer_dir"):
        export(model, tmp_path / "other", tokenizer_dir=tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(CheckpointError, match="exists"):
        export(model, out, overwrite=False)


def _rewrite(out: Path, edit) -> None:
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))


def test_missing_unexpected_and_misshaped_keys(model, tmp_path):
    out = export(model, tmp_path / "hf", dtype=torch.float32)
    _rewrite(out, lambda t: t.pop("transformer.core_block.1.mlp.proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['transformer.core_block.1.mlp.proj.weight'\]"):
        load(out)

    out = export(model, tmp_path / "hf", dtype=torch.float32)
    _rewrite(out, lambda t: t.update({"transformer.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['transformer.extra.weight'\]"):
        load(out)

    out = export(model, tmp_path / "hf", dtype=torch.float32)
    _rewrite(out, lambda t: t.update({"transformer.adapter.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"transformer.adapter.weight: \[64, 64\] \(expected \[64, 128\]\)"):
        load(out)

    out = export(model, tmp_path / "hf", dtype=torch.float32)
    _rewrite(out, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load(out)


def test_truncated_file_and_missing_config(model, tmp_path):
    out = export(model, tmp_path / "hf", dtype=torch.float32)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(out)


def test_loads_released_layout(model, tmp_path):
    """The released huginn-0125 form: plain HF config (no recdepth section, num_attention_heads only,
    no rope_base), no lm_head copy, no freqs_cis, weights sharded with an index."""
    out = export(model, tmp_path / "hf", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    for key in ("recdepth", "n_heads", "n_layers", "rope_base", "bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key)
    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    tensors.pop("lm_head.weight")
    tensors.pop("freqs_cis")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(released / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (released / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    back = load(released)
    assert back.cfg == dataclasses.replace(model.cfg, bos_token_id=65504, eos_token_id=65505, pad_token_id=65509)
    assert back.recurrence.mean == 4 and back.recurrence.backprop_depth == 2
    for key, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], t), key
    ids = torch.randint(0, TINY.vocab_size, (1, 8))
    states = torch.randn(1, 8, TINY.n_embd)
    assert torch.equal(logits(model, ids, states), logits(back, ids, states))


def test_exported_file_has_expected_header(model, tmp_path):
    out = export(model, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert sorted(fh.keys()) == sorted(hf_state_dict_keys(TINY))
