"""Data benchmarks (issue 4): tokenize vs encode_batch, shuffle+shard vs a plain copy, shuffle peak memory on
1x and 10x the data, TokenStream rows/s vs what a raven_small step consumes. `bench_data(out)` fills `out`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recdepth.prep.manifest import finish_stage, write_arrow  # noqa: E402
from recdepth.prep.tokenize import token_schema  # noqa: E402

RAVEN_SMALL_STEP_S = 1.5  # assumed CPU step time of raven_small (batch 8 x 256), per the issue
RAVEN_SMALL_ROWS = 8


def _synthetic_tokens(out_dir: Path, n_files: int, docs_per_file: int = 1000, mean_len: int = 1000) -> int:
    """A tokens/ stage dir (as `tokenize` writes it) of random documents; returns the token bytes."""
    d = out_dir / "tokens" / "synth"
    d.mkdir(parents=True, exist_ok=True)
    units, total = [], 0
    for i in range(n_files):
        r = np.random.default_rng(np.random.SeedSequence(7, spawn_key=(i,)))
        lens = r.integers(mean_len // 2, mean_len * 3 // 2, docs_per_file)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        values = r.integers(0, 4090, int(offsets[-1])).astype(np.uint16)
        ids = [f"synth/{i:05d}/{k:07d}" for k in range(docs_per_file)]
        split = (r.random(docs_per_file) < 0.01).astype(np.int8)
        schema = token_schema(np.dtype(np.uint16))
        t = pa.table({"doc_id": ids, "source": ["synth"] * docs_per_file, "split": split,
                      "n_tokens": lens.astype(np.uint32),
                      "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}, schema=schema)
        rel = f"synth/part-{i:05d}.arrow"
        dig = write_arrow(d / f"part-{i:05d}.arrow", schema, t.to_batches(), compression="zstd")
        units.append({"unit": f"synth/part-{i:05d}.parquet", "outputs": {rel: dig},
                      "docs": docs_per_file, "val_docs": int(split.sum()), "bytes": int(values.nbytes)})
        total += int(values.nbytes)
    totals = {"dtype": "uint16", "vocab_size": 4096, "ids": {"bos": 4090, "eos": 4091, "pad": 4095}}
    finish_stage(out_dir / "tokens", "tokenize", {}, 0, {}, units, [], totals, 0.0, 1)
    tok = out_dir / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer.json").write_text("{}")
    finish_stage(tok, "tokenizer", {}, 0, {}, [{"unit": "tokenizer"}], [], totals, 0.0, 1)
    return total


_PEAK_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from recdepth.prep import prepare
t = time.time()
man = prepare({out!r}, stages=("shuffle", "shard"), workers=1, progress=False, resume=False,
              shuffle={{"bucket_mb": {bucket_mb}}}, shard={{"block_size": 4096, "rows_per_shard": 128, "policy": "carry"}})
hwm = [x for x in open("/proc/self/status").read().splitlines() if x.startswith("VmHWM")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"peak_mb": peak, "s": time.time() - t, "buckets": man["shuffle"]["totals"]["buckets_train"]}}))
"""


def _shuffle_peak(out: Path, bucket_mb: float) -> dict:
    """Peak resident memory (VmHWM) of a fresh process running both shuffle passes (`shuffle`, then `shard`,
    which reads the buckets)."""
    res = subprocess.run([sys.executable, "-c", _PEAK_CHILD.format(root=str(ROOT), out=str(out), bucket_mb=bucket_mb)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def bench_tokenize(out: dict, tmp: Path, reps: int = 3) -> None:
    """Stage `tokenize` (2 processes, parquet in, Arrow out, manifests) vs the library's own `encode_batch` (its
    thread pool) over the same documents with the same special tokens, keeping the encodings in memory.
    The stage calls `encode_batch_fast` (the same ids without character offsets), so that is timed too.
    All are warmed once (tokenizer parsed, pools started, files cached), then timed alternately `reps` times;
    the figures are the medians, a ratio is median(library time) / median(stage time)."""
    from tokenizers import Tokenizer

    from recdepth.data.sample import sample_overrides, stdlib_files
    from recdepth.prep import prepare

    files = stdlib_files(12.0)
    over = sample_overrides(files, 4096, 256, workers=2)
    over["ingest"]["files_per_unit"] = 32
    prepare(str(tmp / "tk"), stages=("ingest", "tokenizer"), **over)
    texts = [t for f in sorted((tmp / "tk" / "docs" / "stdlib").glob("*.parquet"))
             for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    tok = Tokenizer.from_file(str(tmp / "tk" / "tokenizer" / "tokenizer.json"))
    over["resume"] = False  # every timed run redoes every unit
    man = prepare(str(tmp / "tk"), stages=("tokenize",), **over)["tokenize"]  # warm-up
    enc = tok.encode_batch(texts, add_special_tokens=True)
    n = man["totals"]["tokens"]
    assert n == sum(len(e.ids) for e in enc)
    del enc
    t_stage, t_lib, t_fast = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        man = prepare(str(tmp / "tk"), stages=("tokenize",), **over)["tokenize"]
        t_stage.append(time.perf_counter() - t0)
        assert man["totals"]["tokens"] == n
        t0 = time.perf_counter()
        enc = tok.encode_batch(texts, add_special_tokens=True)
        t_lib.append(time.perf_counter() - t0)
        del enc
        t0 = time.perf_counter()
        enc = tok.encode_batch_fast(texts, add_special_tokens=True)
        t_fast.append(time.perf_counter() - t0)
        del enc
    out["tokenize_tokens"] = n
    out["tokenize_2proc_tokens_per_s"] = round(n / _median(t_stage))
    out["encode_batch_tokens_per_s"] = round(n / _median(t_lib))
    out["tokenize_vs_encode_batch_ratio"] = round(_median(t_lib) / _median(t_stage), 3)
    out["tokenize_vs_encode_batch_ratio_per_rep"] = [round(b / a, 3) for a, b in zip(t_stage, t_lib)]
    out["encode_batch_fast_tokens_per_s"] = round(n / _median(t_fast))
    out["tokenize_vs_encode_batch_fast_ratio"] = round(_median(t_fast) / _median(t_stage), 3)


def bench_shuffle_shard(out: dict, tmp: Path, reps: int = 7) -> None:
    """Shuffle + shard of the 10x data (rows of 4097, 4 MB buckets) vs copying its token files; each timed
    `reps` times alternately (the pipeline from scratch each time, the copy into a new folder, each after a
    sync), figures are medians. Also the peak memory of the shuffle (both passes) on 1x and 10x the data,
    with 0.5 MB buckets so that even the 1x run has a dozen and both runs reach the allocator's steady state
    (with 4 MB buckets the 1x data has only 2, and the peak is still climbing with glibc's heap growth)."""
    from recdepth.prep import prepare

    small, big = tmp / "x1", tmp / "x10"
    _synthetic_tokens(small, 3)
    nbytes = _synthetic_tokens(big, 30)
    p1, p10 = _shuffle_peak(small, 0.5), _shuffle_peak(big, 0.5)
    out["shuffle_peak_buckets_1x_10x"] = [p1["buckets"], p10["buckets"]]
    out["shuffle_peak_mb_1x"] = round(p1["peak_mb"], 1)
    out["shuffle_peak_mb_10x"] = round(p10["peak_mb"], 1)
    out["shuffle_peak_ratio_10x_vs_1x"] = round(p10["peak_mb"] / p1["peak_mb"], 3)
    # throughput on the 10x data: shuffle + shard vs copying the token files
    src_files = sorted((big / "tokens").rglob("*.arrow"))
    file_bytes = sum(f.stat().st_size for f in src_files)
    t_pipe, t_copy = [], []
    for rep in range(reps):
        os.sync()  # each side starts with no dirty pages of the other being written back under it
        t0 = time.perf_counter()
        prepare(str(big), stages=("shuffle", "shard"), workers=2, progress=False, resume=False,
                shuffle={"bucket_mb": 4.0}, shard={"block_size": 4096, "rows_per_shard": 128, "policy": "carry"})
        t_pipe.append(time.perf_counter() - t0)
        dst = tmp / f"copy{rep}"
        dst.mkdir()
        os.sync()
        t0 = time.perf_counter()
        for f in src_files:
            with open(f, "rb") as a, open(dst / f.name, "wb") as b:
                shutil.copyfileobj(a, b, 1 << 22)
        t_copy.append(time.perf_counter() - t0)
    tp, tc = _median(t_pipe), _median(t_copy)
    out["shuffle_shard_token_mb"] = round(nbytes / 2**20, 1)
    out["shuffle_shard_mb_per_s"] = round(nbytes / 2**20 / tp, 1)
    out["plain_copy_mb_per_s"] = round(file_bytes / 2**20 / tc, 1)
    out["shuffle_shard_vs_copy_ratio"] = round((nbytes / tp) / (file_bytes / tc), 3)
    out["shuffle_shard_vs_copy_ratio_per_rep"] = [round((nbytes / a) / (file_bytes / b), 3)
                                                  for a, b in zip(t_pipe, t_copy)]


def bench_stream(out: dict, tmp: Path) -> None:
    from recdepth.data import Source, TokenStream, load_index
    from recdepth.prep import prepare

    srcs = []
    for k, w in enumerate((0.5, 0.3, 0.2)):
        d = tmp / f"src{k}"
        _synthetic_tokens(d, 2, docs_per_file=300)
        prepare(str(d), stages=("shuffle", "shard"), workers=1, progress=False,
                shard={"block_size": 256, "rows_per_shard": 128, "policy": "carry"})
        srcs.append(Source(f"s{k}", load_index(d, "train"), w))
    stream = TokenStream(srcs, rank=0, world_size=1, num_workers=0, seed=0)
    it = stream.worker_rows(0)
    for _ in range(100):  # warm-up: first shard reads
        next(it)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    rows_s = n / (time.perf_counter() - t0)
    need = RAVEN_SMALL_ROWS / RAVEN_SMALL_STEP_S
    out["stream_rows_per_s_per_worker"] = round(rows_s)
    out["raven_small_rows_per_s_needed"] = round(need, 2)
    out["stream_vs_raven_small_ratio"] = round(rows_s / need, 1)


SECTIONS = {"tokenize": bench_tokenize, "shuffle_shard": bench_shuffle_shard, "stream": bench_stream}


def bench_data(out: dict) -> None:
    """Fill `out` with the data figures and the ratios named in issue 4 (targets in `targets`). Each section
    runs in a fresh process, as each prep stage does from the command line: the tokenizer benchmark leaves
    about 1 GB resident, which would otherwise slow the process pool (fork) and the allocator of the next."""
    for name in SECTIONS:
        res = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"bench_data {name} failed:\n{res.stderr[-4000:]}")
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    out["targets"] = {"tokenize_vs_encode_batch_ratio": ">= 0.8", "shuffle_shard_vs_copy_ratio": ">= 0.3",
                      "shuffle_peak_ratio_10x_vs_1x": "<= 1.2", "stream_vs_raven_small_ratio": ">= 50"}


if __name__ == "__main__":
    figures: dict = {}
    if len(sys.argv) > 1:  # one section, in this process; its figures as one JSON line
        with tempfile.TemporaryDirectory(prefix="recdepth-bench-data-") as t:
            SECTIONS[sys.argv[1]](figures, Path(t))
        print(json.dumps(figures))
    else:
        bench_data(figures)
        print(json.dumps(figures, indent=1))
