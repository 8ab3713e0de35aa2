"""Stage `shuffle`: one global, exactly reproducible shuffle of all documents, in bounded memory.

A two-pass bucket shuffle whose second pass writes nothing. Pass 1 (this stage; unit = token file) expands
each document into its copies (⌊w⌋ plus one more with probability frac(w), a keyed draw on (seed, doc_id);
validation documents are never repeated) and scatters the copies to B buckets with a generator seeded from
(seed, split, file): `shuffled/{split}/part-*.arrow`, record batch b holding that file's copies sent to
bucket b. Pass 2 reads bucket b as batch b of every part, in file order, permuted by its own
generator of (seed, split, b) (`BucketReader`); the `shard` stage reads the documents in that order straight
from the parts, so the corpus is written once here instead of twice. Peak memory is about one token
file here and one bucket (`shuffle.bucket_mb`) in `shard`, whatever the size of the corpus.
"""

from __future__ import annotations

import json
import math
import mmap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recdepth.errors import DataError
from recdepth.prep.config import PrepConfig
from recdepth.prep.manifest import (
    UnitLog,
    finish_stage,
    keyed_uniform,
    open_arrow,
    read_manifest,
    rng,
    run_units,
    sha256_json,
    summary_line,
    write_arrow,
)

SPLITS = ("train", "val")
COLUMNS = ["doc_id", "source", "input_ids"]


def _list_parts(chunks: list) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """The values of list arrays (one per chunk) and, per row over all chunks: chunk, start in it, length."""
    vals, part, start, length = [], [], [], []
    for k, arr in enumerate(chunks):
        offsets = arr.offsets.to_numpy().astype(np.int64)
        vals.append(arr.values.to_numpy(zero_copy_only=False))
        part.append(np.full(len(arr), k, dtype=np.int64))
        start.append(offsets[:-1])
        length.append(np.diff(offsets))
    if not vals:
        return [], *(np.zeros(0, dtype=np.int64) for _ in range(3))
    return vals, np.concatenate(part), np.concatenate(start), np.concatenate(length)


def _gather_lists(parts: tuple, rows: np.ndarray, list_type: pa.DataType, dtype: np.dtype) -> pa.ListArray:
    """The lists at `rows` (indices over all chunks), in that order, as one list array: the result of
    `take`, built by copying each list's slice once (many times faster than Arrow's take for long lists)."""
    vals, part, start, length = parts
    p, s, n = part[rows], start[rows], length[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    if len(rows) and len(vals) == 1:
        v = vals[0]
        values = np.concatenate([v[a:b] for a, b in zip(s.tolist(), (s + n).tolist())])
    elif len(rows):
        values = np.concatenate([vals[k][a:b] for k, a, b in zip(p.tolist(), s.tolist(), (s + n).tolist())])
    else:
        values = np.zeros(0, dtype=dtype)
    if offsets[-1] >= 2**31:
        raise DataError(f"{offsets[-1]} tokens in one list column exceed the int32 offsets of {list_type}")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values), type=list_type)


def _take_small(col: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """`take` of a narrow column (ids, sources) as one array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.take(pa.array(rows, type=pa.int64()))


def _copies(sub_sources: pa.Array, doc_ids: pa.Array, weights: dict, seed: int) -> np.ndarray:
    """⌊w⌋ plus one more copy with probability frac(w), w the weight of each document's source."""
    enc = pc.dictionary_encode(sub_sources)
    per = np.array([weights.get(x, 1.0) for x in enc.dictionary.to_pylist()], dtype=np.float64)
    w = per[enc.indices.to_numpy(zero_copy_only=False)] if len(per) else np.zeros(0)
    base = np.floor(w)
    copies = base.astype(np.int64)
    if np.any(w != base):  # integer weights need no draw: u < 0 never holds
        u = keyed_uniform(seed, "upsample", doc_ids.to_pylist())
        copies += u < w - base
    return copies


def scatter_unit(args: tuple) -> dict:
    """Pass 1: one token file → `{split}/part-*.arrow`, batch b holding the copies sent to bucket b."""
    src, stage_dir, rel, unit_index, n_buckets, weights, seed = args
    try:
        table = open_arrow(src, "tokenize").read_all().select(["doc_id", "source", "split", "input_ids"])
    except (OSError, pa.ArrowException, KeyError) as e:
        raise DataError(f"{src}: unreadable or truncated token file ({e}); rerun stage=tokenize") from e
    outputs, counts = {}, {}
    split_col = table.column("split").to_numpy()
    ids_field = table.schema.field("input_ids")
    dtype = np.dtype(ids_field.type.value_type.to_pandas_dtype())
    parts = _list_parts(table.column("input_ids").chunks)
    schema = table.select(COLUMNS).schema.append(pa.field("copy", pa.uint16()))
    doc_col, src_col = table.column("doc_id").combine_chunks(), table.column("source").combine_chunks()
    for s, split in enumerate(SPLITS):
        idx = np.flatnonzero(split_col == s)
        if split == "train" and len(idx):
            ix = pa.array(idx, type=pa.int64())
            copies = _copies(src_col.take(ix), doc_col.take(ix), weights, seed)
        else:
            copies = np.ones(len(idx), dtype=np.int64)
        rows = np.repeat(np.arange(len(idx)), copies)
        copy_no = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
        nb = n_buckets[split]
        bucket = rng(seed, "bucket", split, unit_index).integers(0, nb, size=len(rows))
        order = np.argsort(bucket, kind="stable")
        take = idx[rows[order]]
        batch = pa.RecordBatch.from_arrays([
            _take_small(doc_col, take), _take_small(src_col, take), _gather_lists(parts, take, ids_field.type, dtype),
            pa.array(copy_no[order].astype(np.uint16)),
        ], schema=schema)  # fmt: skip
        bounds = np.searchsorted(bucket[order], np.arange(nb + 1)).tolist()
        name = f"{split}/{part_name(rel)}"
        outputs[name] = write_arrow(Path(stage_dir) / name, schema,
                                    (batch.slice(bounds[b], bounds[b + 1] - bounds[b]) for b in range(nb)))
        counts[f"{split}_docs"] = len(idx)
        counts[f"{split}_copies"] = len(rows)
        counts[f"{split}_tokens"] = int(parts[3][take].sum())
        del batch
    del table, parts, doc_col, src_col
    return {"outputs": outputs, **counts, "quarantine": []}


def part_name(token_rel: str) -> str:
    """The scatter file of a token file: `{source}/part-i.arrow` → `{source}__part-i.arrow` (one flat dir)."""
    return token_rel.replace("/", "__")


@dataclass
class Bucket:
    """One bucket's document copies in shuffled order, as views into the bucket's batches."""

    docs: list[np.ndarray]  # token ids of each copy
    sources: pa.Array  # source name of each copy
    lens: np.ndarray  # int64 length of each copy


class BucketReader:
    """Pass 2 over one split: bucket b is batch b of every scatter part, in part order, permuted by its own
    generator of (seed, split, b). Parts are memory-mapped (batches are zero-copy views) and up to
    `max_open` stay mapped between buckets (the rest are remapped per bucket), so footers are parsed once
    without running out of file descriptors. `bucket` first drops the pages of the previous bucket from
    this process (madvise DONTNEED: they stay in the page cache and fault back in if still used), so only
    about one bucket is resident whatever the size of the parts."""

    def __init__(self, parts: list[Path], seed: int, split: str, max_open: int = 256):
        self.parts, self.seed, self.split, self.max_open = parts, seed, split, max_open
        self._open: dict[int, tuple[mmap.mmap, pa.ipc.RecordBatchFileReader]] = {}

    def _batch(self, i: int, b: int) -> pa.RecordBatch:
        path = self.parts[i]
        try:
            if i not in self._open:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mm)))
                if len(self._open) >= self.max_open:
                    return reader.get_batch(b)
                self._open[i] = (mm, reader)
            return self._open[i][1].get_batch(b)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(f"{path}: unreadable or truncated scatter file ({e}); rerun stage=shuffle") from e

    def bucket(self, b: int) -> Bucket:
        for mm, _ in self._open.values():
            if hasattr(mmap, "MADV_DONTNEED"):  # (not on every platform; residency is then the OS's call)
                mm.madvise(mmap.MADV_DONTNEED)
        values, where, lens, sources = [], [], [], []
        for i in range(len(self.parts)):
            batch = self._batch(i, b)
            col = batch.column("input_ids")
            offsets = col.offsets.to_numpy()
            values.append(col.values.to_numpy(zero_copy_only=False))
            where.append(np.stack([np.full(len(col), i), offsets[:-1]]))
            lens.append(np.diff(offsets))
            sources.append(batch.column("source"))
        if not values:
            return Bucket([], pa.array([], pa.string()), np.zeros(0, np.int64))
        part_start = np.concatenate(where, axis=1)
        n_all = np.concatenate(lens)
        perm = rng(self.seed, "permute", self.split, b).permutation(len(n_all))
        lens = n_all[perm].astype(np.int64)
        part, start, n = part_start[0][perm].tolist(), part_start[1][perm].tolist(), lens.tolist()
        docs = [values[p][a : a + k] for p, a, k in zip(part, start, n)]
        names = pa.chunked_array(sources, pa.string()).combine_chunks()
        return Bucket(docs, names.take(pa.array(perm, type=pa.int64())), lens)


def scatter_parts(stage_dir: Path, split: str, man: dict) -> list[Path]:
    """The scatter files of `split`, in the order `BucketReader` concatenates them."""
    return sorted(stage_dir / rel for u in man["units"] for rel in u["outputs"] if rel.startswith(f"{split}/"))


def n_buckets(tokens_man: dict, weights: dict[str, float], bucket_mb: float) -> dict[str, int]:
    """Buckets per split from the expected bytes after upsampling, so each is about `bucket_mb`."""
    train = val = 0.0
    for u in tokens_man["units"]:
        src = u["unit"].split("/")[0]
        frac_val = u["val_docs"] / max(u["docs"], 1)
        train += u["bytes"] * (1 - frac_val) * weights.get(src, 1.0)
        val += u["bytes"] * frac_val
    return {"train": max(1, math.ceil(train / (bucket_mb * 2**20))), "val": max(1, math.ceil(val / (bucket_mb * 2**20)))}


def run_shuffle(cfg: PrepConfig) -> dict | None:
    t0 = time.time()
    root = Path(cfg.out_dir)
    tok_dir, out = root / "tokens", root / "shuffled"
    tman = read_manifest(tok_dir, "tokenize")
    weights = dict(cfg.shuffle.weights)
    config = {"shuffle": cfg.to_dict()["shuffle"], "seed": cfg.seed}
    inputs = {"tokens": tman["fingerprint"]}
    prev = out / "manifest.json"
    if cfg.resume and prev.exists():
        old = json.loads(prev.read_text())
        if old.get("config_hash") == sha256_json(config) and old.get("inputs") == inputs:
            print(f"[shuffle] already finished → {out}")
            return old
    log = UnitLog(out, "shuffle", sha256_json(config), resume=cfg.resume)
    nb = n_buckets(tman, weights, cfg.shuffle.bucket_mb)
    limit = cfg.limit_units
    tasks = []
    for i, u in enumerate(sorted(tman["units"], key=lambda r: r["unit"])):
        for rel, dig in u["outputs"].items():
            args = (str(tok_dir / rel), str(out), rel, i, nb, weights, cfg.seed)
            tasks.append((rel, {"tokens": dig["sha256"], "buckets": nb}, args))
    records, complete = run_units(log, tasks, scatter_unit, cfg.workers, limit, cfg.progress, "shuffle")
    if not complete:
        return None
    totals: dict = {"buckets_train": nb["train"], "buckets_val": nb["val"]}
    for split in SPLITS:
        for k in ("docs", "copies", "tokens"):
            totals[f"{split}_{k}"] = sum(r[f"{split}_{k}"] for r in records)
    totals.update({"dtype": tman["totals"]["dtype"], "vocab_size": tman["totals"]["vocab_size"],
                   "ids": tman["totals"]["ids"]})
    units = [{k: v for k, v in r.items() if k != "quarantine"} for r in records]
    man = finish_stage(out, "shuffle", config, cfg.seed, inputs, units, [], totals, 0.0, 1)
    print(summary_line("shuffle", {k: totals[k] for k in ("train_copies", "val_copies", "train_tokens")},
                       log.skipped, len(tasks), out, time.time() - t0))
    return man
