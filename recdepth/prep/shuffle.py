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


def scatter_unit(args: tuple) -> dict:
    """Pass 1: one token file → `_scatter/{split}/part-*.arrow`, batch b holding the copies sent to bucket b."""
    src, stage_dir, rel, unit_index, n_buckets, weights, seed = args
    try:
        table = pq.read_table(src, columns=["doc_id", "source", "split", "input_ids"])
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src}: unreadable or truncated token parquet ({e})") from e
    outs, counts = [], {}
    split_col = table.column("split").to_numpy()
    for s, split in enumerate(SPLITS):
        idx = np.flatnonzero(split_col == s)
        sub = table.take(pa.array(idx)).select(COLUMNS)
        if split == "train" and len(sub):
            sources = sub.column("source").to_pylist()
            w = np.array([weights.get(x, 1.0) for x in sources])
            u = keyed_uniform(seed, "upsample", sub.column("doc_id").to_pylist())
            copies = np.floor(w).astype(np.int64) + (u < w - np.floor(w))
        else:
            copies = np.ones(len(sub), dtype=np.int64)
        rows = np.repeat(np.arange(len(sub)), copies)
        copy_no = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
        nb = n_buckets[split]
        bucket = rng(seed, "bucket", split, unit_index).integers(0, nb, size=len(rows))
        order = np.argsort(bucket, kind="stable")
        expanded = sub.take(pa.array(rows[order])).append_column("copy", pa.array(copy_no[order].astype(np.uint16)))
        bounds = np.searchsorted(bucket[order], np.arange(nb + 1))
        batches = [expanded.slice(bounds[b], bounds[b + 1] - bounds[b]).combine_chunks().to_batches(
            max_chunksize=max(1, int(bounds[b + 1] - bounds[b])))
            for b in range(nb)]
        schema = expanded.schema
        flat = [bs[0] if bs else pa.RecordBatch.from_pylist([], schema=schema) for bs in batches]
        out = Path(stage_dir) / "_scatter" / split / rel.replace("/", "__").replace(".parquet", ".arrow")
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_ipc(out, schema, flat)
        outs.append(out)
        counts[f"{split}_docs"] = len(sub)
        counts[f"{split}_copies"] = len(rows)
        counts[f"{split}_tokens"] = int(pc.sum(pc.list_value_length(expanded.column("input_ids"))).as_py() or 0)
    del table, sub, expanded, batches, flat
    pa.default_memory_pool().release_unused()  # keep the peak at one unit, not the allocator's high-water mark
    return {"outputs": digests(stage_dir, outs), **counts, "quarantine": []}


def bucket_unit(args: tuple) -> dict:
    """Pass 2: gather bucket b of every scatter file (in file order), permute, write it."""
    stage_dir, split, b, scatter_files, seed = args
    parts = []
    for f in scatter_files:
        with pa.memory_map(f) as src:
            parts.append(pa.ipc.open_file(src).get_batch(b))
    table = pa.Table.from_batches(parts).combine_chunks() if parts else None
    n = 0 if table is None else table.num_rows
    out = Path(stage_dir) / split / f"bucket-{b:05d}.arrow"
    out.parent.mkdir(parents=True, exist_ok=True)
    if n:
        perm = rng(seed, "permute", split, b).permutation(n)
        table = table.take(pa.array(perm)).combine_chunks()
        _write_ipc(out, table.schema, table.to_batches(max_chunksize=8192))
        tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
    else:
        schema = pa.ipc.open_file(pa.memory_map(scatter_files[0])).schema if scatter_files else None
        _write_ipc(out, schema or pa.schema([]), [])
        tokens = 0
    del table, parts
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
