"""Stage `shuffle`: one global, exactly reproducible shuffle of all documents, in bounded memory.

Pass 1 (unit = token file) expands each document into its copies (⌊w⌋ plus one more with probability
frac(w), a keyed draw on (seed, doc_id); validation documents are never repeated) and scatters the copies
to B buckets with a generator seeded from (seed, split, file); each file's copies go to one Arrow IPC file
with one record batch per bucket. Pass 2 (unit = bucket) gathers batch b of every scatter file, permutes
it with its own generator and writes `shuffled/{split}/bucket-{b:05d}.arrow`. Peak memory is about one
input file or one bucket (`shuffle.bucket_mb`), whichever is larger, whatever the size of the corpus.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdepth.errors import DataError
from recdepth.prep.config import PrepConfig
from recdepth.prep.manifest import (
    UnitLog,
    digests,
    finish_stage,
    keyed_uniform,
    read_manifest,
    rng,
    run_units,
    sha256_json,
    summary_line,
    tmp_path_for,
)

SPLITS = ("train", "val")
COLUMNS = ["doc_id", "source", "input_ids"]


def _write_ipc(path: Path, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    tmp = tmp_path_for(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        for b in batches:
            w.write_batch(b)
    os.replace(tmp, path)


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
    """Pass 1: one token file → `_scatter/{split}/part-*.arrow`, batch b holding the copies sent to bucket b."""
    src, stage_dir, rel, unit_index, n_buckets, weights, seed = args
    try:
        table = pq.read_table(src, columns=["doc_id", "source", "split", "input_ids"])
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src}: unreadable or truncated token parquet ({e})") from e
    outs, counts = [], {}
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
        flat = [batch.slice(bounds[b], bounds[b + 1] - bounds[b]) if bounds[b + 1] > bounds[b]
                else pa.RecordBatch.from_pylist([], schema=schema) for b in range(nb)]
        out = Path(stage_dir) / "_scatter" / split / rel.replace("/", "__").replace(".parquet", ".arrow")
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_ipc(out, schema, flat)
        outs.append(out)
        counts[f"{split}_docs"] = len(idx)
        counts[f"{split}_copies"] = len(rows)
        counts[f"{split}_tokens"] = int(parts[3][take].sum())
        del batch, flat
    del table, parts, doc_col, src_col
    pa.default_memory_pool().release_unused()  # keep the peak at one unit, not the allocator's high-water mark
    return {"outputs": digests(stage_dir, outs), **counts, "quarantine": []}


def bucket_unit(args: tuple) -> dict:
    """Pass 2: gather bucket b of every scatter file (in file order), permute, write it."""
    stage_dir, split, b, scatter_files, seed = args
    parts = []
    for f in scatter_files:
        with pa.memory_map(f) as src:
            parts.append(pa.ipc.open_file(src).get_batch(b))
    n = sum(p.num_rows for p in parts)
    out = Path(stage_dir) / split / f"bucket-{b:05d}.arrow"
    out.parent.mkdir(parents=True, exist_ok=True)
    if n:
        schema = parts[0].schema
        ids_field = schema.field("input_ids")
        dtype = np.dtype(ids_field.type.value_type.to_pandas_dtype())
        perm = rng(seed, "permute", split, b).permutation(n)
        nonempty = [p for p in parts if p.num_rows]
        cols = []
        for name in schema.names:
            if name == "input_ids":
                lists = _list_parts([p.column(name) for p in nonempty])
                cols.append(_gather_lists(lists, perm, ids_field.type, dtype))
                tokens = int(lists[3].sum())
            else:
                cols.append(_take_small(pa.chunked_array([p.column(name) for p in nonempty], schema.field(name).type),
                                        perm))
        batch = pa.RecordBatch.from_arrays(cols, schema=schema)
        _write_ipc(out, schema, [batch.slice(i, 8192) for i in range(0, n, 8192)])
        del batch, cols, lists
    else:
        schema = pa.ipc.open_file(pa.memory_map(scatter_files[0])).schema if scatter_files else None
        _write_ipc(out, schema or pa.schema([]), [])
        tokens = 0
    del parts
    pa.default_memory_pool().release_unused()
    return {"outputs": digests(stage_dir, [out]), "split": split, "copies": n, "tokens": tokens, "quarantine": []}


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
            tasks.append((f"scatter/{rel}", {"tokens": dig["sha256"], "buckets": nb}, args))
    rec1, complete = run_units(log, tasks, scatter_unit, cfg.workers, limit, cfg.progress, "shuffle pass 1")
    if not complete:
        return None
    used = sum(1 for t in tasks if log.records.get(t[0]) is not None)
    tasks2 = []
    for split in SPLITS:
        files = [str(out / rel) for r in rec1 for rel in r["outputs"] if rel.startswith(f"_scatter/{split}/")]
        fp = sha256_json([r["outputs"] for r in rec1])
        for b in range(nb[split]):
            tasks2.append((f"bucket/{split}/{b:05d}", {"scatter": fp}, (str(out), split, b, files, cfg.seed)))
    limit2 = None if limit is None else max(0, limit - used)
    rec2, complete = run_units(log, tasks2, bucket_unit, cfg.workers, limit2, cfg.progress, "shuffle pass 2")
    if not complete:
        return None
    totals: dict = {"buckets_train": nb["train"], "buckets_val": nb["val"]}
    for split in SPLITS:
        totals[f"{split}_docs"] = sum(r[f"{split}_docs"] for r in rec1)
        totals[f"{split}_copies"] = sum(r[f"{split}_copies"] for r in rec1)
        totals[f"{split}_tokens"] = sum(r[f"{split}_tokens"] for r in rec1)
    totals.update({"dtype": tman["totals"]["dtype"], "vocab_size": tman["totals"]["vocab_size"],
                   "ids": tman["totals"]["ids"]})
    units = [{k: v for k, v in r.items() if k != "quarantine"} for r in rec2]
    man = finish_stage(out, "shuffle", config, cfg.seed, inputs, units, [], totals, 0.0, 1)
    shutil.rmtree(out / "_scatter", ignore_errors=True)
    print(summary_line("shuffle", {k: totals[k] for k in ("train_copies", "val_copies", "train_tokens")},
                       log.skipped, len(tasks) + len(tasks2), out, time.time() - t0))
    return man
