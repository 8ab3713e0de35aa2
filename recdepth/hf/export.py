"""Write a RecurrentLM in the huginn-0125 Hugging Face layout and read that layout back (model spec §9).

recdepth uses the reference's module names, so the state dict needs no renames: only dtype casts, the
recomputed fp32 `freqs_cis` buffer and the tied head. The tied head is stored as a **separate copy**
(`lm_head.weight` next to `transformer.wte.weight`, 9 keys per block + 5 = 77 for nebel), the form of
the intermediate huginn checkpoints; `load` also accepts files that omit it (HF re-ties on load).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from recdepth.config import ModelConfig, RecurrenceConfig
from recdepth.errors import CheckpointError, ConfigError
from recdepth.model.layers import rope_table
from recdepth.model.recurrent import RecurrentLM

HF_ORG = "tomg-group-umd"
HF_REPO = "tomg-group-umd/huginn-0125"
TRANSFORMERS_VERSION = "4.28.1"  # the template's value (model spec §9.3)
END_TURN_ID = 65508  # <|end_turn|> of the huginn tokenizer, a second generation stop token
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_OWN_FILES = {"config.json", "generation_config.json", WEIGHTS, WEIGHTS_INDEX}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# --------------------------------------------------------------------------------------------- layout


def hf_state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key the exporter writes, with its shape (model spec §9.2); no tensor is materialised."""
    d, h, hd, inter = cfg.n_embd, cfg.n_heads, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "freqs_cis": (1, cfg.block_size, 1, hd // 2, 2),
        "transformer.wte.weight": (cfg.vocab_size, d),
    }
    for group, count in (("prelude", cfg.n_prelude), ("core_block", cfg.n_core), ("coda", cfg.n_coda)):
        for i in range(count):
            p = f"transformer.{group}.{i}."
            shapes[p + "norm_1.weight"] = (d,)
            if cfg.qk_bias:
                shapes[p + "attn.qk_bias"] = (2, 1, h, hd)
            shapes[p + "attn.Wqkv.weight"] = (3 * d, d)
            shapes[p + "attn.proj.weight"] = (d, d)
            shapes[p + "norm_2.weight"] = (d,)
            shapes[p + "mlp.fc.weight"] = (2 * inter, d)
            shapes[p + "mlp.proj.weight"] = (d, inter)
            shapes[p + "norm_3.weight"] = (d,)
            shapes[p + "norm_4.weight"] = (d,)
    shapes["transformer.adapter.weight"] = (d, 2 * d)
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def hf_state_dict_keys(cfg: ModelConfig) -> list[str]:
    """The exporter's key list for a shape (77 for nebel)."""
    return list(hf_state_dict_shapes(cfg))


def hf_config(
    cfg: ModelConfig,
    recurrence: RecurrenceConfig,
    dtype: torch.dtype = torch.bfloat16,
    org: str = HF_ORG,
    code_repo: str | None = None,
) -> dict[str, Any]:
    """config.json (model spec §9.3) with values taken from the configs.

    `n_heads`, `n_layers` and `rope_base` are written too: RavenConfig defaults them to nebel's values,
    which would be wrong for other shapes. The full recdepth configs ride along under `recdepth` so
    `load` restores fields the HF format has no slot for. `code_repo` (e.g. "tomg-group-umd/huginn-0125")
    points `auto_map` at a Hub repo's modeling code; by default the code files must sit next to the weights.
    """
    prefix = f"{code_repo}--" if code_repo else ""
    h = cfg.n_heads
    return {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{prefix}raven_config_minimal.RavenConfig",
            "AutoModelForCausalLM": f"{prefix}raven_modeling_minimal.RavenForCausalLM",
        },
        "model_type": "huginn_raven",
        "torch_dtype": _dtype_name(dtype),
        "transformers_version": TRANSFORMERS_VERSION,
        "name": cfg.name,
        "hf_config": {"org": org, "name": cfg.name},
        "block_size": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        # HF pads the vocab up to this multiple; the gcd keeps the padded size equal to vocab_size
        "padding_multiple": math.gcd(cfg.vocab_size, 4096),
        "tie_embeddings": cfg.tie_embeddings,
        "num_attention_heads": h,
        "num_key_value_heads": h,
        "n_heads": h,
        "n_layers": cfg.n_layers,
        "n_embd": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "bias": False,
        "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": cfg.norm_eps,
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "init_strategy": "takase",
        "init_orthogonal": False,
        "state_init": "like-init",
        "injection_type": "linear",
        "n_layers_in_prelude": cfg.n_prelude,
        "n_layers_in_recurrent_block": cfg.n_core,
        "n_layers_in_coda": cfg.n_coda,
        "mean_recurrence": recurrence.mean,
        "mean_backprop_depth": recurrence.backprop_depth,
        "sampling_scheme": recurrence.scheme,
        "qk_bias": cfg.qk_bias,
        "activation_checkpoint_impl": cfg.activation_checkpointing,
        "rope_base": cfg.rope_base,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "recdepth": {"model": dataclasses.asdict(cfg), "recurrence": dataclasses.asdict(recurrence)},
    }


def generation_config(cfg: ModelConfig, end_turn_id: int | None = END_TURN_ID) -> dict[str, Any]:
    """generation_config.json (model spec §9.3): stop on EOS and, if the tokenizer has one, end-of-turn."""
    eos = [cfg.eos_token_id] + ([end_turn_id] if end_turn_id is not None and end_turn_id != cfg.eos_token_id else [])
    return {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "do_sample": True,
        "temperature": 0.7,
    }


def config_from_hf(config: dict[str, Any]) -> tuple[ModelConfig, RecurrenceConfig]:
    """Configs from a config.json written by `export` or shipped with the released huginn-0125."""
    extra = config.get("recdepth") or {}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    rec_fields = {f.name for f in dataclasses.fields(RecurrenceConfig)}
    model_kw = {k: v for k, v in (extra.get("model") or {}).items() if k in model_fields}
    rec_kw = {k: v for k, v in (extra.get("recurrence") or {}).items() if k in rec_fields}

    def need(*names: str) -> Any:
        for name in names:
            if name in config:
                return config[name]
        raise CheckpointError(f"config.json lacks {' / '.join(names)}")

    heads = need("n_heads", "num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise ConfigError(f"num_key_value_heads={kv_heads!r} is invalid: expected n_heads={heads} (MHA only)")
    model_kw.update(
        n_embd=need("n_embd", "hidden_size"),
        n_heads=heads,
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        block_size=need("block_size"),
        n_prelude=need("n_layers_in_prelude"),
        n_core=need("n_layers_in_recurrent_block"),
        n_coda=need("n_layers_in_coda"),
        rope_base=float(config.get("rope_base", 50000.0)),
        norm_eps=float(config.get("norm_eps", 1e-6)),
        qk_bias=bool(config.get("qk_bias", True)),
        tie_embeddings=bool(config.get("tie_embeddings", config.get("tie_word_embeddings", True))),
    )
    model_kw.setdefault("name", config.get("name", "huginn-0125"))
    impl = config.get("activation_checkpoint_impl", "per-iteration")
    model_kw.setdefault("activation_checkpointing", impl if impl in ("per-iteration", "none") else "per-iteration")
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            model_kw[key] = int(value)
    rec_kw.update(
        scheme=config.get("sampling_scheme", "poisson-lognormal-filling"),
        mean=int(config.get("mean_recurrence", 32)),
        backprop_depth=int(config.get("mean_backprop_depth", 8)),
    )
    return ModelConfig(**model_kw), RecurrenceConfig(**rec_kw)


# --------------------------------------------------------------------------------------------- export


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r} is invalid: expected one of {sorted(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def unwrap(model: nn.Module) -> RecurrentLM:
    """The bare RecurrentLM inside torch.compile / Fabric / DDP wrappers (their prefixes must not leak)."""
    for _ in range(8):
        if isinstance(model, RecurrentLM):
            return model
        inner = None
        for attr in ("_orig_mod", "_forward_module", "module"):
            candidate = getattr(model, attr, None)
            if isinstance(candidate, nn.Module):
                inner = candidate
                break
        if inner is None:
            break
        model = inner
    raise TypeError(f"expected a RecurrentLM (possibly wrapped), got {type(model).__name__}")


def _check_layout(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], optional: set[str],
                  where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = [f"{k}: {list(found[k])} (expected {list(expected[k])})" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing}")
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected}")
    if wrong:
        problems.append("wrong shape(s) " + "; ".join(wrong))
    if problems:
        raise CheckpointError(f"{where} does not match the huginn layout: " + "; ".join(problems))


def export_tensors(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """The tensors `export` writes: weights in `dtype`, `freqs_cis` recomputed in fp32, head as a copy."""
    _dtype_name(dtype)
    lm = unwrap(model)
    cfg = lm.cfg
    sd = lm.state_dict()
    _check_layout({k: tuple(v.shape) for k, v in sd.items()}, hf_state_dict_shapes(cfg), set(), "the model")
    meta = sorted(k for k, v in sd.items() if v.is_meta)
    if meta:
        raise CheckpointError(f"cannot export meta-device tensors (first: {meta[0]}); materialise the model first")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "freqs_cis":
            out[key] = rope_table(cfg.head_dim, cfg.block_size, cfg.rope_base).contiguous()
        else:
            out[key] = value.detach().to(device="cpu", dtype=dtype).contiguous()
    if cfg.tie_embeddings:  # safetensors refuses two names for one storage: store a copy
        out["lm_head.weight"] = out["transformer.wte.weight"].clone()
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _end_turn_id(tokenizer_dir: Path | None, cfg: ModelConfig) -> int | None:
    """<|end_turn|>'s id from the tokenizer if given, else huginn's 65508 when the config uses huginn's ids."""
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        for tok in data.get("added_tokens", []):
            if tok.get("content") == "<|end_turn|>":
                return int(tok["id"])
        return None
    return END_TURN_ID if (cfg.eos_token_id == 65505 and cfg.vocab_size > END_TURN_ID) else None


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    org: str = HF_ORG,
    code_repo: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors (+ tokenizer files) to `out_dir`.

    Everything is written into a temporary sibling directory that is renamed into place, so `out_dir`
    is either absent, the previous export, or the complete new one (an existing one is moved aside
    first, then deleted). Returns `out_dir`.
    """
    lm = unwrap(model)
    tensors = export_tensors(lm, dtype)
    out = Path(out_dir)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok is not None and not tok.is_dir():
        raise CheckpointError(f"tokenizer_dir={str(tok)!r} is not a directory")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _fsync_file(tmp / WEIGHTS)
        _write_json(tmp / "config.json", hf_config(lm.cfg, lm.recurrence, dtype, org, code_repo))
        _write_json(tmp / "generation_config.json", generation_config(lm.cfg, _end_turn_id(tok, lm.cfg)))
        if tok is not None:
            for src in sorted(tok.iterdir()):
                if src.is_file() and src.name not in _OWN_FILES and not src.name.endswith(".safetensors"):
                    shutil.copy2(src, tmp / src.name)
                    _fsync_file(tmp / src.name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; a non-empty `dst` is moved aside first and removed after."""
    try:
        os.replace(src, dst)
    except OSError:
        if not dst.exists():
            raise
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- load


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        index = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{path / WEIGHTS_INDEX} has an empty weight_map")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) {missing} named in {WEIGHTS_INDEX} are missing")
        return [path / n for n in names]
    raise CheckpointError(f"{path} holds neither {WEIGHTS} nor {WEIGHTS_INDEX}")


def _scan(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape) without reading any tensor data."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if key in found:
                        raise CheckpointError(f"key {key} appears in both {found[key][0].name} and {file.name}")
                    found[key] = (file, tuple(fh.get_slice(key).get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
    return found


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RecurrentLM:
    """A RecurrentLM from an `export` directory or the released huginn-0125 files (sharded or not).

    The key set and every shape are checked against the config before any weight is read. Weights are
    cast to `dtype`; `freqs_cis` is recomputed in fp32; a tied head may be absent or a copy (it must then
    equal `transformer.wte.weight`). The model is built on the meta device and the tensors are assigned,
    so no random init runs. Returned in train mode, like a freshly built model.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
    cfg, rec = config_from_hf(config)
    expected = hf_state_dict_shapes(cfg)
    found = _scan(_weight_files(path))
    optional = {"freqs_cis"} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    _check_layout({k: v[1] for k, v in found.items()}, expected, optional, str(path))

    sd: dict[str, Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, (file, _) in found.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as fh:
            for key in keys:
                if key != "freqs_cis":
                    sd[key] = fh.get_tensor(key).to(dtype).contiguous()
    if cfg.tie_embeddings:
        head = sd.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, sd["transformer.wte.weight"]):
            raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, but the config "
                                  "ties them (tie_embeddings=true)")
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    sd["freqs_cis"] = rope_table(cfg.head_dim, cfg.block_size, cfg.rope_base)

    with torch.device("meta"):
        model = RecurrentLM(cfg, rec)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True gives each module its own Parameter object: re-tie
        model.lm_head.weight = model.transformer.wte.weight
    return model
