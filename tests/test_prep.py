"""Prep stages on small synthetic inputs: determinism, resume, adapters, packing, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdepth.errors import ConfigError, DataError
from recdepth.prep import prepare
from recdepth.prep.config import prep_config
from recdepth.prep.shard import Packer
from recdepth.prep.tokenize import token_dtype

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi"]


def _text(r: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in r.integers(0, len(WORDS), n))


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A jsonl, two text files, a parquet with two fields, a chat jsonl and a `datasets` arrow dir."""
    r = np.random.default_rng(0)
    d = tmp_path / "raw"
    (d / "plain").mkdir(parents=True)
    with open(d / "plain" / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": _text(r, int(r.integers(5, 150)))}) + "\n" for _ in range(120))
    for k in range(2):
        (d / "plain" / f"t{k}.txt").write_text(_text(r, 400))
    pq.write_table(pa.table({"q": [_text(r, 20) for _ in range(30)], "a": [_text(r, 30) for _ in range(30)]}),
                   d / "multi.parquet")
    with open(d / "chat.jsonl", "w") as f:
        for _ in range(20):
            msgs = [{"from": "human", "value": _text(r, 10)}, {"from": "gpt", "value": " " + _text(r, 12) + " "}]
            f.write(json.dumps({"conversations": msgs}) + "\n")
    arrow = d / "hfds"
    arrow.mkdir()
    (arrow / "dataset_info.json").write_text("{}")
    table = pa.table({"text": [_text(r, 25) for _ in range(40)]})
    with pa.OSFile(str(arrow / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return d


def overrides(raw: Path, **kw) -> dict:
    base = {
        "progress": False,
        "workers": 1,
        "ingest": {"sources": {
            "plain": {"inputs": [str(raw / "plain" / "*")]},
            "multi": {"inputs": [str(raw / "multi.parquet")], "adapter": "multi", "fields": ["q", "a"]},
            "chat": {"inputs": [str(raw / "chat.jsonl")], "adapter": "chat", "messages_field": "conversations"},
            "hf": {"inputs": [str(raw / "hfds")]},
        }},
        "tokenizer": {"vocab_size": 400, "specials": "minimal"},
        "tokenize": {"val_fraction": 0.1, "batch_docs": 16},
        "shuffle": {"bucket_mb": 0.005, "weights": {"chat": 2.5}},
        "shard": {"block_size": 32, "rows_per_shard": 8, "policy": "carry"},
    }
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return base


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*.tar"))}


def test_pipeline_is_deterministic_and_complete(raw: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    ma = prepare(str(a), **overrides(raw))
    mb = prepare(str(b), **overrides(raw, workers=2))
    assert all(m is not None for m in ma.values())
    sa, sb = shard_bytes(a), shard_bytes(b)
    assert len(sa) > 4 and sa == sb  # byte-identical shards, whatever the process count
    assert ma["shard"]["totals"]["fingerprint"] == mb["shard"]["totals"]["fingerprint"]
    # carry loses nothing: every token of the shuffled copies is in a row
    sh = ma["shuffle"]["totals"]
    tr = json.loads((a / "shards" / "train" / "index.json").read_text())
    assert tr["kept_tokens"] == sh["train_tokens"] and tr["discarded_tokens"] == 0
    assert tr["rows"] == -(-sh["train_tokens"] // 33)
    # chat docs were upsampled 2.5x (2 copies + Bernoulli(0.5)); val documents never repeated
    assert sh["val_copies"] == sh["val_docs"] and sh["train_copies"] > sh["train_docs"]
    for stage in ("docs", "tokenizer", "tokens", "shuffled", "shards"):
        man = json.loads((a / stage / "manifest.json").read_text())
        assert man["seed"] == 233 and man["config"] and man["units"] and man["inputs"]


def test_adapters_render_chat_join_fields_and_read_arrow(raw: Path, tmp_path: Path):
    prepare(str(tmp_path / "o"), stages=("ingest",), **overrides(raw))
    docs = {s: [r for f in sorted((tmp_path / "o" / "docs" / s).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
            for s in ("chat", "multi", "hf", "plain")}
    chat = docs["chat"][0]["text"]
    assert chat.startswith("<|begin_header|>user<|end_header|>\n\n") and "<|begin_header|>Huginn<|end_header|>" in chat
    assert chat.endswith("<|end_turn|>") and " <|end_turn|>" not in chat  # content trimmed
    q, a = pq.read_table(raw / "multi.parquet").to_pylist()[0].values()
    assert docs["multi"][0]["text"] == f"{q}\n{a}"
    assert len(docs["hf"]) == 40 and docs["hf"][0]["doc_id"] == "hf/00000/0000000"
    assert len(docs["plain"]) == 122  # 120 jsonl lines + 2 text files (one document each)


def test_stage_killed_half_way_resumes_to_identical_output(raw: Path, tmp_path: Path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    prepare(str(ref), **overrides(raw))
    for stage in ("ingest", "tokenizer", "tokenize", "shuffle", "shard"):
        if stage in ("ingest", "tokenize", "shuffle", "shard"):
            part = prepare(str(out), stages=(stage,), **{**overrides(raw), "limit_units": 2})
            assert part[stage] is None  # stopped with work left, like a killed run
            log = (out / {"ingest": "docs", "tokenize": "tokens", "shuffle": "shuffled", "shard": "shards"}[stage]
                   / "_manifest.jsonl")
            done = [json.loads(x) for x in log.read_text().splitlines()]
            assert len(done) == 2
            first = log.parent / next(iter(done[0]["outputs"]))
            stamp = first.stat().st_mtime_ns
            with open(log, "a") as f:  # a torn line and a stale temp file, as a SIGKILL would leave
                f.write('{"unit": "torn')
            (first.parent / f".{first.name}.999.tmp").write_bytes(b"partial")
            full = prepare(str(out), stages=(stage,), **overrides(raw))[stage]
            assert full is not None
            units = [json.loads(x)["unit"] for x in log.read_text().splitlines() if "torn" not in x]
            assert units.count(done[0]["unit"]) == 1  # the finished unit was not redone
            assert first.stat().st_mtime_ns == stamp
        else:
            prepare(str(out), stages=(stage,), **overrides(raw))
    assert shard_bytes(out) == shard_bytes(ref)
    assert (json.loads((out / "shards" / "manifest.json").read_text())["totals"]["fingerprint"]
            == json.loads((ref / "shards" / "manifest.json").read_text())["totals"]["fingerprint"])


def test_prep_cli_killed_mid_stage_resumes_to_the_same_output(tmp_path: Path):
    """A real SIGKILL of `tools/prep.py stage=tokenize` (2 worker processes) after its first finished unit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from recdepth.data.sample import sample_overrides, stdlib_files

    over = sample_overrides(stdlib_files(3.0), 512, 64, workers=2)
    over["ingest"]["files_per_unit"] = 8
    over["progress"] = False
    ref, out = tmp_path / "ref", tmp_path / "out"
    for d in (ref, out):
        prepare(str(d), stages=("ingest", "tokenizer"), **over)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "tools/prep.py", "stage=tokenize", "workers=2", "progress=false"]
    res = subprocess.run([*cmd, f"out_dir={ref}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cmd.append(f"out_dir={out}")
    log = out / "tokens" / "_manifest.jsonl"
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while (not log.exists() or not log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes
    proc.communicate()
    done = 0
    for line in log.read_text().splitlines():  # a kill mid-append may leave a torn last line
        try:
            done += bool(json.loads(line))
        except json.JSONDecodeError:
            pass
    units = len(json.loads((out / "docs" / "manifest.json").read_text())["units"])
    assert 1 <= done < units, "the stage finished before it could be killed"
    assert not (out / "tokens" / "manifest.json").exists()
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"({done} resumed)" in res.stdout, res.stdout[-500:]  # finished units were not redone
    files = sorted(p.relative_to(ref) for p in (ref / "tokens").rglob("*.arrow"))
    assert files == sorted(p.relative_to(out) for p in (out / "tokens").rglob("*.arrow"))
    assert all((ref / f).read_bytes() == (out / f).read_bytes() for f in files)
    fp = [json.loads((d / "tokens" / "manifest.json").read_text())["fingerprint"] for d in (ref, out)]
    assert fp[0] == fp[1]


def test_bad_input_is_quarantined_with_reason_or_fails_named(tmp_path: Path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "good.txt").write_text("fine text here")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.txt").write_text("   \n")
    with open(d / "rows.jsonl", "w") as f:
        f.write(json.dumps({"text": "ok row"}) + "\n" + json.dumps({"text": None}) + "\n{broken\n")
    over = {"progress": False, "ingest": {"inputs": [str(d / "*")]}}
    with pytest.raises(DataError, match="quarantine.jsonl"):
        prepare(str(tmp_path / "strict"), stages=("ingest",), **over)
    man = prepare(str(tmp_path / "lax"), stages=("ingest",), max_bad_fraction=0.8, **over)["ingest"]
    q = [json.loads(x) for x in (tmp_path / "lax" / "docs" / "quarantine.jsonl").read_text().splitlines()]
    reasons = " | ".join(x["reason"] for x in q)
    assert man["totals"]["quarantined"] == len(q) == 4 and man["totals"]["docs"] == 2
    for why in ("invalid UTF-8", "empty text", "null text", "invalid JSON"):
        assert why in reasons
    # a truncated parquet: a named error, or quarantined when the config allows
    good = tmp_path / "p" / "x.parquet"
    good.parent.mkdir()
    pq.write_table(pa.table({"text": ["a b c"] * 50}), good)
    good.write_bytes(good.read_bytes()[:-40])
    over = {"progress": False, "ingest": {"inputs": [str(good)]}}
    with pytest.raises(DataError, match="x.parquet"):
        prepare(str(tmp_path / "t1"), stages=("ingest",), **over)
    over["ingest"]["on_bad_file"] = "quarantine"
    man = prepare(str(tmp_path / "t2"), stages=("ingest",), max_bad_fraction=1.0, **over)["ingest"]
    assert man["totals"]["quarantined"] == 1


def test_buckets_are_a_seeded_permutation_of_every_copy(raw: Path, tmp_path: Path):
    from recdepth.prep.manifest import open_arrow
    from recdepth.prep.shuffle import BucketReader, scatter_parts

    out = tmp_path / "o"
    man = prepare(str(out), stages=("ingest", "tokenizer", "tokenize", "shuffle"), **overrides(raw))["shuffle"]
    parts = scatter_parts(out / "shuffled", "train", man)
    n_b = man["totals"]["buckets_train"]
    assert len(parts) > 1 and n_b > 1
    readers = [open_arrow(p, "shuffle") for p in parts]
    unpermuted = [tuple(r) for b in range(n_b) for f in readers for r in f.get_batch(b).column("input_ids").to_pylist()]
    assert len(unpermuted) == man["totals"]["train_copies"]
    kept_open, reopened = BucketReader(parts, man["seed"], "train"), BucketReader(parts, man["seed"], "train", max_open=1)
    got = []
    for b in range(n_b):
        x, y = kept_open.bucket(b), reopened.bucket(b)
        assert [d.tolist() for d in x.docs] == [d.tolist() for d in y.docs] and x.sources.equals(y.sources)
        got += [tuple(d.tolist()) for d in x.docs]
    assert sorted(got) == sorted(unpermuted) and got != unpermuted  # every copy once, permuted within buckets


def test_truncated_intermediate_files_are_named_errors(raw: Path, tmp_path: Path):
    out = tmp_path / "o"
    prepare(str(out), **overrides(raw))
    scatter = sorted((out / "shuffled" / "train").glob("*.arrow"))[0]
    scatter.write_bytes(scatter.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{scatter.name}.*rerun stage=shuffle"):
        prepare(str(out), stages=("shard",), **{**overrides(raw), "resume": False})
    tokens = sorted((out / "tokens").rglob("*.arrow"))[0]
    tokens.write_bytes(tokens.read_bytes()[: len(tokens.read_bytes()) // 2])
    with pytest.raises(DataError, match=f"{tokens.name}.*rerun stage=tokenize"):
        prepare(str(out), stages=("shuffle",), **{**overrides(raw), "resume": False})


def test_stats_rereads_every_shard_and_catches_tampering(raw: Path, tmp_path: Path):
    out = tmp_path / "o"
    man = prepare(str(out), **overrides(raw))
    summary = prepare(str(out), stages=("stats",), **overrides(raw))["stats"]
    assert json.loads((out / "shards" / "summary.json").read_text()) == summary
    sh, tr = man["shuffle"]["totals"], summary["train"]
    index = json.loads((out / "shards" / "train" / "index.json").read_text())
    assert tr["rows"] == index["rows"] and tr["shards"] == len(index["shards"])
    assert tr["docs_started"] == sh["train_copies"]  # carry: every copy starts exactly once
    assert sum(tr["tokens_by_source"].values()) == sh["train_tokens"] == tr["tokens"] - tr["pad_tokens"]
    assert tr["tokens_by_source"] == index["kept_by_source"] and set(tr["tokens_by_source"]) == set(index["sources"])
    assert sum(tr["docs_per_row"].values()) == tr["rows"] and tr["bos_tokens"] >= tr["docs_started"]
    # an edited count in the index, then a flipped byte in a shard: each a named error
    index["kept_by_source"]["chat"] += 1
    (out / "shards" / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="kept_by_source"):
        prepare(str(out), stages=("stats",), **overrides(raw))
    shard = out / "shards" / "train" / index["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.name}.*sha256"):
        prepare(str(out), stages=("stats",), **overrides(raw))


def test_vocab_too_large_for_uint16_is_a_named_error(tmp_path: Path):
    assert token_dtype("auto", 65536) == np.uint16 and token_dtype("auto", 65537) == np.uint32
    with pytest.raises(ConfigError, match="tokenize.dtype=uint16"):
        token_dtype("uint16", 70000)
    from recdepth.prep.tokenizer import layout

    with pytest.raises(ConfigError, match="tokenizer.specials_start"):
        layout(prep_config(None, stage="tokenizer", tokenizer={"vocab_size": 400, "specials_start": 399}).tokenizer)
    with pytest.raises(ConfigError, match="stage"):
        prep_config(None, stage="bogus")


def test_huginn_preset_ids_and_uint32_tokens(raw: Path, tmp_path: Path):
    over = overrides(raw, tokenizer={"vocab_size": 65536, "preset": "huginn", "specials": "huginn"})
    over["tokenize"]["dtype"] = "uint16"
    m = prepare(str(tmp_path / "h"), stages=("ingest", "tokenizer", "tokenize"), **over)
    ids = m["tokenizer"]["totals"]["ids"]
    assert ids == {"bos": 65504, "eos": 65505, "end_turn": 65508, "pad": 65509}
    assert m["tokenizer"]["totals"]["dropped_char_rate"] == 0.0  # aeolian + fallback is lossless
    t = pa.ipc.open_file(next((tmp_path / "h" / "tokens" / "plain").glob("*.arrow"))).read_all()
    row = t.column("input_ids")[0].as_py()
    assert row[0] == 65504 and row[-1] == 65505 and t.schema.field("input_ids").type.value_type == pa.uint16()
    big = overrides(raw, tokenizer={"vocab_size": 65600, "specials": "minimal"})
    big["tokenize"]["dtype"] = "uint16"
    with pytest.raises(ConfigError, match="uint16"):
        prepare(str(tmp_path / "big"), stages=("ingest", "tokenizer", "tokenize"), **big)


def _pack(policy: str, docs: list[list[int]], sacred: set[int] = frozenset(), batch_docs: int = 0):
    p = Packer(5, policy, pad_id=0, dtype=np.dtype(np.uint16), batch_docs=batch_docs)
    rows = []
    for i, d in enumerate(docs):
        rows += [r.tolist() for r, _ in p.feed(np.array(d, dtype=np.uint16), i, i in sacred)]
    rows += [r.tolist() for r, _ in p.finish()]
    return rows, p


def test_packing_policies_against_hand_computed_rows():
    docs = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]]
    rows, p = _pack("carry", docs)
    assert rows == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15], [16, 0, 0, 0, 0]]
    assert p.discarded == 0 and p.padded == 4
    # huginn: cur reaches 7 >= 5 before doc 2 → emit first 5, incinerate [6, 7]; the tail is dropped at the end
    rows, p = _pack("huginn", docs)
    assert rows == [[1, 2, 3, 4, 5], [8, 9, 10, 11, 12]] and p.discarded == 2 + 4
    # a sacred last document carries its overflow instead
    rows, _ = _pack("huginn", docs, sacred={1})
    assert rows == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    rows, _ = _pack("truncate", docs, sacred={1})
    assert rows == [[1, 2, 3, 4, 5], [8, 9, 10, 11, 12]]
    # meta: BOS offsets of document starts and their sources
    p = Packer(5, "carry", 0, np.dtype(np.uint16))
    (_, meta), = list(p.feed(np.array([1, 2, 3], np.uint16), 0, False)) + list(p.feed(np.array([4, 5], np.uint16), 1,
                                                                                   False))
    assert meta == {"doc_starts": [0, 3], "source_ids": [0, 1]}


def test_tar_members_match_tarfile_and_webdataset_reads_them(tmp_path: Path):
    import io
    import tarfile

    from recdepth.prep.shard import _member, _npy_header, write_shard

    info = tarfile.TarInfo("000000000007.tokens.npy")
    info.size, info.mtime, info.mode = 5, 0, 0o644
    assert _member(info.name, b"hello") == info.tobuf(format=tarfile.USTAR_FORMAT) + b"hello" + b"\0" * 507
    rows = [(np.arange(9, dtype=np.uint16) + k, {"doc_starts": [0], "source_ids": [0]}) for k in range(3)]
    write_shard(tmp_path / "s.tar", 40, rows, _npy_header(np.dtype(np.uint16), 9))
    import webdataset as wds

    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["000000000040", "000000000041", "000000000042"]
    assert np.load(io.BytesIO(samples[2]["tokens.npy"])).tolist() == list(range(2, 11))
    assert json.loads(samples[0]["meta.json"]) == {"doc_starts": [0], "source_ids": [0]}


def _reference_rows(policy: str, L: int, docs: list[np.ndarray], srcs: list[int], sacred: set[int], batch_docs: int):
    p = Packer(L, policy, pad_id=9, dtype=np.dtype(np.uint16), batch_docs=batch_docs)
    rows = []
    for d, s in zip(docs, srcs):
        rows += list(p.feed(d, s, s in sacred))
    rows += list(p.finish())
    metas = [json.dumps(m, separators=(",", ":")).encode() for _, m in rows]
    return [r.tolist() for r, _ in rows], metas, p


@pytest.mark.parametrize("policy", ["carry", "huginn", "truncate"])
def test_stream_packer_equals_reference_packer_on_random_documents(policy: str):
    from recdepth.prep.shard import StreamPacker

    r = np.random.default_rng(3)
    for trial in range(60):
        L = int(r.integers(1, 12))
        n = int(r.integers(0, 80))
        lens = r.integers(0, 3 * L + 2, n) if trial % 3 else r.integers(0, 3, n)  # incl. empty and tiny documents
        docs = [r.integers(0, 1000, k).astype(np.uint16) for k in lens]
        srcs = r.integers(0, 4, n).tolist()
        sacred = {int(x) for x in r.integers(0, 4, int(r.integers(0, 3)))}
        batch_docs = int(r.integers(0, 6)) if trial % 2 else 0
        want_rows, want_meta, ref = _reference_rows(policy, L, docs, srcs, sacred, batch_docs)
        sp = StreamPacker(L, policy, pad_id=9, dtype=np.dtype(np.uint16), batch_docs=batch_docs)
        got_rows, got_meta, i = [], [], 0
        while i < n:  # feed in random batches, as record batches arrive
            j = min(n, i + int(r.integers(1, 20)))
            src = np.array(srcs[i:j], dtype=np.int64)
            rows, metas = sp.add(docs[i:j], src, np.isin(src, list(sacred)))
            got_rows += rows.tolist()
            got_meta += metas
            i = j
        rows, metas = sp.finish()
        got_rows += rows.tolist()
        got_meta += metas
        assert got_rows == want_rows and got_meta == want_meta, (policy, trial)
        assert (sp.kept, sp.discarded, sp.padded) == (ref.kept, ref.discarded, ref.padded)
        assert sp.discarded_by_source == ref.discarded_by_source


def test_shard_buffer_matches_member_by_member_tar(tmp_path: Path):
    from recdepth.prep.shard import _member, _npy_header, shard_bytes, write_shard, write_shard_rows

    header = _npy_header(np.dtype(np.uint16), 7)
    rows = np.arange(5 * 7, dtype=np.uint16).reshape(5, 7)
    metas = [json.dumps({"doc_starts": list(range(k)), "source_ids": [k] * (k * 40)}, separators=(",", ":")).encode()
             for k in range(5)]  # meta.json from empty-ish to over one tar block
    want = b"".join(_member(f"{90 + i:012d}.tokens.npy", header + rows[i].tobytes())
                    + _member(f"{90 + i:012d}.meta.json", metas[i]) for i in range(5)) + b"\0" * 1024
    assert shard_bytes(90, rows, metas, header) == want
    write_shard(tmp_path / "a.tar", 90, [(rows[i], json.loads(metas[i])) for i in range(5)], header)
    assert (tmp_path / "a.tar").read_bytes() == want
    big = write_shard_rows(tmp_path / "b.tar", 90, np.zeros((9, 7), np.uint16), [b"{}"] * 9, header)
    dig = write_shard_rows(tmp_path / "c.tar", 90, rows, metas, header)  # reuses the larger buffer
    assert (tmp_path / "c.tar").read_bytes() == want and dig["bytes"] == len(want) and big["bytes"] > len(want)
    import hashlib

    assert dig["sha256"] == hashlib.sha256(want).hexdigest()
