"""WebDataset token shards on disk: find a prepared dataset's index and read a shard's rows, checked.

A shard is an uncompressed tar of `{key}.tokens.npy` (+ `{key}.meta.json`) samples written by
`tools/prep.py stage=shard`; `index.json` beside the shards lists their row counts and sha256. Reading
checks what the index promises: a truncated or unreadable tar, a row of the wrong length or dtype, a
count or checksum mismatch is a DataError naming the shard (no skip-and-continue: ranks stay in lockstep).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recdepth.errors import DataError


@dataclass(frozen=True)
class ShardInfo:
    path: str
    rows: int
    sha256: str | None = None


@dataclass(frozen=True)
class ShardIndex:
    """What `index.json` of one split says: shards, row length, dtype, vocabulary, special ids, fingerprint."""

    dir: str
    split: str
    shards: tuple[ShardInfo, ...]
    row_len: int
    dtype: str
    vocab_size: int
    ids: dict
    fingerprint: str

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def split_dir(path: str | Path, split: str) -> Path:
    """Accept a prep out_dir (with shards/), a shards dir (with train/ val/) or a split dir itself."""
    p = Path(path).expanduser()
    for cand in (p / "shards" / split, p / split, p):
        if (cand / "index.json").exists():
            return cand
    return p / "shards" / split if (p / "shards").exists() else p / split


def load_index(path: str | Path, split: str) -> ShardIndex:
    d = split_dir(path, split)
    idx = d / "index.json"
    if not idx.exists():
        tars = sorted(d.glob("*.tar")) if d.exists() else []
        what = f"{len(tars)} tar file(s) but no index.json" if tars else "no shards"
        raise DataError(
            f"{Path(path)}: {what} for split {split!r}; expected {d}/index.json and *.tar WebDataset shards "
            "written by `tools/prep.py stage=shard` (or use data=sample)"
        )
    try:
        meta = json.loads(idx.read_text())
        shards = tuple(ShardInfo(str(d / s["name"]), int(s["rows"]), s.get("sha256")) for s in meta["shards"])
        out = ShardIndex(str(d), split, shards, int(meta["row_len"]), str(meta["dtype"]), int(meta["vocab_size"]),
                         dict(meta.get("ids", {})), str(meta["fingerprint"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{idx}: malformed shard index ({type(e).__name__}: {e})") from e
    if not out.shards or out.rows == 0:
        raise DataError(f"{d}: index.json lists no rows for split {split!r}; expected at least one non-empty shard (for a small corpus raise tokenize.val_fraction when preparing it)")
    return out


def read_shard(info: ShardInfo, row_len: int, dtype: str, verify: bool = True) -> np.ndarray:
    """All rows of one shard as a [rows, row_len] array, in key order, checked against the index."""
    try:
        data = Path(info.path).read_bytes()
    except OSError as e:
        raise DataError(f"{info.path}: cannot read shard ({e})") from e
    if verify and info.sha256 and hashlib.sha256(data).hexdigest() != info.sha256:
        raise DataError(f"{info.path}: sha256 mismatch with index.json (corrupt or replaced shard)")
    rows: list[np.ndarray] = []
    want = np.dtype(dtype)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if not m.name.endswith(".tokens.npy"):
                    continue
                f = tf.extractfile(m)
                arr = np.load(io.BytesIO(f.read() if f else b""), allow_pickle=False)
                if arr.shape != (row_len,) or arr.dtype != want:
                    raise DataError(
                        f"{info.path}: member {m.name} has shape {arr.shape} dtype {arr.dtype}; expected "
                        f"({row_len},) {want} (a row with the wrong length)"
                    )
                rows.append(arr)
    except (tarfile.TarError, EOFError, ValueError, OSError) as e:
        raise DataError(f"{info.path}: unreadable or truncated tar shard ({type(e).__name__}: {e})") from e
    if len(rows) != info.rows:
        raise DataError(f"{info.path}: {len(rows)} rows, index.json says {info.rows} (truncated shard?)")
    return np.stack(rows) if rows else np.zeros((0, row_len), dtype=want)


def read_shard_meta(info: ShardInfo) -> list[dict]:
    """The meta.json of every row of one shard ({doc_starts, source_ids}), in key order."""
    metas: list[dict] = []
    try:
        with tarfile.open(info.path, mode="r:") as tf:
            for m in tf:
                if m.name.endswith(".meta.json"):
                    f = tf.extractfile(m)
                    metas.append(json.loads(f.read() if f else b"{}"))
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"{info.path}: unreadable meta.json in shard ({type(e).__name__}: {e})") from e
    return metas
