"""Stage `stats`: re-read every shard, check it against what the shard stage promised, summarise the dataset.

Independent of the writer: each tar is parsed with the standard library's `tarfile` (`read_shard`,
`read_shard_meta`), its sha256 and row count compared with `index.json`, every row's length, dtype and ids
checked, every `doc_starts` offset checked to hold BOS, and the tokens of each source re-derived from the
meta (a row's segments run from one document start to the next) and compared with the index's
`kept_by_source`. Any mismatch is a DataError naming the shard and row. The result, per split, goes to
`shards/summary.json`: rows, tokens, pad tokens, documents started, BOS tokens, a histogram of documents
started per row, tokens per source and each source's share.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from recdepth.data.shards import ShardIndex, load_index, read_shard, read_shard_meta
from recdepth.errors import DataError
from recdepth.prep.config import PrepConfig
from recdepth.prep.manifest import atomic_write_json, process_pool, summary_line

SPLITS = ("train", "val")


def shard_stats(args: tuple) -> dict:
    """Checks and counts of one shard; `pad` = pad tokens expected at the end of its last row."""
    info, row_len, dtype, vocab_size, bos, pad_id, pad = args
    rows = read_shard(info, row_len, dtype, verify=True)
    metas = read_shard_meta(info)
    if len(metas) != len(rows):
        raise DataError(f"{info.path}: {len(metas)} meta.json members for {len(rows)} rows")
    top = int(rows.max()) if rows.size else 0
    if top >= vocab_size:
        raise DataError(f"{info.path}: token id {top} is outside the vocabulary of {vocab_size}")
    by_source: dict[int, int] = {}
    docs_per_row: dict[int, int] = {}
    for r, (row, meta) in enumerate(zip(rows, metas)):
        starts, sources = list(meta.get("doc_starts", [])), list(meta.get("source_ids", []))
        where = f"{info.path}: row {r}"
        if any(not 0 <= s < row_len for s in starts) or starts != sorted(starts):
            raise DataError(f"{where}: doc_starts {starts} are not sorted offsets in [0, {row_len})")
        if starts and (row[starts] != bos).any():
            bad = [s for s in starts if row[s] != bos][0]
            raise DataError(f"{where}: doc_starts offset {bad} holds id {int(row[bad])}, not BOS {bos}")
        bounds = starts if starts and starts[0] == 0 else [0, *starts]
        if len(bounds) != len(sources):
            raise DataError(f"{where}: {len(sources)} source_ids for {len(bounds)} segments")
        end = row_len - (pad if r == len(rows) - 1 else 0)
        for k, (a, b) in enumerate(zip(bounds, [*bounds[1:], end])):
            by_source[sources[k]] = by_source.get(sources[k], 0) + b - a
        docs_per_row[len(starts)] = docs_per_row.get(len(starts), 0) + 1
    if pad and len(rows) and (rows[-1, row_len - pad :] != pad_id).any():
        raise DataError(f"{info.path}: the last row does not end with {pad} pad tokens ({pad_id}) as index.json says")
    return {"rows": len(rows), "bos_tokens": int((rows == bos).sum()), "by_source": by_source,
            "docs_per_row": docs_per_row}


def split_stats(idx: ShardIndex, meta: dict, workers: int) -> dict:
    bos, pad_id = int(idx.ids["bos"]), int(idx.ids.get("pad", idx.ids["eos"]))
    pad = int(meta.get("pad_tokens", 0))
    tasks = [(info, idx.row_len, idx.dtype, idx.vocab_size, bos, pad_id, pad if k == len(idx.shards) - 1 else 0)
             for k, info in enumerate(idx.shards)]
    if workers > 1 and len(tasks) > 1:
        with process_pool(min(workers, len(tasks))) as pool:
            parts = pool.map(shard_stats, tasks)
    else:
        parts = [shard_stats(t) for t in tasks]
    names = meta.get("sources", [])
    by_source: dict[str, int] = {}
    hist: dict[int, int] = {}
    for p in parts:
        for k, n in p["by_source"].items():
            name = names[k] if 0 <= k < len(names) else str(k)
            by_source[name] = by_source.get(name, 0) + n
        for k, n in p["docs_per_row"].items():
            hist[k] = hist.get(k, 0) + n
    rows = sum(p["rows"] for p in parts)
    if rows != meta.get("rows", rows):
        raise DataError(f"{idx.dir}: shards hold {rows} rows, index.json says {meta['rows']}")
    want = meta.get("kept_by_source")
    if want is not None and {k: v for k, v in by_source.items() if v} != {k: v for k, v in want.items() if v}:
        raise DataError(f"{idx.dir}: tokens per source re-derived from meta.json {by_source} differ from "
                        f"index.json kept_by_source {want}")
    kept = sum(by_source.values())
    return {
        "shards": len(parts), "rows": rows, "tokens": rows * idx.row_len, "pad_tokens": pad,
        "docs_started": sum(k * n for k, n in hist.items()), "bos_tokens": sum(p["bos_tokens"] for p in parts),
        "docs_per_row": {str(k): hist[k] for k in sorted(hist)},
        "tokens_by_source": dict(sorted(by_source.items())),
        "share_by_source": {k: round(v / max(kept, 1), 6) for k, v in sorted(by_source.items())},
        "discarded_by_source": meta.get("discarded_by_source", {}),
    }


def run_stats(cfg: PrepConfig) -> dict:
    t0 = time.time()
    shards = Path(cfg.out_dir) / "shards"
    if not (shards / "manifest.json").exists():
        raise DataError(f"{shards}/manifest.json not found: run `tools/prep.py stage=shard` first")
    summary: dict = {}
    for split in SPLITS:
        idx = load_index(shards, split)
        meta = json.loads((Path(idx.dir) / "index.json").read_text())
        summary[split] = split_stats(idx, meta, cfg.workers)
    summary["fingerprint"] = idx.fingerprint
    atomic_write_json(shards / "summary.json", summary)
    tr = summary["train"]
    print(summary_line("stats", {"train_rows": tr["rows"], "train_docs_started": tr["docs_started"],
                                 "val_rows": summary["val"]["rows"]}, 0, tr["shards"] + summary["val"]["shards"],
                       shards / "summary.json", time.time() - t0))
    return summary
