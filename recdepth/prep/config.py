"""Typed config of `tools/prep.py` (values in conf/prep.yaml + conf/prep/*.yaml), validated before any work."""

from __future__ import annotations

import dataclasses as dc
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recdepth.errors import ConfigError, require

STAGES = ("ingest", "tokenizer", "tokenize", "shuffle", "shard")  # the pipeline, in order
CHECKS = ("stats",)  # stages that read a finished dataset and write only a report
ADAPTERS = ("plain", "multi", "chat")
FORMATS = ("auto", "txt", "jsonl", "parquet", "arrow")
POLICIES = ("huginn", "carry", "truncate")


@dataclass
class SourceSpec:
    """How one source's files become documents: which files, which format, which fields."""

    inputs: list[str] = dc.field(default_factory=list)  # globs, expanded and sorted
    format: str = "auto"  # auto (by extension; anything unknown is text) | txt | jsonl | parquet | arrow
    adapter: str = "plain"  # plain: one field | multi: fields joined | chat: messages rendered
    field: str = "text"
    fields: list[str] = dc.field(default_factory=list)  # multi: joined with `join`; chat: first=user, rest=assistant
    join: str = "\n"
    messages_field: str = "messages"  # chat: list of {role|from, content|value}
    role_map: dict[str, str] = dc.field(default_factory=lambda: {"gpt": "Huginn", "assistant": "Huginn", "human": "user"})
    files_per_unit: int = 256  # text files are grouped into units of this many (one document per file)

    def __post_init__(self) -> None:
        require(self.format in FORMATS, "ingest.format", self.format, "one of " + ", ".join(FORMATS))
        require(self.adapter in ADAPTERS, "ingest.adapter", self.adapter, "one of " + ", ".join(ADAPTERS))
        require(self.files_per_unit >= 1, "ingest.files_per_unit", self.files_per_unit, "an integer >= 1")
        if self.adapter == "multi":
            require(len(self.fields) >= 1, "ingest.fields", self.fields, "at least one field for adapter=multi")


@dataclass
class IngestConfig:
    """Raw files → parquet documents. `inputs`/`source` is the one-source shortcut; `sources` declares many."""

    inputs: list[str] = dc.field(default_factory=list)
    source: str = "default"
    format: str = "auto"
    adapter: str = "plain"
    field: str = "text"
    fields: list[str] = dc.field(default_factory=list)
    join: str = "\n"
    messages_field: str = "messages"
    role_map: dict[str, str] = dc.field(default_factory=lambda: {"gpt": "Huginn", "assistant": "Huginn", "human": "user"})
    files_per_unit: int = 256
    sources: dict[str, Any] = dc.field(default_factory=dict)  # name -> SourceSpec fields (override the above)
    on_bad_file: str = "error"  # error | quarantine (an unreadable file is recorded and skipped)
    row_group_docs: int = 4096  # rows per parquet row group of the output

    def __post_init__(self) -> None:
        require(self.on_bad_file in ("error", "quarantine"), "ingest.on_bad_file", self.on_bad_file,
                "one of error, quarantine")
        require(self.row_group_docs >= 1, "ingest.row_group_docs", self.row_group_docs, "an integer >= 1")

    def specs(self) -> dict[str, SourceSpec]:
        """Every declared source as a validated SourceSpec (sorted by name)."""
        base = {f.name: getattr(self, f.name) for f in fields(SourceSpec)}
        out: dict[str, SourceSpec] = {}
        if self.inputs:
            out[self.source] = SourceSpec(**base)
        for name, over in sorted(self.sources.items()):
            over = dict(over or {})
            unknown = sorted(set(over) - set(base))
            if unknown:
                raise ConfigError(f"ingest.sources.{name}: unknown field(s) {unknown}; valid: {sorted(base)}")
            out[name] = SourceSpec(**{**base, **over})
        require(bool(out), "ingest.inputs", self.inputs, "at least one input glob (or ingest.sources)")
        for name in out:
            require(name.replace("-", "").replace("_", "").replace(".", "").isalnum(), "ingest.source", name,
                    "a name of letters, digits, '-', '_' or '.'")
        return out


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with `tokenizers`, or an existing tokenizer.json validated and copied."""

    vocab_size: int = 65536
    preset: str | None = None  # huginn: 32 specials at 65504.., aeolian regex, ids asserted
    specials: str = "complete"  # minimal (6) | complete (36) | huginn (32, no tool tokens)
    specials_start: int | None = None  # id of the first special (default: vocab_size - n_specials)
    regex: str = "bytelevel"  # bytelevel (GPT-2, lossless) | aeolian (reference, reconstructed) | a pattern
    regex_fallback: bool = True  # append a catch-all alternative so no character is dropped
    max_token_length: int = 32  # tokens stay shorter than this many bytes (reference: longest = 31)
    min_frequency: int = 2
    rows_per_source: int = 131072
    max_chars: int = 32768
    expect_ids: dict[str, int] = dc.field(default_factory=dict)  # e.g. {bos: 65504, eos: 65505, pad: 65509}
    from_file: str | None = None  # validate and copy this tokenizer.json instead of training

    def __post_init__(self) -> None:
        require(self.vocab_size >= 300, "tokenizer.vocab_size", self.vocab_size, "an integer >= 300")
        require(self.preset in (None, "huginn"), "tokenizer.preset", self.preset, "null or huginn")
        require(self.specials in ("minimal", "complete", "huginn"), "tokenizer.specials", self.specials,
                "one of minimal, complete, huginn")
        require(self.max_token_length >= 2, "tokenizer.max_token_length", self.max_token_length, "an integer >= 2")
        require(self.rows_per_source >= 1, "tokenizer.rows_per_source", self.rows_per_source, "an integer >= 1")
        require(self.max_chars >= 1, "tokenizer.max_chars", self.max_chars, "an integer >= 1")
        if self.preset == "huginn":
            self.specials = "huginn"
            self.regex = "aeolian" if self.regex == "bytelevel" else self.regex
            self.specials_start = 65504 if self.specials_start is None else self.specials_start
            self.expect_ids = {"bos": 65504, "eos": 65505, "end_turn": 65508, "pad": 65509, **self.expect_ids}


@dataclass
class TokenizeConfig:
    """Documents → token ids with BOS/EOS, split into train/val by document id."""

    dtype: str = "auto"  # auto (uint16 when the vocabulary fits) | uint16 | uint32
    batch_docs: int = 1024
    val_fraction: float = 0.005

    def __post_init__(self) -> None:
        require(self.dtype in ("auto", "uint16", "uint32"), "tokenize.dtype", self.dtype, "one of auto, uint16, uint32")
        require(self.batch_docs >= 1, "tokenize.batch_docs", self.batch_docs, "an integer >= 1")
        require(0 <= self.val_fraction < 1, "tokenize.val_fraction", self.val_fraction, "a float in [0, 1)")


@dataclass
class ShuffleConfig:
    """Global two-pass bucket shuffle; document-level upsampling weights per source (train split only)."""

    bucket_mb: float = 256.0  # target bucket size: stage=shard holds one bucket, stage=shuffle one token file
    weights: dict[str, float] = dc.field(default_factory=dict)  # source -> weight (⌊w⌋ copies + Bernoulli(frac w))

    def __post_init__(self) -> None:
        require(self.bucket_mb > 0, "shuffle.bucket_mb", self.bucket_mb, "a positive float")
        for k, w in self.weights.items():
            require(math.isfinite(w) and w >= 0, f"shuffle.weights.{k}", w, "a finite float >= 0")


@dataclass
class ShardConfig:
    """Pack documents into block_size+1 rows and write fixed-size WebDataset tar shards."""

    block_size: int = 4096
    policy: str = "carry"  # carry (no loss) | huginn (the reference, drops overflow) | truncate
    rows_per_shard: int = 1024
    sacred: list[str] = dc.field(default_factory=list)  # sources whose overflow is carried (policy huginn)
    huginn_batch_docs: int = 0  # >0: emulate the reference's per-batch tail loss every this many documents

    def __post_init__(self) -> None:
        require(self.block_size >= 1, "shard.block_size", self.block_size, "an integer >= 1")
        require(self.policy in POLICIES, "shard.policy", self.policy, "one of " + ", ".join(POLICIES))
        require(self.rows_per_shard >= 1, "shard.rows_per_shard", self.rows_per_shard, "an integer >= 1")
        require(self.huginn_batch_docs >= 0, "shard.huginn_batch_docs", self.huginn_batch_docs, "an integer >= 0")


@dataclass
class PrepConfig:
    """The root of conf/prep.yaml."""

    stage: str = "ingest"
    out_dir: str = "data"
    seed: int = 233
    workers: int = 2
    resume: bool = True  # skip units whose manifest line matches; false starts the stage afresh
    limit_units: int | None = None  # process at most this many new units, then stop (split work across runs)
    max_bad_fraction: float = 0.0  # quarantined inputs above this fraction fail the stage
    progress: bool = True
    ingest: IngestConfig = dc.field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = dc.field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = dc.field(default_factory=TokenizeConfig)
    shuffle: ShuffleConfig = dc.field(default_factory=ShuffleConfig)
    shard: ShardConfig = dc.field(default_factory=ShardConfig)

    def __post_init__(self) -> None:
        require(self.stage in STAGES + CHECKS, "stage", self.stage, "one of " + ", ".join(STAGES + CHECKS))
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")
        require(self.limit_units is None or self.limit_units >= 0, "limit_units", self.limit_units,
                "null or an integer >= 0")
        require(0 <= self.max_bad_fraction <= 1, "max_bad_fraction", self.max_bad_fraction, "a float in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"ingest": IngestConfig, "tokenizer": TokenizerConfig, "tokenize": TokenizeConfig,
             "shuffle": ShuffleConfig, "shard": ShardConfig}


def prep_config(cfg: Any = None, **overrides: Any) -> PrepConfig:
    """Build a validated PrepConfig from a Hydra/OmegaConf node or a plain dict (unknown keys are errors)."""
    if isinstance(cfg, PrepConfig):
        raw: dict = cfg.to_dict()
    elif isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    else:
        raw = dict(cfg or {})
    raw.pop("hydra", None)
    for k, v in overrides.items():
        if k in _SECTIONS and isinstance(v, dict):
            raw[k] = {**(raw.get(k) or {}), **v}
        else:
            raw[k] = v
    known = {f.name for f in fields(PrepConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown prep field(s) {unknown}; valid: {sorted(known)}")
    for name, schema in _SECTIONS.items():
        sec = raw.get(name) or {}
        if isinstance(sec, schema):
            continue
        bad = sorted(set(sec) - {f.name for f in fields(schema)})
        if bad:
            raise ConfigError(f"unknown field(s) {bad} in {name}; valid: {sorted(f.name for f in fields(schema))}")
        raw[name] = schema(**sec)
    return PrepConfig(**raw)
