"""Bookkeeping shared by the prep stages: atomic files, seeds, per-unit logs, quarantine, stage manifests.

A stage splits its work into named units. Each unit writes its outputs to temp names, renames them, and only
then appends one line to `_manifest.jsonl`; a rerun skips units whose line is present and whose outputs still
match their checksums, so a stage killed half-way resumes without redoing finished units and ends with the
same bytes as an uninterrupted run. A finished stage writes `manifest.json` (inputs with fingerprints,
per-unit counts, output checksums, config, seed) and `quarantine.jsonl` (every rejected input with a reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from recdepth.errors import DataError

MANIFEST_VERSION = 1


# ------------------------------------------------------------------------------------------ atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync-free, then `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def tmp_path_for(path: str | os.PathLike) -> Path:
    """A temp name beside `path` for writers that need a path rather than bytes (parquet, tar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_arrow(path: str | os.PathLike, schema, batches: Iterable, compression: str | None = None) -> dict:
    """Stream record batches into an Arrow IPC file (`compression`: None, lz4 or zstd buffers), atomically;
    returns its {sha256, bytes}, hashed as the bytes go out (no read-back)."""
    import pyarrow as pa

    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), schema,
                                 options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
                for b in batches:
                    w.write_batch(b)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"sha256": sink.sha.hexdigest(), "bytes": sink.n}


class _HashingWriter:
    """A write-only file object that hashes every byte it passes on."""

    def __init__(self, f):
        self.f, self.sha, self.n, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.sha.update(data)
        self.n += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True


def open_arrow(path: str | os.PathLike, rerun: str):
    """The memory-mapped reader of an Arrow IPC file (decoding on this thread only: stages already run one
    process per core), or a DataError naming it and the stage to rerun."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(pa.memory_map(str(path)), options=pa.ipc.IpcReadOptions(use_threads=False))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable or truncated Arrow file ({e}); rerun stage={rerun}") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_path(path: str | os.PathLike) -> dict:
    """Content fingerprint of an input file or directory (sha256 over sorted files), independent of mtimes."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        size = 0
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
            size += p.stat().st_size
        return {"sha256": h.hexdigest(), "bytes": size}
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------------- seeds


def _word(x: int | str) -> int:
    """A stable 32-bit word for a seed component (strings hashed with blake2b, never Python's `hash`)."""
    if isinstance(x, (int, np.integer)):
        return int(x) & 0xFFFFFFFF
    return int.from_bytes(hashlib.blake2b(str(x).encode(), digest_size=4).digest(), "little")


def seed_seq(seed: int, purpose: str, *unit: int | str) -> np.random.SeedSequence:
    """The one way prep and data derive randomness: `SeedSequence(seed, spawn_key=(purpose, *unit))`."""
    return np.random.SeedSequence(int(seed), spawn_key=tuple(_word(u) for u in (purpose, *unit)))


def rng(seed: int, purpose: str, *unit: int | str) -> np.random.Generator:
    return np.random.default_rng(seed_seq(seed, purpose, *unit))


def keyed_uniform(seed: int, purpose: str, keys: Iterable[str]) -> np.ndarray:
    """Counter-style uniforms in [0, 1), one per key: a pure function of (seed, purpose, key)."""
    prefix = f"{seed}\0{purpose}\0".encode()
    out = [int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") for k in keys]
    return np.asarray(out, dtype=np.uint64).astype(np.float64) / 2.0**64


# ------------------------------------------------------------------------------------------- unit logging


class UnitLog:
    """The append-only `_manifest.jsonl` of a stage dir: one JSON line per finished unit."""

    def __init__(self, stage_dir: str | os.PathLike, stage: str, config_hash: str, resume: bool = True):
        self.dir = Path(stage_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "_manifest.jsonl"
        self.stage = stage
        self.config_hash = config_hash
        self.records: dict[str, dict] = {}
        if not resume:
            self.path.unlink(missing_ok=True)
            (self.dir / "manifest.json").unlink(missing_ok=True)
        elif self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # a kill mid-append: end the torn line so new records parse
                with open(self.path, "a") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a kill: that unit is simply redone
                    continue
                if rec.get("config_hash") == config_hash:
                    self.records[rec["unit"]] = rec
        self.skipped = 0

    def done(self, unit: str, inputs_fp: Any) -> dict | None:
        """The record of `unit` if it finished with the same inputs and its outputs are intact, else None."""
        rec = self.records.get(unit)
        if rec is None or rec.get("inputs") != inputs_fp:
            return None
        for rel, digest in rec.get("outputs", {}).items():
            p = self.dir / rel
            if not p.exists() or p.stat().st_size != digest["bytes"] or sha256_file(p) != digest["sha256"]:
                return None
        self.skipped += 1
        return rec

    def append(self, rec: dict, sync: bool = True) -> dict:
        """Append one unit's record (one JSON line, fsynced unless `sync=False`: a lost line only redoes its
        unit, which stages with many cheap units accept) and remember it."""
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            if sync:
                f.flush()
                os.fsync(f.fileno())
        self.records[rec["unit"]] = rec
        return rec


def finish_stage(
    stage_dir: str | os.PathLike,
    stage: str,
    config: dict,
    seed: int,
    inputs: dict,
    units: list[dict],
    quarantine: list[dict],
    totals: dict,
    max_bad_fraction: float,
    bad_denominator: int,
) -> dict:
    """Write `quarantine.jsonl` and `manifest.json`; fail if more than `max_bad_fraction` was rejected."""
    stage_dir = Path(stage_dir)
    atomic_write_bytes(
        stage_dir / "quarantine.jsonl", "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine).encode()
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": stage,
        "config": config,
        "config_hash": sha256_json(config),
        "seed": seed,
        "inputs": inputs,
        "units": sorted(units, key=lambda r: r["unit"]),
        "totals": totals,
        "quarantined": len(quarantine),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    manifest["fingerprint"] = sha256_json({k: manifest[k] for k in ("config_hash", "inputs", "units")})
    bad = len(quarantine)
    if bad and bad > max_bad_fraction * max(bad_denominator, 1):
        first = quarantine[0]
        raise DataError(
            f"{stage}: {bad} of {bad_denominator} inputs rejected (max_bad_fraction={max_bad_fraction}); "
            f"first: {first.get('input')}: {first.get('reason')}; all listed in {stage_dir / 'quarantine.jsonl'}"
        )
    atomic_write_json(stage_dir / "manifest.json", manifest)
    return manifest


def read_manifest(stage_dir: str | os.PathLike, stage: str) -> dict:
    """The finished manifest of a previous stage, or a DataError saying which stage to run first."""
    path = Path(stage_dir) / "manifest.json"
    if not path.exists():
        raise DataError(f"{path} not found: run `tools/prep.py stage={stage}` first (or it did not finish)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun stage={stage}") from e


def summary_line(stage: str, totals: dict, skipped: int, n_units: int, out: Path, seconds: float) -> str:
    parts = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in totals.items())
    return f"[{stage}] {n_units} units ({skipped} resumed) in {seconds:.1f}s → {out}: {parts}"


# ------------------------------------------------------------------------------------------- unit runner


def digests(base: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """{path relative to base: {sha256, bytes}}, computed where the file was written (in the worker)."""
    base = Path(base)
    return {str(Path(p).relative_to(base)): {"sha256": sha256_file(p), "bytes": Path(p).stat().st_size}
            for p in paths}


def _worker_init() -> None:
    # a forked child must not use the parent's (dead) Rust thread pool: each process encodes single-threaded
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def process_pool(workers: int):
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(workers, initializer=_worker_init)


def run_units(
    log: UnitLog,
    tasks: list[tuple[str, Any, Any]],
    fn,
    workers: int,
    limit: int | None,
    progress: bool,
    desc: str,
) -> tuple[list[dict], bool]:
    """Run `fn(args) -> {outputs, counts..., quarantine}` for every (unit, inputs_fp, args) not yet done.

    Returns the records of all units (resumed ones included) and whether every unit is now finished.
    `limit` caps the number of new units this call runs (the rest are left for a later run).
    """
    from tqdm import tqdm

    records: dict[str, dict] = {}
    todo = []
    for unit, fp, args in tasks:
        rec = log.done(unit, fp)
        if rec is not None:
            records[unit] = rec
        else:
            todo.append((unit, fp, args))
    complete = limit is None or len(todo) <= limit
    if limit is not None:
        todo = todo[:limit]
    bar = tqdm(total=len(tasks), initial=len(records), desc=desc, disable=not progress, unit="unit")

    def _record(unit: str, fp: Any, res: dict) -> None:
        outs = res.pop("outputs")
        records[unit] = log.append({"unit": unit, "config_hash": log.config_hash, "inputs": fp, "outputs": outs, **res})
        bar.update(1)

    if workers <= 1 or len(todo) <= 1:
        for unit, fp, args in todo:
            _record(unit, fp, fn(args))
    else:
        with process_pool(min(workers, len(todo))) as pool:
            for (unit, fp, _), res in zip(todo, pool.imap(fn, [t[2] for t in todo])):
                _record(unit, fp, res)
    bar.close()
    return [records[u] for u, _, _ in tasks if u in records], complete
