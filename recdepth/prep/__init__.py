"""Data preparation stages: ingest, tokenizer, tokenize, shuffle, shard, and the `stats` check (`tools/prep.py`)."""

from __future__ import annotations

from typing import Any

from recdepth.prep.config import STAGES, PrepConfig, prep_config


def run(cfg: Any) -> dict | None:
    """Run the stage named by `cfg.stage`; returns its manifest (None when `limit_units` left work)."""
    pc = prep_config(cfg)
    return run_stage(pc)


def run_stage(pc: PrepConfig) -> dict | None:
    import importlib

    module = importlib.import_module(f"recdepth.prep.{pc.stage}")
    return getattr(module, f"run_{pc.stage}")(pc)  # only the stage's own imports (no torch in prep processes)


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
