"""Stage `ingest`: local text, JSONL, parquet and `datasets` arrow dirs → parquet documents (text, doc_id, source).

Each source declares an adapter (one field, several fields joined, or chat messages rendered with the
reference's template and role mapping). Unlike the reference, a null or empty text is not written as
"None" or kept: it is quarantined with its reason and counted, as are invalid UTF-8 and broken JSON lines.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recdepth.errors import DataError
from recdepth.prep.config import PrepConfig, SourceSpec
from recdepth.prep.manifest import (
    UnitLog,
    digests,
    fingerprint_path,
    finish_stage,
    run_units,
    sha256_json,
    summary_line,
    tmp_path_for,
)

TEXT_EXT = (".txt", ".md", ".py", ".rst", ".tex", ".c", ".h")
DOC_SCHEMA = pa.schema([("text", pa.string()), ("doc_id", pa.string()), ("source", pa.string())])
BEGIN_HEADER, END_HEADER, END_TURN = "<|begin_header|>", "<|end_header|>", "<|end_turn|>"


def render_chat(messages: list[tuple[str, str]], role_map: dict[str, str]) -> str:
    """The reference's pretraining chat rendering (no BOS/EOS: the post-processor adds them per document)."""
    return "".join(
        f"{BEGIN_HEADER}{role_map.get(role, role)}{END_HEADER}\n\n{content.strip()}{END_TURN}"
        for role, content in messages
    )


def _file_format(path: Path, spec: SourceSpec) -> str:
    if spec.format != "auto":
        return spec.format
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "txt"


def expand_inputs(name: str, spec: SourceSpec) -> list[Path]:
    """Sorted files of a source; a `datasets` save_to_disk dir expands to its arrow files."""
    files: set[Path] = set()
    for pattern in spec.inputs:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"ingest source {name!r}: input {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                arrow = sorted(p.rglob("*.arrow"))
                is_hf = any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
                files.update(arrow if is_hf and arrow else (q for q in p.rglob("*") if q.is_file()))
            elif p.is_file():
                files.add(p)
    return sorted(files)


def plan_units(name: str, spec: SourceSpec) -> list[list[Path]]:
    """Text files are grouped (one document each); every other file is its own unit."""
    units: list[list[Path]] = []
    group: list[Path] = []
    for p in expand_inputs(name, spec):
        if _file_format(p, spec) == "txt":
            group.append(p)
            if len(group) == spec.files_per_unit:
                units.append(group)
                group = []
        else:
            units.append([p])
    if group:
        units.append(group)
    return units


# ------------------------------------------------------------------------------------------- adapters


def row_text(row: dict, spec: SourceSpec) -> tuple[str | None, str]:
    """(text, "") or (None, reason) for one structured record."""
    if spec.adapter == "plain":
        if spec.field not in row:
            return None, f"missing field {spec.field!r} (has {sorted(row)[:8]})"
        v = row[spec.field]
        return (None, "null text") if v is None else (str(v), "")
    if spec.adapter == "multi":
        parts = [row.get(f) for f in spec.fields]
        if all(p is None for p in parts):
            return None, f"all of {spec.fields} null or missing"
        return spec.join.join(str(p) for p in parts if p is not None), ""
    # chat
    msgs = row.get(spec.messages_field)
    if isinstance(msgs, (list, tuple)):
        pairs = []
        for m in msgs:
            if not isinstance(m, dict):
                return None, f"message is not a mapping: {type(m).__name__}"
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if role is None or content is None:
                return None, "message without role/from or content/value"
            pairs.append((str(role), str(content)))
        return render_chat(pairs, spec.role_map), ""
    if spec.fields:
        vals = [row.get(f) for f in spec.fields]
        if any(v is None for v in vals):
            return None, f"null chat field among {spec.fields}"
        pairs = [("user", str(vals[0]))] + [("assistant", str(v)) for v in vals[1:]]
        return render_chat(pairs, spec.role_map), ""
    return None, f"no {spec.messages_field!r} list and no chat fields configured"


def _records(path: Path, fmt: str) -> Iterator[tuple[dict | None, str]]:
    """Structured rows of one file as (row, "") or (None, reason); an unreadable file raises DataError."""
    try:
        if fmt == "jsonl":
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rb") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        yield None, f"line {i + 1}: empty line"
                        continue
                    try:
                        obj = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        yield None, f"line {i + 1}: invalid UTF-8 at byte {e.start}"
                        continue
                    except json.JSONDecodeError as e:
                        yield None, f"line {i + 1}: invalid JSON ({e.msg})"
                        continue
                    yield (obj, "") if isinstance(obj, dict) else (None, f"line {i + 1}: not a JSON object")
        elif fmt == "parquet":
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    yield row, ""
        elif fmt == "arrow":
            with open(path, "rb") as f:
                try:
                    reader: Any = pa.ipc.open_stream(f)
                    batches = iter(reader)
                except pa.ArrowInvalid:
                    f.seek(0)
                    reader = pa.ipc.open_file(f)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                for batch in batches:
                    for row in batch.to_pylist():
                        yield row, ""
        else:
            raise DataError(f"{path}: format {fmt!r} is not structured")
    except (OSError, pa.ArrowException, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable or truncated {fmt} file ({type(e).__name__}: {e})") from e


def ingest_unit(args: tuple) -> dict:
    """One unit → docs/{source}/part-{i:05d}.parquet; returns counts, output digests and quarantined rows."""
    stage_dir, source, index, files, spec, on_bad_file, row_group = args
    out = Path(stage_dir) / source / f"part-{index:05d}.parquet"
    texts: list[str] = []
    ids: list[str] = []
    quarantine: list[dict] = []
    n_rows = n_bytes = 0

    def add(text: str | None, reason: str, where: str, row: int) -> None:
        nonlocal n_rows, n_bytes
        n_rows += 1
        if text is not None and not text.strip():
            text, reason = None, "empty text"
        if text is None:
            quarantine.append({"input": where, "row": row, "reason": reason, "source": source})
            return
        texts.append(text)
        ids.append(f"{source}/{index:05d}/{row:07d}")
        n_bytes += len(text.encode("utf-8", "surrogatepass"))

    row = 0
    for path in files:
        fmt = _file_format(path, spec)
        if fmt == "txt":
            try:
                raw = path.read_bytes()
            except OSError as e:
                if on_bad_file == "error":
                    raise DataError(f"{path}: unreadable ({e})") from e
                add(None, f"unreadable file ({e})", str(path), row)
                row += 1
                continue
            try:
                add(raw.decode("utf-8"), "", str(path), row)
            except UnicodeDecodeError as e:
                add(None, f"invalid UTF-8 at byte {e.start}", str(path), row)
            row += 1
            continue
        try:
            for rec, reason in _records(path, fmt):
                if rec is None:
                    add(None, reason, str(path), row)
                else:
                    text, why = row_text(rec, spec)
                    add(text, why, str(path), row)
                row += 1
        except DataError as e:
            if on_bad_file == "error":
                raise
            quarantine.append({"input": str(path), "row": None, "reason": str(e), "source": source})
    table = pa.table({"text": texts, "doc_id": ids, "source": [source] * len(ids)}, schema=DOC_SCHEMA)
    tmp = tmp_path_for(out)
    pq.write_table(table, tmp, row_group_size=row_group, compression="zstd")
    os.replace(tmp, out)
    return {
        "outputs": digests(stage_dir, [out]),
        "docs": len(ids),
        "rows": n_rows,
        "bytes": n_bytes,
        "quarantine": quarantine,
    }


def run_ingest(cfg: PrepConfig) -> dict | None:
    """Run (or resume) the stage; returns the manifest, or None if `limit_units` left units for later."""
    t0 = time.time()
    stage_dir = Path(cfg.out_dir) / "docs"
    specs = cfg.ingest.specs()
    config = {"ingest": {k: v for k, v in cfg.to_dict()["ingest"].items()}}
    log = UnitLog(stage_dir, "ingest", sha256_json(config), resume=cfg.resume)
    tasks = []
    inputs: dict[str, dict] = {}
    for source, spec in specs.items():
        for i, files in enumerate(plan_units(source, spec)):
            fps = {}
            for p in files:
                fps[str(p)] = inputs.setdefault(str(p), fingerprint_path(p))["sha256"]
            args = (str(stage_dir), source, i, files, spec, cfg.ingest.on_bad_file, cfg.ingest.row_group_docs)
            tasks.append((f"{source}/part-{i:05d}", fps, args))
    records, complete = run_units(log, tasks, ingest_unit, cfg.workers, cfg.limit_units, cfg.progress, "ingest")
    if not complete:
        return None
    quarantine = [q for r in records for q in r.get("quarantine", [])]
    totals = {
        "sources": len(specs),
        "files": len(inputs),
        "rows": sum(r["rows"] for r in records),
        "docs": sum(r["docs"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "quarantined": len(quarantine),
    }
    units = [{k: v for k, v in r.items() if k != "quarantine"} for r in records]
    man = finish_stage(stage_dir, "ingest", config, cfg.seed, inputs, units, quarantine, totals,
                       cfg.max_bad_fraction, totals["rows"])
    print(summary_line("ingest", totals, log.skipped, len(tasks), stage_dir, time.time() - t0))
    return man
