"""Stage `shard`: pack shuffled documents into block_size+1 rows and write fixed-size WebDataset tar shards.

Policies (spec/data.md §4): `huginn` reproduces the reference packer (overflow carried only after a
"sacred" document, otherwise incinerated; optional per-batch tail loss), `truncate` never carries, `carry`
cuts a continuous stream and loses nothing (the last row is padded, pad labels are ignored). Every sample
is `{key}.tokens.npy` (uint16/uint32 [block_size+1]) + `{key}.meta.json` ({doc_starts, source_ids}) in an
uncompressed tar; `index.json` lists per-shard rows, bytes and sha256 plus the dataset fingerprint.
Unit = one shard: a rerun re-derives the (cheap, deterministic) packing and rewrites only missing shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from recdepth.errors import DataError
from recdepth.prep.config import PrepConfig, ShardConfig
from recdepth.prep.manifest import (
    UnitLog,
    atomic_write_bytes,
    atomic_write_json,
    digests,
    finish_stage,
    read_manifest,
    sha256_json,
    summary_line,
    tmp_path_for,
)

SPLITS = ("train", "val")


class Packer:
    """Turns a stream of documents into rows of exactly `row_len` tokens under one packing policy."""

    def __init__(self, row_len: int, policy: str, pad_id: int, dtype: np.dtype, batch_docs: int = 0):
        self.L, self.policy, self.pad_id, self.dtype = row_len, policy, pad_id, dtype
        self.batch_docs = batch_docs
        self.segs: deque[list] = deque()  # [tokens, source_id, starts_a_document]
        self.n = 0
        self.last_sacred = False
        self.docs_in_batch = 0
        self.kept = self.discarded = self.padded = 0
        self.discarded_by_source: dict[int, int] = {}

    def _take(self) -> tuple[np.ndarray, dict]:
        """Cut the first L tokens off the buffer as one row."""
        parts, starts, sources, off = [], [], [], 0
        while off < self.L:
            seg = self.segs[0]
            arr, src, is_start = seg
            need = self.L - off
            piece = arr[:need]
            if is_start:
                starts.append(off)
            sources.append(int(src))
            parts.append(piece)
            off += len(piece)
            if len(arr) > need:
                seg[0], seg[2] = arr[need:], False
            else:
                self.segs.popleft()
        self.n -= self.L
        self.kept += self.L
        return np.concatenate(parts), {"doc_starts": starts, "source_ids": sources}

    def _discard(self) -> None:
        for arr, src, _ in self.segs:
            self.discarded_by_source[int(src)] = self.discarded_by_source.get(int(src), 0) + len(arr)
        self.discarded += self.n
        self.segs.clear()
        self.n = 0

    def _flush_full(self) -> Iterator[tuple[np.ndarray, dict]]:
        if self.policy == "carry" or (self.policy == "huginn" and self.last_sacred):
            while self.n >= self.L:
                yield self._take()
        elif self.n >= self.L:
            yield self._take()
            self._discard()

    def feed(self, ids: np.ndarray, source_id: int, sacred: bool) -> Iterator[tuple[np.ndarray, dict]]:
        """Add one document (BOS … EOS); yields the rows that became complete."""
        if self.policy == "carry":
            self.segs.append([ids, source_id, True])
            self.n += len(ids)
            yield from self._flush_full()
            return
        yield from self._flush_full()
        self.segs.append([ids, source_id, True])
        self.n += len(ids)
        self.last_sacred = sacred and self.policy == "huginn"
        self.docs_in_batch += 1
        if self.batch_docs and self.docs_in_batch == self.batch_docs:  # the reference drops each batch's tail
            self._discard()
            self.docs_in_batch = 0

    def finish(self) -> Iterator[tuple[np.ndarray, dict]]:
        """End of stream: carry pads its last row (no loss); the other policies drop the tail, counted."""
        if self.policy == "carry":
            if self.n:
                pad = self.L - self.n
                self.segs.append([np.full(pad, self.pad_id, dtype=self.dtype), -1, False])
                self.n += pad
                row, meta = self._take()
                self.kept -= pad
                self.padded += pad
                meta["source_ids"] = [s for s in meta["source_ids"] if s >= 0]
                yield row, meta
            return
        yield from self._flush_full()
        self._discard()


# ------------------------------------------------------------------------------------------------ tars


def _npy_header(dtype: np.dtype, row_len: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(row_len, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -row_len * dtype.itemsize]


def _header_template() -> tuple[bytes, int]:
    """A ustar header with name, size and checksum blank, and the byte sum of its fixed fields."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = 0, 0, 0o644
    h = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    h[0:100], h[124:136], h[148:156] = b"\0" * 100, b"\0" * 12, b" " * 8
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def _member(name: str, data: bytes) -> bytes:
    """One tar member; the same bytes as tarfile's USTAR header (mtime 0, mode 644, root), built ~10x faster."""
    nb, sz = name.encode(), b"%011o\0" % len(data)
    if len(nb) > 99:
        raise ValueError(f"tar member name too long: {name}")
    h = bytearray(_TEMPLATE)
    h[0 : len(nb)], h[124:136] = nb, sz
    h[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(nb) + sum(sz))
    return bytes(h) + data + b"\0" * ((-len(data)) % tarfile.BLOCKSIZE)


def write_shard(path: Path, first_key: int, rows: list[tuple[np.ndarray, dict]], npy_header: bytes) -> None:
    """An uncompressed WebDataset tar, deterministic to the byte (fixed mtime/owner, sorted member order)."""
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        for i, (row, meta) in enumerate(rows):
            key = f"{first_key + i:012d}"
            f.write(_member(f"{key}.tokens.npy", npy_header + row.tobytes()))
            f.write(_member(f"{key}.meta.json", json.dumps(meta, separators=(",", ":")).encode()))
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- stage


def iter_documents(bucket_files: list[Path]) -> Iterator[tuple[np.ndarray, str]]:
    """(token ids, source) of every document copy, bucket by bucket in order."""
    for path in bucket_files:
        try:
            with pa.memory_map(str(path)) as src:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    col = batch.column("input_ids")
                    offsets = col.offsets.to_numpy()
                    values = col.values.to_numpy(zero_copy_only=False)
                    sources = batch.column("source").to_pylist()
                    for j, s in enumerate(sources):
                        yield values[offsets[j]:offsets[j + 1]], s
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: unreadable or truncated bucket ({e}); rerun stage=shuffle") from e


def shard_split(cfg: PrepConfig, split: str, smn: dict, log: UnitLog, out: Path, remaining: list[int]) -> dict:
    sc: ShardConfig = cfg.shard
    root = Path(cfg.out_dir)
    dtype = np.dtype(smn["totals"]["dtype"])
    ids = smn["totals"]["ids"]
    pad_id = ids.get("pad", ids["eos"])
    L = sc.block_size + 1
    n_b = smn["totals"][f"buckets_{split}"]
    buckets = [root / "shuffled" / split / f"bucket-{b:05d}.arrow" for b in range(n_b)]
    sources = sorted({u["unit"].split("/")[0] for u in read_manifest(root / "tokens", "tokenize")["units"]})
    sid = {s: i for i, s in enumerate(sources)}
    sacred = {sid[s] for s in sc.sacred if s in sid}
    packer = Packer(L, sc.policy, pad_id, dtype, sc.huginn_batch_docs)
    header = _npy_header(dtype, L)
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    fp = {"shuffled": smn["fingerprint"]}
    pending: list[tuple[np.ndarray, dict]] = []
    shards: list[dict] = []
    stopped = False

    def emit(final: bool) -> None:
        nonlocal pending, stopped
        while len(pending) >= sc.rows_per_shard or (final and pending):
            k = len(shards)
            rows, pending = pending[: sc.rows_per_shard], pending[sc.rows_per_shard:]
            name = f"{k:06d}.tar"
            unit = f"{split}/{name}"
            rec = log.done(unit, fp)
            if rec is None:
                if remaining[0] <= 0:
                    stopped = True
                    return
                remaining[0] -= 1
                write_shard(split_dir / name, k * sc.rows_per_shard, rows, header)
                rec = {"unit": unit, "config_hash": log.config_hash, "inputs": fp,
                       "outputs": digests(out, [split_dir / name]), "rows": len(rows)}
                with open(log.path, "a") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                log.records[unit] = rec
            dig = rec["outputs"][unit]
            shards.append({"name": name, "rows": len(rows), "bytes": dig["bytes"], "sha256": dig["sha256"]})

    from tqdm import tqdm

    n_docs = 0
    for ids_, source in tqdm(iter_documents(buckets), desc=f"shard {split}", disable=not cfg.progress,
                             unit="doc", total=smn["totals"][f"{split}_copies"]):
        s = sid[source]
        pending.extend(packer.feed(ids_, s, s in sacred))
        n_docs += 1
        if len(pending) >= sc.rows_per_shard:
            emit(False)
            if stopped:
                return {}
    pending.extend(packer.finish())
    emit(True)
    if stopped:
        return {}
    rows = sum(s["rows"] for s in shards)
    return {
        "shards": shards, "rows": rows, "docs": n_docs, "kept_tokens": packer.kept,
        "discarded_tokens": packer.discarded, "pad_tokens": packer.padded,
        "discarded_by_source": {sources[k]: v for k, v in sorted(packer.discarded_by_source.items())},
    }


def run_shard(cfg: PrepConfig) -> dict | None:
    t0 = time.time()
    root = Path(cfg.out_dir)
    out = root / "shards"
    smn = read_manifest(root / "shuffled", "shuffle")
    tman = read_manifest(root / "tokenizer", "tokenizer")
    config = {"shard": cfg.to_dict()["shard"]}
    log = UnitLog(out, "shard", sha256_json(config), resume=cfg.resume)
    remaining = [cfg.limit_units if cfg.limit_units is not None else 1 << 62]
    per_split = {}
    for split in SPLITS:
        res = shard_split(cfg, split, smn, log, out, remaining)
        if not res:
            return None
        per_split[split] = res
    L = cfg.shard.block_size + 1
    totals = smn["totals"]
    fingerprint = sha256_json({"config": config, "tokenizer": tman["fingerprint"], "shuffled": smn["fingerprint"],
                               "shards": {s: [x["sha256"] for x in r["shards"]] for s, r in per_split.items()}})
    for split, res in per_split.items():
        index = {
            "version": 1, "split": split, "block_size": cfg.shard.block_size, "row_len": L,
            "dtype": totals["dtype"], "vocab_size": totals["vocab_size"], "ids": totals["ids"],
            "rows_per_shard": cfg.shard.rows_per_shard, "policy": cfg.shard.policy, "fingerprint": fingerprint,
            **res,
        }
        atomic_write_json(out / split / "index.json", index)
    atomic_write_bytes(out / "tokenizer.json", (root / "tokenizer" / "tokenizer.json").read_bytes())
    units = [log.records[f"{s}/{x['name']}"] for s, r in per_split.items() for x in r["shards"]]
    summary = {f"{s}_{k}": r[k] for s, r in per_split.items() for k in ("rows", "kept_tokens", "discarded_tokens")}
    summary["train_shards"] = len(per_split["train"]["shards"])
    summary["fingerprint"] = fingerprint
    man = finish_stage(out, "shard", config, cfg.seed, {"shuffled": smn["fingerprint"],
                       "tokenizer": tman["fingerprint"]}, units, [], summary, 0.0, 1)
    print(summary_line("shard", {k: v for k, v in summary.items() if k != "fingerprint"}, log.skipped,
                       len(units), out, time.time() - t0))
    return man
