"""Data preparation stages: ingest, tokenizer, tokenize, shuffle, shard (driven by `tools/prep.py`)."""

from __future__ import annotations

from typing import Any

from recdepth.prep.config import STAGES, PrepConfig, prep_config


def run(cfg: Any) -> dict | None:
    """Run the stage named by `cfg.stage`; returns its manifest (None when `limit_units` left work)."""
    pc = prep_config(cfg)
    return run_stage(pc)


def run_stage(pc: PrepConfig) -> dict | None:
    from recdepth.prep.ingest import run_ingest
    from recdepth.prep.shard import run_shard
    from recdepth.prep.shuffle import run_shuffle
    from recdepth.prep.tokenize import run_tokenize
    from recdepth.prep.tokenizer import run_tokenizer

    return {"ingest": run_ingest, "tokenizer": run_tokenizer, "tokenize": run_tokenize, "shuffle": run_shuffle,
            "shard": run_shard}[pc.stage](pc)


def prepare(out_dir: str, stages: tuple[str, ...] = STAGES, **overrides: Any) -> dict[str, dict | None]:
    """Run several stages in order with one config (the Python equivalent of chained `tools/prep.py` calls)."""
    out: dict[str, dict | None] = {}
    for stage in stages:
        pc = prep_config(None, **{**overrides, "stage": stage, "out_dir": str(out_dir)})
        out[stage] = run_stage(pc)
        if out[stage] is None:
            break
    return out


__all__ = ["STAGES", "PrepConfig", "prep_config", "prepare", "run", "run_stage"]
