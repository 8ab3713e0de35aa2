"""Training-time data: WebDataset token shards, the resumable mixture stream, loaders.

`build_data(cfg.data, ...)` is the one call the trainer makes; it never sees the model, only the block
size and vocabulary it must fit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from recdepth.config import DataConfig, to_dataclass
from recdepth.data.loader import StatefulLoader, collate, val_batches
from recdepth.data.shards import ShardIndex, load_index, read_shard
from recdepth.data.stream import Row, Source, TokenStream, WeightPhase
from recdepth.errors import ConfigError, DataError


@dataclass
class DataBundle:
    train: StatefulLoader  # (inputs, labels) int64 [B, S]; state_dict()/load_state_dict() restore the next batch
    val: list[tuple[Tensor, Tensor]]  # fixed held-out micro-batches, identical on every call
    vocab_size: int  # the tokenizer's vocabulary size (<= model vocab)
    fingerprint: str  # dataset + mixture fingerprint, stored in checkpoints
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    row_len: int = 0
    tokenizer_path: str | None = None


def resolve_sources(cfg: DataConfig, *, block_size: int, vocab_size: int) -> dict[str, str]:
    """name -> prepared dataset dir; data=sample is built (or found in its cache) here."""
    if cfg.sources:
        unknown = sorted(set(cfg.weights) - set(cfg.sources))
        if unknown:
            raise ConfigError(f"data.weights names {unknown}, which are not in data.sources {sorted(cfg.sources)}")
        return {k: str(v) for k, v in cfg.sources.items()}
    if cfg.path:
        return {cfg.name or "main": str(cfg.path)}
    if cfg.name == "sample":
        from recdepth.data.sample import ensure_sample

        return {"sample": str(ensure_sample(cfg.cache_dir, vocab_size, block_size, cfg.sample_mb))}
    raise ConfigError(f"data.name={cfg.name!r} has neither data.path nor data.sources; set one, or use data=sample")


def prepare_data(cfg: DataConfig, *, block_size: int, vocab_size: int) -> dict[str, str]:
    """Build what must exist before worker processes start (the sample corpus) and check every source."""
    cfg = to_dataclass(cfg, DataConfig)
    paths = resolve_sources(cfg, block_size=block_size, vocab_size=vocab_size)
    for name, path in paths.items():
        if cfg.weights.get(name, 1.0) > 0:
            _check_index(load_index(path, "train"), name, block_size, vocab_size)
    return paths


def _check_index(idx: ShardIndex, name: str, block_size: int, vocab_size: int) -> None:
    if idx.row_len > block_size + 1:
        raise ConfigError(
            f"model.block_size={block_size} is too small for source {name!r}: its shards hold rows of "
            f"{idx.row_len} tokens ({idx.dir}); expected rows of at most model.block_size+1, i.e. "
            f"model.block_size >= {idx.row_len - 1}"
        )
    if idx.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the {idx.vocab_size}-id vocabulary of source {name!r} "
            f"({idx.dir}); expected model.vocab_size >= {idx.vocab_size}"
        )


def build_data(cfg: DataConfig, *, block_size: int, vocab_size: int, micro_batch_size: int, rank: int,
               world_size: int, n_val_batches: int, seed: int) -> DataBundle:
    """Train loader (partitioned, mixed, resumable) and fixed validation batches for one rank."""
    cfg = to_dataclass(cfg, DataConfig)
    paths = resolve_sources(cfg, block_size=block_size, vocab_size=vocab_size)
    sources, val_idx = [], []
    for name, path in sorted(paths.items()):
        weight = float(cfg.weights.get(name, 1.0))
        if weight <= 0 and not any(name in (ph.get("weights") or {}) for ph in cfg.weight_schedule):
            continue
        tr = load_index(path, "train")
        _check_index(tr, name, block_size, vocab_size)
        sources.append(Source(name, tr, weight, cfg.source_exhaustion.get(name, cfg.exhaustion)))
        val_idx.append(load_index(path, "val"))
    if not sources:
        raise ConfigError(f"data.weights gives every source weight 0: {dict(cfg.weights)}")
    first = sources[0].index
    for s in sources[1:]:
        if s.index.vocab_size != first.vocab_size or s.index.ids != first.ids:
            raise DataError(f"sources {sources[0].name!r} and {s.name!r} use different tokenizers "
                            f"({first.dir} vs {s.index.dir}); prepare them with one tokenizer.json")
    schedule = [WeightPhase(int(ph["at"]), {k: float(v) for k, v in (ph.get("weights") or {}).items()})
                for ph in cfg.weight_schedule]
    stream = TokenStream(sources, rank=rank, world_size=world_size, num_workers=cfg.num_workers, seed=seed,
                         batch_rows=micro_batch_size, schedule=schedule, verify=cfg.verify_checksums)
    pad = first.ids.get("pad")
    loader = StatefulLoader(stream, micro_batch_size, pad, prefetch_factor=cfg.prefetch_factor)
    val = val_batches(val_idx, rank, world_size, n_val_batches, micro_batch_size, pad, cfg.verify_checksums)
    fp = hashlib.sha256(json.dumps([stream.fingerprint, [v.fingerprint for v in val_idx]]).encode()).hexdigest()[:16]
    tok = Path(first.dir).parent / "tokenizer.json"
    return DataBundle(train=loader, val=val, vocab_size=first.vocab_size, fingerprint=fp,
                      bos_id=first.ids.get("bos"), eos_id=first.ids.get("eos"), pad_id=pad, row_len=first.row_len,
                      tokenizer_path=str(tok) if tok.exists() else None)


__all__ = [
    "DataBundle", "Row", "ShardIndex", "Source", "StatefulLoader", "TokenStream", "WeightPhase", "build_data",
    "collate", "load_index", "prepare_data", "read_shard", "resolve_sources",
]
