"""Benchmarks: `python tools/bench.py <model|train|data|dist|all> [--out DIR]` prints figures and writes JSON.

Each benchmark measures the thing and its yardstick side by side in one run and reports their ratio, so the
figures are comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def bench_train(out: dict) -> None:
    """Trainer overhead: tokens/s of the full loop (data, logging, checkpoints) vs the bare model step."""
    import tempfile

    import torch
    from hydra import compose, initialize_config_dir

    import recdepth.config  # noqa: F401
    from recdepth.model import RecurrentLM
    from recdepth.train.optim import build_optimizer
    from recdepth.train.run import train, validate

    steps = 30
    overrides = [f"train.max_steps={steps}", "train.log_every=10", "eval.every=0", "checkpoint.every=10",
                 "train.progress_bar=false", "optim.warmup_steps=2", "optim.cooldown_steps=2"]
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose("train", overrides=overrides + [f"out_dir={tmp}/run"])
        cfg = validate(dcfg)
        # bare step: same model, same batch shape, same accumulation, synthetic tokens, no loop around it
        module = RecurrentLM(cfg.model, cfg.recurrence)
        opt = build_optimizer(module, cfg.optim)
        gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.block_size + 1))
        micro = 0

        def bare_step() -> None:
            nonlocal micro
            for _ in range(gas):
                micro += 1
                out_ = module(x[:, :-1], labels=x[:, 1:], step=micro, return_logits=False)
                (out_.loss / gas).backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            bare_step()
        t0 = time.perf_counter()
        micro = 0
        for _ in range(steps):
            bare_step()
        bare_s = time.perf_counter() - t0
        tokens = steps * gas * x[:, :-1].numel()
        # full loop (prepares the sample corpus first if needed; that is not timed)
        from recdepth.data import prepare_data

        prepare_data(cfg.data, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size)
        t0 = time.perf_counter()
        train(dcfg)
        wall_s = time.perf_counter() - t0
        final = sorted((Path(tmp) / "run" / "checkpoints").glob("step-*"))[-1]
        loop_s = json.loads((final / "trainer.json").read_text())["train_seconds"]
    loop_tok_s = tokens / loop_s
    out["train"] = {
        "model": cfg.model.name,
        "steps": steps,
        "bare_step_tokens_per_s": tokens / bare_s,
        "loop_tokens_per_s": loop_tok_s,  # loop time: data, step, logging, checkpoints (not eval, not startup)
        "job_wall_s": wall_s,
        "ratio_loop_vs_bare": loop_tok_s / (tokens / bare_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=["model", "train", "data", "dist", "all"])
    parser.add_argument("--out", default="bench-results", help="directory for <name>.json")
    args = parser.parse_args()
    names = ["model", "train", "data", "dist"] if args.name == "all" else [args.name]
    for name in names:
        figures: dict = {}
        if name == "model":
            from bench_model import bench_model

            bench_model(figures)
        elif name == "train":
            bench_train(figures)
        elif name == "data":
            from bench_data import bench_data

            bench_data(figures)
        elif name == "dist":
            from bench_dist import bench_dist

            bench_dist(figures)
        text = json.dumps(figures, indent=2, default=float)
        print(f"== {name}\n{text}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(text)


if __name__ == "__main__":
    main()
