"""Stage `shard`: pack shuffled documents into block_size+1 rows and write fixed-size WebDataset tar shards.

Policies (spec/data.md §4): `huginn` reproduces the reference packer (overflow carried only after a
"sacred" document, otherwise incinerated; optional per-batch tail loss), `truncate` never carries, `carry`
cuts a continuous stream and loses nothing (the last row is padded, pad labels are ignored). Every sample
is `{key}.tokens.npy` (uint16/uint32 [block_size+1]) + `{key}.meta.json` ({doc_starts, source_ids}) in an
uncompressed tar; `index.json` lists per-shard rows, bytes and sha256 plus the dataset fingerprint.
Unit = one shard: a rerun re-derives the (cheap, deterministic) packing and rewrites only missing shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recdepth.errors import DataError
from recdepth.prep.config import PrepConfig, ShardConfig
from recdepth.prep.manifest import (
    UnitLog,
    atomic_write_bytes,
    atomic_write_json,
    finish_stage,
    read_manifest,
    sha256_json,
    summary_line,
    tmp_path_for,
)
from recdepth.prep.shuffle import BucketReader, scatter_parts

SPLITS = ("train", "val")
WRITER_THREADS = 2


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


class StreamPacker:
    """`Packer` over batches of documents at once, with the same rows, meta and counts (tested against it).

    Under every policy the rows are the *kept* tokens in stream order cut every `row_len` tokens, and what a
    document keeps is a prefix of it; so a batch is planned as integers (kept prefix per piece: arithmetic for
    `carry`, a scalar scan for `huginn`/`truncate`) and materialised with one concatenate and a reshape.
    Pieces not yet decided (the packer's buffer) carry over to the next batch.
    """

    def __init__(self, row_len: int, policy: str, pad_id: int, dtype: np.dtype, batch_docs: int = 0):
        self.L, self.policy, self.pad_id, self.dtype = row_len, policy, pad_id, dtype
        self.batch_docs = batch_docs
        self.buf: list[tuple[np.ndarray, int, bool]] = []  # undecided pieces: tokens, source id, starts a doc
        self.n = 0
        self.last_sacred = False
        self.docs_in_batch = 0
        self.kept = self.discarded = self.padded = 0
        self.discarded_by_source: dict[int, int] = {}
        self.kept_by_source: dict[int, int] = {}

    # planning ------------------------------------------------------------------------------------------------

    def _plan_carry(self, lens: np.ndarray, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(kept prefix, visited) per piece when cutting as many full rows as possible (or `rows`)."""
        pos = np.cumsum(lens) - lens
        end = (int(lens.sum()) // self.L if rows is None else rows) * self.L
        keep = np.clip(end - pos, 0, lens)
        return keep, (keep > 0) | ((lens == 0) & (pos < end))

    def _plan_scan(self, lens: list[int], src: list[int], sacred: list[bool], m: int, final: bool):
        """The reference policy's decisions, piece by piece: kept prefix, visited, first undecided piece and
        how much of it is already kept. Pieces [0, m) are the carried-over buffer."""
        L, huginn = self.L, self.policy == "huginn"
        keep, visited = [0] * len(lens), [False] * len(lens)
        lo, used, n = 0, 0, self.n  # buffer = pieces [lo, hi), `used` tokens of piece lo already kept
        last_sacred, in_batch, by_src = self.last_sacred, self.docs_in_batch, self.discarded_by_source
        discarded = 0

        def take(need: int) -> None:
            nonlocal lo, used
            while need > 0:
                t = min(lens[lo] - used, need)
                keep[lo] += t
                visited[lo] = True
                need -= t
                if used + t == lens[lo]:
                    lo, used = lo + 1, 0
                else:
                    used += t

        def discard(hi: int) -> int:
            nonlocal lo, used
            total = 0
            for j in range(lo, hi):
                k = src[j]
                left = lens[j] - (used if j == lo else 0)
                by_src[k] = by_src.get(k, 0) + left
                total += left
            lo, used = hi, 0
            return total

        def flush(hi: int) -> None:
            nonlocal n, discarded
            if n < L:
                return
            if huginn and last_sacred:
                k = n // L
                take(k * L)
                n -= k * L
            else:
                take(L)
                n -= L
                discarded += n
                discard(hi)
                n = 0

        for j in range(m, len(lens)):
            flush(j)
            n += lens[j]
            last_sacred = sacred[j] and huginn
            in_batch += 1
            if self.batch_docs and in_batch == self.batch_docs:
                discarded += n
                discard(j + 1)
                n, in_batch = 0, 0
        if final:
            flush(len(lens))
            discarded += n
            discard(len(lens))
            n = 0
        self.n, self.last_sacred, self.docs_in_batch = n, last_sacred, in_batch
        self.discarded += discarded
        return np.asarray(keep, dtype=np.int64), np.asarray(visited, dtype=bool), lo, used

    # materialising -------------------------------------------------------------------------------------------

    def _rows(self, pieces: list[np.ndarray], src: np.ndarray, starts: np.ndarray, keep: np.ndarray,
              visited: np.ndarray, pad: int = 0, kept: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[bytes]]:
        """The rows made of the kept prefixes of `pieces` (+ `pad` pad ids), and each row's meta.json bytes.
        `kept`: those prefixes when the caller already has them."""
        L = self.L
        if kept is None:
            kept = [pieces[j][:k] for j, k in zip(np.flatnonzero(keep).tolist(), keep[keep > 0].tolist())]
        if pad:
            kept.append(np.full(pad, self.pad_id, dtype=self.dtype))
        n_rows = (int(keep.sum()) + pad) // L
        if not n_rows:
            return np.zeros((0, L), dtype=self.dtype), []
        flat = kept[0] if len(kept) == 1 else np.concatenate(kept)
        rows = flat.reshape(n_rows, L)
        pos = np.cumsum(keep) - keep
        v = np.flatnonzero(visited)
        first = pos[v] // L
        last = np.maximum(first, (pos[v] + keep[v] - 1) // L)
        span = last - first + 1
        row_of = np.repeat(first, span) + np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
        src_of = np.repeat(src[v], span)
        sv = v[starts[v]]
        start_row, start_off = pos[sv] // L, pos[sv] % L
        b_src = np.searchsorted(row_of, np.arange(n_rows + 1)).tolist()
        b_start = np.searchsorted(start_row, np.arange(n_rows + 1)).tolist()
        src_l, off_l = src_of.tolist(), start_off.tolist()
        metas = []
        for r in range(n_rows):
            st = ",".join(map(str, off_l[b_start[r]:b_start[r + 1]]))
            sr = ",".join(map(str, src_l[b_src[r]:b_src[r + 1]]))
            metas.append(f'{{"doc_starts":[{st}],"source_ids":[{sr}]}}'.encode())
        self.kept += n_rows * L - pad
        self.padded += pad
        per_source = np.bincount(src[v], weights=keep[v])
        for k in np.flatnonzero(per_source).tolist():
            self.kept_by_source[k] = self.kept_by_source.get(k, 0) + int(per_source[k])
        return rows, metas

    def _pieces(self, docs, sources, sacred, lens=None):
        """Buffer pieces followed by the batch's documents: arrays of tokens, source ids, start flags, lengths."""
        m = len(self.buf)
        if lens is None:
            lens = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        pieces = [b[0] for b in self.buf] + list(docs)
        src = np.concatenate([np.array([b[1] for b in self.buf], dtype=np.int64), sources.astype(np.int64)])
        is_start = np.concatenate([np.array([b[2] for b in self.buf], dtype=bool), np.ones(len(lens), bool)])
        plens = np.concatenate([np.array([len(b[0]) for b in self.buf], dtype=np.int64), lens])
        sac = [False] * m + sacred.tolist()
        return m, pieces, src, is_start, plens, sac

    def _rebuffer(self, pieces, src, is_start, lo: int, used: int) -> None:
        self.buf = [(pieces[j][used:] if j == lo else pieces[j], int(src[j]), bool(is_start[j]) and not
                     (j == lo and used)) for j in range(lo, len(pieces))]

    def add(self, docs: list[np.ndarray], sources: np.ndarray, sacred: np.ndarray, final: bool = False,
            lens: np.ndarray | None = None) -> tuple[np.ndarray, list[bytes]]:
        """Feed documents (token arrays, source ids, sacred flags, and their lengths if known); returns the rows
        that became complete (after `finish` semantics too when `final`), as [rows, row_len] and meta.json bytes."""
        m, pieces, src, is_start, lens, sac = self._pieces(docs, sources, sacred, lens)
        if self.policy == "carry":
            keep, visited = self._plan_carry(lens)
            left = np.flatnonzero((keep < lens) | ((lens == 0) & ~visited))
            lo = int(left[0]) if len(left) else len(pieces)
            used = int(keep[lo]) if lo < len(pieces) else 0
            # carry keeps a prefix of the stream: whole pieces up to `lo`, then `used` tokens of piece `lo`
            kept = pieces[:lo] + ([pieces[lo][:used]] if used else [])
            rows, metas = self._rows(pieces, src, is_start, keep, visited, kept=kept)
            self.n = int(lens.sum() - keep.sum())
            self._rebuffer(pieces, src, is_start, lo, used)
            if final:
                if self.n:
                    m, pieces, src, is_start, lens, _ = self._pieces([], sources[:0], sacred[:0])
                    pad = self.L - self.n
                    keep, visited = self._plan_carry(lens, rows=1)
                    last, meta = self._rows(pieces, src, is_start, keep, visited, pad=pad)
                    rows, metas = np.concatenate([rows, last]), metas + meta
                self.buf, self.n = [], 0
            return rows, metas
        keep, visited, lo, used = self._plan_scan(lens.tolist(), src.tolist(), sac, m, final)
        rows, metas = self._rows(pieces, src, is_start, keep, visited)
        self._rebuffer(pieces, src, is_start, lo, used)
        return rows, metas

    def finish(self) -> tuple[np.ndarray, list[bytes]]:
        """End of stream (see `Packer.finish`)."""
        return self.add([], np.zeros(0, np.int64), np.zeros(0, bool), final=True)


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


_TEMPLATE_ARR = np.frombuffer(_TEMPLATE, dtype=np.uint8)


def _ascii_digits(x: np.ndarray, width: int, base: int) -> np.ndarray:
    """[n, width] ASCII digits of non-negative integers in `base`, zero-padded on the left."""
    return (x[:, None] // base ** np.arange(width - 1, -1, -1, dtype=np.int64) % base + 48).astype(np.uint8)


def _headers(keys: np.ndarray, suffix: bytes, sizes: np.ndarray) -> np.ndarray:
    """[n, 512] ustar headers `{key:012d}{suffix}` of the given member sizes: `_member`'s header bytes, vectorised."""
    h = np.tile(_TEMPLATE_ARR, (len(keys), 1))
    h[:, :12] = _ascii_digits(keys, 12, 10)
    h[:, 12 : 12 + len(suffix)] = np.frombuffer(suffix, dtype=np.uint8)
    h[:, 124:135] = _ascii_digits(sizes, 11, 8)
    h[:, 148:154] = _ascii_digits(h.sum(axis=1, dtype=np.int64), 6, 8)  # the template's checksum field is spaces
    h[:, 154] = 0
    return h


def _shard_size(rows: np.ndarray, metas: list[bytes], npy_header: bytes) -> int:
    B = tarfile.BLOCKSIZE
    tok = len(npy_header) + rows.shape[1] * rows.dtype.itemsize
    per_row = 2 * B + tok + (-tok) % B
    return len(metas) * per_row + sum(len(m) + (-len(m)) % B for m in metas) + 2 * B


def _fill_shard(buf: memoryview, first_key: int, rows: np.ndarray, metas: list[bytes], npy_header: bytes) -> int:
    """Lay the tar of `rows` ([n, row_len]) and their meta.json bytes into `buf`, every byte written (pads
    zeroed, so a reused buffer is fine); returns the size. The same bytes as `_member` one by one (USTAR,
    mtime 0, mode 644, root, `{key:012d}` names in key order), written as whole-array copies: rows whose
    meta.json spans the same number of blocks have the same record size, so each run of them is one
    [rows, record] view of the buffer."""
    B = tarfile.BLOCKSIZE
    n = len(metas)
    data = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
    h = len(npy_header)
    tok = h + data.shape[1]
    meta_at = B + tok + (-tok) % B  # offset of the meta.json header in a record
    m_len = np.fromiter(map(len, metas), dtype=np.int64, count=n)
    m_blocks = -(-m_len // B)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(meta_at + B + m_blocks * B, out=starts[1:])
    keys = first_key + np.arange(n, dtype=np.int64)
    tok_headers = _headers(keys, b".tokens.npy", np.full(n, tok, dtype=np.int64))
    meta_headers = _headers(keys, b".meta.json", m_len)
    out = np.frombuffer(buf, dtype=np.uint8)
    cuts = [0, *(np.flatnonzero(np.diff(m_blocks)) + 1).tolist(), n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        k = int(m_blocks[a]) * B
        rec = out[starts[a] : starts[b]].reshape(b - a, meta_at + B + k)
        rec[:, :B] = tok_headers[a:b]
        rec[:, B : B + h] = np.frombuffer(npy_header, dtype=np.uint8)
        rec[:, B + h : B + tok] = data[a:b]
        rec[:, B + tok : meta_at] = 0
        rec[:, meta_at : meta_at + B] = meta_headers[a:b]
        rec[:, meta_at + B :] = np.frombuffer(b"".join(m.ljust(k, b"\0") for m in metas[a:b]), dtype=np.uint8).reshape(
            b - a, k)
    end = int(starts[n])
    out[end : end + 2 * B] = 0
    return end + 2 * B


def shard_bytes(first_key: int, rows: np.ndarray, metas: list[bytes], npy_header: bytes) -> bytes:
    """The whole tar of `rows` and their meta.json bytes as one bytes object (see `_fill_shard`)."""
    buf = bytearray(_shard_size(rows, metas, npy_header))
    size = _fill_shard(memoryview(buf), first_key, rows, metas, npy_header)
    return bytes(memoryview(buf)[:size])


_BUFFERS = threading.local()


def write_shard_rows(path: Path, first_key: int, rows: np.ndarray, metas: list[bytes], npy_header: bytes) -> dict:
    """Build a shard in this thread's reused buffer (no fresh memory per shard), write it atomically (temp
    name, rename) and return its {sha256, bytes} without reading it back."""
    need = _shard_size(rows, metas, npy_header)
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) < need:
        buf = _BUFFERS.buf = bytearray(need + need // 8)
    view = memoryview(buf)[: _fill_shard(memoryview(buf), first_key, rows, metas, npy_header)]
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(view)
    os.replace(tmp, path)
    return {"sha256": hashlib.sha256(view).hexdigest(), "bytes": len(view)}


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


def shuffled_documents(root: Path, split: str, smn: dict, sources: list[str]) -> Iterator[tuple[list, np.ndarray,
                                                                                                np.ndarray]]:
    """(token arrays, source ids, lengths) of the shuffled document copies of `split`, bucket by bucket."""
    names = pa.array(sources, pa.string())
    reader = BucketReader(scatter_parts(root / "shuffled", split, smn), smn["seed"], split)
    for b in range(smn["totals"][f"buckets_{split}"]):
        bucket = reader.bucket(b)
        sid = pc.index_in(bucket.sources, value_set=names)
        if sid.null_count:
            unknown = bucket.sources.filter(pc.is_null(sid))[0].as_py()
            raise DataError(f"shuffled/{split} bucket {b}: source {unknown!r} is not in the tokenize manifest")
        yield bucket.docs, sid.to_numpy(zero_copy_only=False).astype(np.int64), bucket.lens


def shard_split(cfg: PrepConfig, split: str, smn: dict, log: UnitLog, out: Path, remaining: list[int]) -> dict:
    sc: ShardConfig = cfg.shard
    root = Path(cfg.out_dir)
    dtype = np.dtype(smn["totals"]["dtype"])
    ids = smn["totals"]["ids"]
    pad_id = ids.get("pad", ids["eos"])
    L = sc.block_size + 1
    sources = sorted({u["unit"].split("/")[0] for u in read_manifest(root / "tokens", "tokenize")["units"]})
    sid = {s: i for i, s in enumerate(sources)}
    is_sacred = np.zeros(len(sources) + 1, dtype=bool)
    is_sacred[[sid[s] for s in sc.sacred if s in sid]] = True
    packer = StreamPacker(L, sc.policy, pad_id, dtype, sc.huginn_batch_docs)
    header = _npy_header(dtype, L)
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    fp = {"shuffled": smn["fingerprint"]}
    R = sc.rows_per_shard
    pending: list[tuple[np.ndarray, list[bytes]]] = []  # blocks of complete rows not yet in a shard
    n_pending = 0
    shards: list[dict] = []
    stopped = False

    def cut(n: int) -> tuple[np.ndarray, list[bytes]]:
        """The first n pending rows, removed from `pending`."""
        nonlocal n_pending
        rows, metas, got = [], [], 0
        while got < n:
            r, m = pending[0]
            k = min(n - got, len(m))
            rows.append(r[:k])
            metas += m[:k]
            if k == len(m):
                pending.pop(0)
            else:
                pending[0] = (r[k:], m[k:])
            got += k
        n_pending -= n
        return (rows[0] if len(rows) == 1 else np.concatenate(rows)), metas

    # shards are built, written and hashed by writer threads (file writes and sha256 release the GIL) while
    # this thread packs; records are appended to the log strictly in shard order, each after its rename
    inflight: deque = deque()  # (name, unit, rows, future or finished record), in shard order
    n_shards = 0

    def settle(block: bool) -> None:
        while inflight and (block or not isinstance(inflight[0][3], Future) or inflight[0][3].done()):
            name, unit, n_rows, job = inflight.popleft()
            if isinstance(job, Future):
                rec = log.append({"unit": unit, "config_hash": log.config_hash, "inputs": fp,
                                  "outputs": {unit: job.result()}, "rows": n_rows}, sync=False)
            else:
                rec = job
            dig = rec["outputs"][unit]
            shards.append({"name": name, "rows": n_rows, "bytes": dig["bytes"], "sha256": dig["sha256"]})

    def emit(final: bool) -> None:
        nonlocal stopped, n_shards
        while n_pending >= R or (final and n_pending):
            k = n_shards
            rows, metas = cut(min(R, n_pending))
            name = f"{k:06d}.tar"
            unit = f"{split}/{name}"
            rec = log.done(unit, fp)
            if rec is None:
                if remaining[0] <= 0:
                    stopped = True
                    return
                remaining[0] -= 1
                rec = pool.submit(write_shard_rows, split_dir / name, k * R, rows, metas, header)
            inflight.append((name, unit, len(metas), rec))
            n_shards += 1
            settle(block=len(inflight) > 2 * WRITER_THREADS)

    from tqdm import tqdm

    n_docs = 0
    with ThreadPoolExecutor(WRITER_THREADS) as pool, tqdm(
            desc=f"shard {split}", disable=not cfg.progress, unit="doc", total=smn["totals"][f"{split}_copies"]) as bar:
        try:
            for docs, source_ids, lens in shuffled_documents(root, split, smn, sources):
                rows, metas = packer.add(docs, source_ids, is_sacred[source_ids], lens=lens)
                if metas:
                    pending.append((rows, metas))
                    n_pending += len(metas)
                n_docs += len(source_ids)
                bar.update(len(source_ids))
                if n_pending >= R:
                    emit(False)
                    if stopped:
                        break
            if not stopped:
                rows, metas = packer.finish()
                if metas:
                    pending.append((rows, metas))
                    n_pending += len(metas)
                emit(True)
        finally:
            settle(block=True)
    if stopped:
        return {}
    rows = sum(s["rows"] for s in shards)
    return {
        "shards": shards, "rows": rows, "docs": n_docs, "kept_tokens": packer.kept,
        "discarded_tokens": packer.discarded, "pad_tokens": packer.padded,
        "sources": sources,  # names of the ids in meta.json source_ids
        "kept_by_source": {sources[k]: v for k, v in sorted(packer.kept_by_source.items())},
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
