"""Stage `tokenizer`: byte-level BPE (HF `tokenizers`) with the reference's special tokens and id layout.

The BPE part fills ids [0, specials_start); specials follow (huginn-0125: 65504 = BOS, 65505 = EOS,
65508 = end_turn, 65509 = pad); unused ids are `<|reserved_token_k|>` fillers so the size is exact. The
reference's lossy pre-tokenizer regex is available (`regex=aeolian`) with a catch-all fallback that keeps
every character; the dropped-character rate and a round-trip check are recorded in the manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from recdepth.errors import ConfigError, DataError
from recdepth.prep.config import PrepConfig, TokenizerConfig
from recdepth.prep.manifest import (
    UnitLog,
    atomic_write_json,
    digests,
    fingerprint_path,
    finish_stage,
    read_manifest,
    rng,
    sha256_json,
    summary_line,
    tmp_path_for,
)

SPECIALS_COMPLETE = [
    "<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|...|>", "<|del|>",
    *[f"<|c_{i}|>" for i in range(10)],
    "<|?|>", "<|&|>", "<|!|>", "<|-|>", "<|+|>", "<|interrupt|>", "<|>>-|>", "<|-<<|>", "<|->>|>", "<|<<-|>",
    "<|tool_out|>", "<|end_tool|>", "<|tool_in|>", "<|end_tool_in|>",
]  # fmt: skip
SPECIALS = {"complete": SPECIALS_COMPLETE, "huginn": SPECIALS_COMPLETE[:32], "minimal": SPECIALS_COMPLETE[:6]}
ROLES = {"bos": "<|begin_text|>", "eos": "<|end_text|>", "end_turn": "<|end_turn|>", "pad": "<|pad|>"}

# The reference's `aeolian` alternatives as described in spec/data.md §2.3 (reconstructed, not the verbatim
# pattern: to reproduce the released tokenizer exactly, validate its own tokenizer.json with `from_file`).
AEOLIAN = "|".join([  # noqa: FLY002
    r"\\n(?:ewcommand|abla|eq|ot|oindent|ewline|ewpage|u|i)\p{L}*",
    r"\n+",
    r"\\n",
    r"\p{N}",
    (r"[ \t](?:\*\*=|//=|==|!=|<=|>=|\+=|-=|\*=|/=|%=|->|=>|&&|\|\||[(){}\[\]]|\\\p{L}+|'(?:s|t|re|ve|m|ll|d)"
     r"|[\"'`]+|#+|\p{N}+(?:st|nd|rd|th)|<0x[0-9A-Fa-f]{2}>)"),
    r"[^\p{L}\p{N}]?\p{L}+",
    r"[\p{P}\p{S}]",
    r"\s+",
    r"\p{So}",
])  # fmt: skip
CATCH_ALL = r"|[\s\S]"


def build_pre_tokenizer(tc: TokenizerConfig) -> pre_tokenizers.PreTokenizer:
    if tc.regex == "bytelevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = AEOLIAN if tc.regex == "aeolian" else tc.regex
    if tc.regex_fallback:
        pattern += CATCH_ALL
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def layout(tc: TokenizerConfig) -> tuple[list[str], int]:
    """The special tokens and the id of the first one, validated against the vocabulary size."""
    specials = SPECIALS[tc.specials]
    start = tc.vocab_size - len(specials) if tc.specials_start is None else tc.specials_start
    if not 257 <= start <= tc.vocab_size - len(specials):
        raise ConfigError(
            f"tokenizer.specials_start={start} is invalid: expected 257..{tc.vocab_size - len(specials)} "
            f"({len(specials)} specials in a vocabulary of tokenizer.vocab_size={tc.vocab_size})"
        )
    return specials, start


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """bos/eos/end_turn/pad ids read from a tokenizer (never assumed)."""
    out = {}
    for role, text in ROLES.items():
        i = tok.token_to_id(text)
        if i is not None:
            out[role] = int(i)
    return out


def train_tokenizer(texts: list[str], tc: TokenizerConfig, progress: bool = False) -> Tokenizer:
    """Byte-level BPE with specials at `specials_start` and fillers so the vocabulary is exactly vocab_size."""
    specials, start = layout(tc)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = build_pre_tokenizer(tc)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=start,
        min_frequency=tc.min_frequency,
        show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=tc.max_token_length - 1,
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    k = 0

    def fill(upto: int) -> None:
        nonlocal k
        n = upto - tok.get_vocab_size()
        if n > 0:
            tok.add_tokens([AddedToken(f"<|reserved_token_{k + i}|>", special=False, normalized=False)
                            for i in range(n)])
            k += n

    fill(start)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fill(tc.vocab_size)
    ids = special_ids(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_text|> $A <|end_text|>",
        pair="<|begin_text|> $A <|end_text|> <|begin_text|> $B <|end_text|>",
        special_tokens=[("<|begin_text|>", ids["bos"]), ("<|end_text|>", ids["eos"])],
    )
    return tok


def check_tokenizer(tok: Tokenizer, tc: TokenizerConfig, where: str) -> dict[str, int]:
    """Vocabulary size and expected special ids; a mismatch is a DataError naming the file and the id."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != tc.vocab_size:
        raise DataError(f"{where}: vocabulary has {size} ids, expected tokenizer.vocab_size={tc.vocab_size}")
    ids = special_ids(tok)
    for role in ("bos", "eos"):
        if role not in ids:
            raise DataError(f"{where}: no {ROLES[role]} token (needed as {role})")
    for role, want in tc.expect_ids.items():
        if ids.get(role) != want:
            raise DataError(f"{where}: {role} id is {ids.get(role)}, expected tokenizer.expect_ids.{role}={want}")
    return ids


def sample_texts(docs_dir: Path, man: dict, tc: TokenizerConfig, seed: int) -> list[str]:
    """An exact seeded sample of up to `rows_per_source` documents per source, each cut to `max_chars`."""
    by_source: dict[str, list[tuple[str, int]]] = {}
    for u in man["units"]:
        source = u["unit"].split("/")[0]
        for rel in u["outputs"]:
            by_source.setdefault(source, []).append((rel, u["docs"]))
    texts: list[str] = []
    for source, files in sorted(by_source.items()):
        n = sum(c for _, c in files)
        k = min(n, tc.rows_per_source)
        pick = np.sort(rng(seed, "tokenizer-sample", source).choice(n, size=k, replace=False)) if k < n else None
        offset = 0
        for rel, count in files:
            col = pq.read_table(docs_dir / rel, columns=["text"]).column("text").to_pylist()
            if pick is None:
                chosen = col
            else:
                lo, hi = np.searchsorted(pick, [offset, offset + count])
                chosen = [col[i - offset] for i in pick[lo:hi]]
            texts.extend(t[: tc.max_chars] for t in chosen)
            offset += count
    return texts


def roundtrip_stats(tok: Tokenizer, texts: list[str], n: int = 64, max_chars: int = 20000) -> dict:
    """Share of sample documents that decode to themselves, and characters lost by the pre-tokenizer."""
    sample = [t[:max_chars] for t in texts[:n]]
    enc = tok.encode_batch(sample, add_special_tokens=False)
    dec = tok.decode_batch([e.ids for e in enc], skip_special_tokens=False)
    ok = sum(a == b for a, b in zip(sample, dec))
    total = sum(len(t) for t in sample)
    lost = sum(max(len(a) - len(b), 0) for a, b in zip(sample, dec))
    return {"roundtrip_docs": ok, "roundtrip_checked": len(sample), "dropped_char_rate": lost / max(total, 1)}


def write_tokenizer_files(tok: Tokenizer, out: Path, ids: dict[str, int], block_size: int | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tmp = tmp_path_for(path)
    tok.save(str(tmp))
    os.replace(tmp, path)
    inv = {v: k for k, v in tok.get_vocab(with_added_tokens=True).items()}
    names = {role: inv[i] for role, i in ids.items()}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names["bos"], "eos_token": names["eos"],
           "pad_token": names.get("pad"), "model_max_length": block_size or 4096, "clean_up_tokenization_spaces": False}
    atomic_write_json(out / "tokenizer_config.json", cfg)
    atomic_write_json(out / "special_tokens_map.json", {k + "_token": v for k, v in names.items() if k != "end_turn"})
    return [path, out / "tokenizer_config.json", out / "special_tokens_map.json"]


def run_tokenizer(cfg: PrepConfig) -> dict:
    t0 = time.time()
    tc = cfg.tokenizer
    docs_dir = Path(cfg.out_dir) / "docs"
    out = Path(cfg.out_dir) / "tokenizer"
    config = {"tokenizer": cfg.to_dict()["tokenizer"]}
    log = UnitLog(out, "tokenizer", sha256_json(config), resume=cfg.resume)
    if tc.from_file:
        src = Path(tc.from_file)
        if not src.exists():
            raise DataError(f"tokenizer.from_file={str(src)!r} does not exist")
        inputs = {"from_file": {"path": str(src), **fingerprint_path(src)}}
    else:
        man = read_manifest(docs_dir, "ingest")
        inputs = {"docs": man["fingerprint"]}
    rec = log.done("tokenizer", inputs)
    if rec is None:
        if tc.from_file:
            tok = Tokenizer.from_file(str(src))
            ids = check_tokenizer(tok, tc, str(src))
            outs = write_tokenizer_files(tok, out, ids)
            stats: dict = {}
        else:
            texts = sample_texts(docs_dir, man, tc, cfg.seed)
            if not texts:
                raise DataError(f"{docs_dir}: no documents to train the tokenizer on")
            tok = train_tokenizer(texts, tc, progress=cfg.progress)
            ids = check_tokenizer(tok, tc, str(out / "tokenizer.json"))
            stats = {"sample_docs": len(texts), **roundtrip_stats(tok, texts)}
            outs = write_tokenizer_files(tok, out, ids)
        rec = {"outputs": digests(out, outs), "ids": ids, "vocab_size": tc.vocab_size, **stats}
        rec = log.append({"unit": "tokenizer", "config_hash": log.config_hash, "inputs": inputs, **rec})
    totals = {k: rec[k] for k in ("vocab_size", "ids") if k in rec}
    totals.update({k: rec[k] for k in ("sample_docs", "roundtrip_docs", "roundtrip_checked", "dropped_char_rate")
                   if k in rec})
    man_out = finish_stage(out, "tokenizer", config, cfg.seed, inputs, [rec], [], totals, 0.0, 1)
    print(summary_line("tokenizer", {"vocab_size": tc.vocab_size, **rec["ids"]}, log.skipped, 1, out,
                       time.time() - t0))
    return man_out


def load_tokenizer(out_dir: str | os.PathLike) -> tuple[Tokenizer, dict]:
    """The tokenizer of a prepared dir and its stage manifest (ids, vocab size)."""
    d = Path(out_dir) / "tokenizer"
    man = read_manifest(d, "tokenizer")
    return Tokenizer.from_file(str(d / "tokenizer.json")), man
