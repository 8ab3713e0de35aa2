"""TokenStream / StatefulLoader / build_data: partition, mixture, exact resume, exhaustion, bad shards, sample."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from recdepth.config import DataConfig
from recdepth.data import Source, StatefulLoader, TokenStream, WeightPhase, build_data, load_index
from recdepth.data.sample import ensure_sample, stdlib_files
from recdepth.errors import ConfigError, DataError
from recdepth.prep.manifest import sha256_file
from recdepth.prep.shard import _npy_header, write_shard

L = 17  # rows of block_size 16 + 1


def make_source(root: Path, tag: int, shard_rows: list[int], val_rows: int = 12) -> Path:
    """Shards whose row k carries (tag, k) in its first tokens, so every row is identifiable."""
    for split, sizes in (("train", shard_rows), ("val", [val_rows])):
        d = root / "shards" / split
        d.mkdir(parents=True)
        shards, k = [], 0
        for j, n in enumerate(sizes):
            rows = []
            for _ in range(n):
                row = np.full(L, 7, dtype=np.uint16)
                row[0], row[1], row[2] = tag, k // 1000, k % 1000
                rows.append((row, {"doc_starts": [0], "source_ids": [0]}))
                k += 1
            path = d / f"{j:06d}.tar"
            write_shard(path, k - n, rows, _npy_header(np.dtype(np.uint16), L))
            shards.append({"name": path.name, "rows": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        index = {"row_len": L, "dtype": "uint16", "vocab_size": 512, "ids": {"bos": 1, "eos": 2, "pad": 3},
                 "fingerprint": f"fp-{tag}", "shards": shards}
        (d / "index.json").write_text(json.dumps(index))
    return root


def row_id(tokens: np.ndarray) -> tuple[int, int]:
    return int(tokens[0]), int(tokens[1]) * 1000 + int(tokens[2])


def test_every_row_exactly_once_per_epoch_over_ranks_and_workers(tmp_path: Path):
    sizes = [10] * 36 + [3]  # 37 shards, one partial: more shards than the 4 global workers
    idx = load_index(make_source(tmp_path / "a", 1, sizes), "train")
    small = load_index(make_source(tmp_path / "b", 2, [9, 9, 5]), "train")  # fewer shards than workers: rows strided
    for index, segment in ((idx, 0), (small, 0), (idx, 1)):  # segment 1: the order after data.allow_reshard
        for epoch in (0, 1):
            seen = Counter()
            for rank in range(2):
                stream = TokenStream([Source("s", index)], rank=rank, world_size=2, num_workers=2, seed=5)
                stream.set_segment(segment)
                for w in range(2):
                    for row in stream.worker_rows(w):
                        if row.epoch > epoch:
                            break
                        if row.epoch == epoch:
                            seen[row_id(row.tokens)] += 1
            assert len(seen) == index.rows and set(seen.values()) == {1}, (index.dir, epoch)
    # a new epoch has a new shard order
    s = TokenStream([Source("s", idx)], num_workers=0, seed=5)
    rows = s.worker_rows(0)
    e0 = [row_id(next(rows).tokens) for _ in range(idx.rows)]
    e1 = [row_id(next(rows).tokens) for _ in range(idx.rows)]
    assert sorted(e0) == sorted(e1) and e0 != e1
    s.set_segment(1)  # a new segment: the same rows from the start, in another order
    seg = [row_id(r.tokens) for r, _ in zip(s.worker_rows(0), range(idx.rows))]
    assert sorted(seg) == sorted(e0) and seg != e0


def test_mixture_proportions_match_weights(tmp_path: Path):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    srcs = [Source(n, load_index(make_source(tmp_path / n, t, [50] * 8), "train"), w)
            for t, (n, w) in enumerate(weights.items(), start=1)]
    stream = TokenStream(srcs, seed=11)
    it = stream.worker_rows(0)
    counts = Counter(next(it).source for _ in range(100_000))
    for n, w in weights.items():
        assert abs(counts[n] / 1e5 - w) < 0.01, counts
    # the same seed gives the same choices; another seed does not
    assert (TokenStream(srcs, seed=11).choices(0, 3) == stream.choices(0, 3)).all()
    assert not (TokenStream(srcs, seed=12).choices(0, 3) == stream.choices(0, 3)).all()
    # a schedule switches weights at a row count (rows consumed by the rank)
    sched = TokenStream(srcs, seed=11, schedule=[WeightPhase(20_000, {"a": 0.0, "b": 1.0, "c": 1.0})])
    it = sched.worker_rows(0)
    picks = [next(it).source for _ in range(40_000)]
    assert "a" not in picks[20_000:] and abs(picks[:20_000].count("a") / 2e4 - 0.5) < 0.02


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_continues_with_the_next_batch(tmp_path: Path, workers: int):
    srcs = [Source("a", load_index(make_source(tmp_path / "a", 1, [10] * 9), "train"), 0.7),
            Source("b", load_index(make_source(tmp_path / "b", 2, [8] * 5), "train"), 0.3)]

    def loader() -> StatefulLoader:
        return StatefulLoader(TokenStream(srcs, rank=1, world_size=2, num_workers=workers, seed=3, batch_rows=4), 4, 3)

    ref = loader()
    it = iter(ref)
    full = [next(it) for _ in range(13)]
    a = loader()
    it = iter(a)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable
    b = loader()
    b.load_state_dict(state)
    it = iter(b)
    for k in range(7, 13):
        x, y = next(it)
        assert torch.equal(x, full[k][0]) and torch.equal(y, full[k][1])
    assert x.dtype == torch.int64 and x.shape == (4, L - 1)
    bad = dict(state, fingerprint="other")
    with pytest.raises(DataError, match="dataset.*data.allow_reshard"):
        b.load_state_dict(bad)
    # a new segment starts from batch 0 of another order, and a resume inside it stays exact
    c = loader()
    c.start_segment(2)
    it = iter(c)
    seg = [next(it) for _ in range(5)]
    assert not torch.equal(seg[0][0], full[0][0])
    d = loader()
    d.load_state_dict(json.loads(json.dumps(dict(c.state_dict(), consumed_batches=3))))
    assert d.stream.segment == 2 and torch.equal(next(iter(d))[0], seg[3][0])


def test_stream_state_restores_row_k_plus_one_for_every_rank_and_worker(tmp_path: Path):
    srcs = [Source("a", load_index(make_source(tmp_path / "a", 1, [10] * 11), "train"), 1.0),
            Source("b", load_index(make_source(tmp_path / "b", 2, [6] * 9), "train"), 2.0)]
    K = 23
    for rank in range(2):
        for w in range(2):
            s = TokenStream(srcs, rank=rank, world_size=2, num_workers=2, seed=9)
            it = s.worker_rows(w)
            rows = [row_id(next(it).tokens) for _ in range(K + 5)]
            resumed = TokenStream(srcs, rank=rank, world_size=2, num_workers=2, seed=9)
            state = s.state_dict()
            state["positions"] = [K if i == w else 0 for i in range(2)]
            resumed.load_state_dict(state)
            it2 = resumed.worker_rows(w, resumed._start[w])
            assert [row_id(next(it2).tokens) for _ in range(5)] == rows[K:]


def test_stop_exhaustion_ends_all_workers_together(tmp_path: Path):
    srcs = [Source("a", load_index(make_source(tmp_path / "a", 1, [10] * 8 + [4]), "train"), 1.0, "stop")]
    lens = []
    for rank in range(2):
        s = TokenStream(srcs, rank=rank, world_size=2, num_workers=2, seed=1, batch_rows=4)
        for w in range(2):
            rows = list(s.worker_rows(w))
            assert {r.epoch for r in rows} == {0} and len({row_id(r.tokens) for r in rows}) == len(rows)
            lens.append(len(rows))
    assert len(set(lens)) == 1 and lens[0] % 4 == 0 and lens[0] <= 84 // 4


def test_bad_shards_are_named_errors(tmp_path: Path):
    root = make_source(tmp_path / "a", 1, [10, 10])
    idx = load_index(root, "train")
    shard = Path(idx.shards[0].path)
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated tar
    s = TokenStream([Source("a", idx)], verify=False)
    with pytest.raises(DataError, match="000000.tar"):
        list(zip(range(20), s.worker_rows(0)))
    with pytest.raises(DataError, match="sha256"):
        list(zip(range(20), TokenStream([Source("a", idx)]).worker_rows(0)))
    # a row of the wrong length
    write_shard(shard, 0, [(np.zeros(L - 1, np.uint16), {})] * 10, _npy_header(np.dtype(np.uint16), L - 1))
    with pytest.raises(DataError, match="wrong length"):
        list(zip(range(20), TokenStream([Source("a", idx)], verify=False).worker_rows(0)))
    with pytest.raises(DataError, match="index.json"):
        load_index(tmp_path / "nothing", "train")


def test_build_data_contract_and_config_errors(tmp_path: Path):
    a = make_source(tmp_path / "a", 1, [10] * 8)
    b = make_source(tmp_path / "b", 2, [10] * 8)
    cfg = DataConfig(name="mix", sources={"a": str(a), "b": str(b)}, weights={"a": 0.25, "b": 0.75})
    kw = {"block_size": 16, "vocab_size": 512, "micro_batch_size": 4, "rank": 0, "world_size": 2, "n_val_batches": 2,
          "seed": 1}
    bundle = build_data(cfg, **kw)
    assert bundle.vocab_size == 512 and bundle.pad_id == 3 and len(bundle.val) == 2
    again = build_data(cfg, **kw)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(bundle.val, again.val)) and bundle.fingerprint == again.fingerprint
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], torch.where(y[:, :-1] == -100, x[:, 1:], y[:, :-1]))
    other = build_data(DataConfig(name="mix", sources={"a": str(a), "b": str(b)}, weights={"a": 0.5, "b": 0.5}), **kw)
    assert other.fingerprint != bundle.fingerprint
    with pytest.raises(ConfigError, match="model.block_size"):
        build_data(cfg, **{**kw, "block_size": 8})
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_data(cfg, **{**kw, "vocab_size": 256})
    with pytest.raises(DataError, match="empty"):
        (tmp_path / "empty").mkdir()
        build_data(DataConfig(name="local", path=str(tmp_path / "empty")), **kw)


def test_data_group_configs_compose(tmp_path: Path):
    from omegaconf import OmegaConf

    from recdepth.config import to_dataclass

    conf = Path(__file__).resolve().parents[1] / "conf"
    for name in ("sample", "local", "huginn_mix"):
        cfg = to_dataclass(OmegaConf.load(conf / "data" / f"{name}.yaml"), DataConfig)
        assert cfg.name == name
    mix = OmegaConf.load(conf / "data" / "huginn_mix.yaml")
    mix.merge_with_dotlist(["weights.code=0.1"])  # what `python run.py -m data.weights.code=0.1,0.3` does per job
    assert to_dataclass(mix, DataConfig).weights["code"] == 0.1
    with pytest.raises(DataError, match="data/huginn"):  # the template points at paths the user must provide
        build_data(to_dataclass(mix, DataConfig), block_size=16, vocab_size=512, micro_batch_size=4, rank=0,
                   world_size=1, n_val_batches=1, seed=0)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        pc = compose("prep", overrides=["stage=shard", f"out_dir={tmp_path}", "shard.block_size=64"])
    from recdepth.prep.config import prep_config

    assert prep_config(pc).shard.block_size == 64


def test_sample_corpus_builds_once_atomically_and_trains(tmp_path: Path):
    files = stdlib_files(0.5)
    assert files == sorted(files) and sum(p.stat().st_size for p in files) <= 0.5e6
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".sample-v512-b32-xxxx.tmp-1"  # an interrupted build is never reused
    stale.mkdir()
    d = ensure_sample(str(cache), 512, 32, max_mb=0.5, workers=2)
    assert d.name.startswith("sample-v512-b32-") and (d / "shards" / "train" / "index.json").exists()
    stamp = (d / "shards" / "manifest.json").stat().st_mtime_ns
    cfg = DataConfig(cache_dir=str(cache), sample_mb=0.5)
    bundle = build_data(cfg, block_size=32, vocab_size=512, micro_batch_size=4, rank=0, world_size=1,
                        n_val_batches=2, seed=233)
    assert (d / "shards" / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert bundle.vocab_size == 512 and bundle.tokenizer_path and len(bundle.val) == 2
    x, _ = next(iter(bundle.train))
    assert x.shape == (4, 32) and int(x.max()) < 512
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(bundle.tokenizer_path).decode(x[0].tolist())
    assert len(text) > 40  # real Python source came back out
