"""Stage `tokenize`: documents → token ids with BOS/EOS, in parallel processes, split train/val by document id.

The split is a keyed hash of (seed, doc_id), decided here, before the shuffle stage repeats any document,
so a validation document never leaks into training through upsampling. Ids are stored as uint16 when the
vocabulary fits (the reference format), else uint32; asking for uint16 with a larger vocabulary is an error.
Token files are Arrow IPC with zstd-compressed buffers (`tokens/{source}/part-i.arrow`, same columns and types
as a parquet table would have): an intermediate read once by `shuffle`, which then costs a decompression
instead of parquet's per-value list decoding (3-4x faster to read and to write).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recdepth.errors import ConfigError, DataError
from recdepth.prep.config import PrepConfig
from recdepth.prep.manifest import (
    UnitLog,
    finish_stage,
    keyed_uniform,
    read_manifest,
    run_units,
    sha256_json,
    summary_line,
    write_arrow,
)

_TOKENIZERS: dict = {}


def token_dtype(requested: str, vocab_size: int) -> np.dtype:
    """uint16 when every id fits (auto), else uint32; an explicit uint16 that cannot hold the ids raises."""
    if requested == "uint16" and vocab_size > 2**16:
        raise ConfigError(
            f"tokenize.dtype=uint16 is invalid for tokenizer.vocab_size={vocab_size}: ids reach {vocab_size - 1} "
            "> 65535; use tokenize.dtype=uint32 or auto"
        )
    if requested == "uint32" or vocab_size > 2**16:
        return np.dtype(np.uint32)
    return np.dtype(np.uint16)


def token_file(docs_rel: str) -> str:
    """The token file (relative to tokens/) written for a docs file (relative to docs/)."""
    return str(Path(docs_rel).with_suffix(".arrow"))


def token_schema(dtype: np.dtype) -> pa.Schema:
    return pa.schema([
        ("doc_id", pa.string()), ("source", pa.string()), ("split", pa.int8()), ("n_tokens", pa.uint32()),
        ("input_ids", pa.list_(pa.from_numpy_dtype(dtype))),
    ])  # fmt: skip


def _tokenizer(path: str):
    """The parsed tokenizer of `path`, cached per process and keyed by the file's identity, so a rewritten
    tokenizer.json (a rerun of stage=tokenizer in the same process) is never served stale."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_file(path)
    return _TOKENIZERS[key]


def encode_ids(tok, texts: list[str], dtype: np.dtype, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, offsets) of texts encoded with BOS/EOS; ids beyond `dtype` raise naming `where`."""
    encs = tok.encode_batch_fast(texts, add_special_tokens=True)  # the same ids, without character offsets
    ids = [e.ids for e in encs]
    del encs  # the Encodings (tokens, offsets, masks) are the bulk of the memory: free them early
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32 if lens.sum() < 2**31 else np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and int(flat.max()) > np.iinfo(dtype).max:
        raise DataError(f"{where}: token id {int(flat.max())} does not fit {dtype.name}")
    return flat.astype(dtype), offsets


def tokenize_unit(args: tuple) -> dict:
    """docs/{source}/part-i.parquet → tokens/{source}/part-i.arrow."""
    src, out_dir, rel, tok_path, dtype_name, batch_docs, seed, val_fraction = args
    tok = _tokenizer(tok_path)
    dtype = np.dtype(dtype_name)
    out = Path(out_dir) / token_file(rel)
    try:
        pf = pq.ParquetFile(src)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src}: unreadable or truncated parquet ({e})") from e
    schema = token_schema(dtype)
    counts = dict.fromkeys(("docs", "tokens", "val_docs", "docs_over_4097"), 0)

    def batches():
        for batch in pf.iter_batches(batch_size=batch_docs, columns=["text", "doc_id", "source"]):
            ids = batch.column("doc_id").to_pylist()
            flat, offsets = encode_ids(tok, batch.column("text").to_pylist(), dtype, src)
            lens = np.diff(offsets)
            split = (keyed_uniform(seed, "split", ids) < val_fraction).astype(np.int8)
            values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))  # zero-copy views of both
            yield pa.RecordBatch.from_arrays([
                batch.column("doc_id"), batch.column("source"), pa.array(split), pa.array(lens.astype(np.uint32)),
                values.cast(schema.field("input_ids").type),
            ], schema=schema)  # fmt: skip
            counts["docs"] += len(ids)
            counts["tokens"] += int(lens.sum())
            counts["val_docs"] += int(split.sum())
            counts["docs_over_4097"] += int((lens > 4097).sum())

    digest = write_arrow(out, schema, batches(), compression="zstd")
    return {"outputs": {token_file(rel): digest}, **counts, "bytes": counts["tokens"] * dtype.itemsize,
            "quarantine": []}


def run_tokenize(cfg: PrepConfig) -> dict | None:
    t0 = time.time()
    root = Path(cfg.out_dir)
    docs_dir, out = root / "docs", root / "tokens"
    docs = read_manifest(docs_dir, "ingest")
    tman = read_manifest(root / "tokenizer", "tokenizer")
    vocab = int(tman["totals"]["vocab_size"])
    dtype = token_dtype(cfg.tokenize.dtype, vocab)
    config = {"tokenize": cfg.to_dict()["tokenize"], "seed": cfg.seed}
    log = UnitLog(out, "tokenize", sha256_json(config), resume=cfg.resume)
    tok_path = str(root / "tokenizer" / "tokenizer.json")
    _tokenizer(tok_path)  # parsed once here and inherited by forked workers (loading uses no thread pool)
    tasks = []
    for u in docs["units"]:
        for rel in u["outputs"]:
            fp = {"docs": u["outputs"][rel]["sha256"], "tokenizer": tman["fingerprint"]}
            args = (str(docs_dir / rel), str(out), rel, tok_path, dtype.name, cfg.tokenize.batch_docs, cfg.seed,
                    cfg.tokenize.val_fraction)
            tasks.append((rel, fp, args))
    records, complete = run_units(log, tasks, tokenize_unit, cfg.workers, cfg.limit_units, cfg.progress, "tokenize")
    if not complete:
        return None
    totals = {k: sum(r[k] for r in records) for k in ("docs", "tokens", "val_docs", "docs_over_4097", "bytes")}
    totals.update({"dtype": dtype.name, "vocab_size": vocab, "ids": tman["totals"]["ids"]})
    inputs = {"docs": docs["fingerprint"], "tokenizer": tman["fingerprint"]}
    units = [{k: v for k, v in r.items() if k != "quarantine"} for r in records]
    man = finish_stage(out, "tokenize", config, cfg.seed, inputs, units, [], totals, 0.0, 1)
    print(summary_line("tokenize", {k: totals[k] for k in ("docs", "tokens", "val_docs")}, log.skipped, len(tasks),
                       out, time.time() - t0))
    return man
