"""`data=sample`: a small real corpus on every machine with Python, built once by the real prep stages.

The corpus is the standard library's own `*.py` files (sorted, tests excluded, first `data.sample_mb` MB),
turned into a byte-level BPE tokenizer of the model's vocabulary size and shuffled token shards of
block_size+1 rows by `recdepth.prep`. It is cached under `data.cache_dir` (default ~/.cache/recdepth) in a
dir keyed by vocabulary, block size and a fingerprint of the file list; it is built in a temp dir and
renamed into place, so an interrupted build is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from recdepth.errors import DataError

SAMPLE_VERSION = 1
EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(max_mb: float) -> list[Path]:
    """Sorted non-test standard-library sources, non-empty, up to `max_mb` MB in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDE_DIRS:
            continue
        size = p.stat().st_size
        if size == 0:
            continue
        if total + size > max_mb * 1e6:
            break
        out.append(p)
        total += size
    if not out:
        raise DataError(f"no standard-library sources found under {root} for data=sample")
    return out


def sample_key(files: list[Path], vocab_size: int, block_size: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    listing = [(str(p.relative_to(root)), p.stat().st_size) for p in files]
    h = hashlib.sha256(json.dumps([SAMPLE_VERSION, sys.version_info[:2], listing]).encode()).hexdigest()[:10]
    return f"sample-v{vocab_size}-b{block_size}-{h}"


def sample_dir(cache_dir: str | None, vocab_size: int, block_size: int, max_mb: float) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "recdepth"
    return base / sample_key(stdlib_files(max_mb), vocab_size, block_size)


def sample_overrides(files: list[Path], vocab_size: int, block_size: int, workers: int) -> dict:
    """The prep config of the sample corpus (all five stages)."""
    return {
        "seed": 233,
        "workers": workers,
        "progress": False,
        "max_bad_fraction": 0.02,  # a stdlib file that is not UTF-8 is quarantined, not fatal
        "ingest": {"inputs": [str(p) for p in files], "source": "stdlib", "format": "txt", "files_per_unit": 64},
        "tokenizer": {"vocab_size": vocab_size, "specials": "minimal", "rows_per_source": 1 << 20,
                      "max_chars": 1 << 20},
        "tokenize": {"val_fraction": 0.03, "batch_docs": 256},
        "shuffle": {"bucket_mb": 4.0},
        "shard": {"block_size": block_size, "policy": "carry", "rows_per_shard": 128},
    }


def ensure_sample(cache_dir: str | None, vocab_size: int, block_size: int, max_mb: float = 10.0,
                  workers: int | None = None) -> Path:
    """The cached sample dataset dir, built on first use (atomically: temp dir + rename)."""
    files = stdlib_files(max_mb)
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "recdepth"
    final = base / sample_key(files, vocab_size, block_size)
    if (final / "shards" / "manifest.json").exists():
        return final
    from recdepth.prep import prepare

    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    print(f"[data=sample] building {len(files)} standard-library files → {final} (once)", flush=True)
    n_workers = workers if workers is not None else max(1, min(2, os.cpu_count() or 1))
    try:
        prepare(str(tmp), **sample_overrides(files, vocab_size, block_size, n_workers))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep its (identical) result
            if not (final / "shards" / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[data=sample] ready in {time.time() - t0:.1f}s", flush=True)
    return final
