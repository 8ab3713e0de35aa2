"""Validation loss at several recurrence depths: the test-time-compute curve of a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from recdepth.config import EvalConfig, RecurrenceConfig


def eval_depths(cfg: EvalConfig, recurrence: RecurrenceConfig) -> list[int]:
    """The configured depths up to twice the trained mean, plus the mean itself, ascending."""
    limit = 2 * recurrence.mean
    depths = {d for d in cfg.depths if d <= limit} | {recurrence.mean}
    return sorted(depths)


@torch.no_grad()
def evaluate(model, batches, depths: list[int], seed: int, fabric=None) -> dict[int, float]:
    """Mean token loss per depth on fixed batches with a fixed initial state, averaged over ranks.

    `model` is the module to call (possibly Fabric-wrapped); (n, k) = (depth, 0) as in the reference.
    The initial state of batch i is drawn from a generator seeded with (seed, i), so every depth and every
    round sees the same noise and curves are comparable.
    """
    was_training = model.training
    model.eval()
    losses = torch.zeros(len(depths), dtype=torch.float64)
    for j, depth in enumerate(depths):
        total = 0.0
        for i, (inputs, labels) in enumerate(batches):
            gen = torch.Generator(device=inputs.device).manual_seed(seed * 1_000_003 + i)
            out = model(inputs, labels=labels, num_steps=(depth, 0), generator=gen, return_logits=False)
            total += float(out.loss)
        losses[j] = total / max(len(batches), 1)
    if fabric is not None and fabric.world_size > 1:
        losses = fabric.all_reduce(losses, reduce_op="mean")
    model.train(was_training)
    return {d: float(v) for d, v in zip(depths, losses.tolist())}


def depth_table(results: dict[int, float]) -> str:
    lines = ["depth | val loss | val ppl", "------+----------+--------"]
    for d, loss in sorted(results.items()):
        lines.append(f"{d:5d} | {loss:8.4f} | {math.exp(min(loss, 50)):7.2f}")
    return "\n".join(lines)


def save_depth_curve(results: dict[int, float], out_dir: Path, step: int) -> Path:
    """Write eval/depth-<step>.json and a PNG plot of loss vs. depth; returns the PNG path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"depth-{step:08d}"
    stem.with_suffix(".json").write_text(json.dumps({"step": step, "loss": {str(k): v for k, v in results.items()}},
                                                    indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted(results)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(depths, [results[d] for d in depths], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrence depth r (test time)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"test-time compute curve, step {step}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png = stem.with_suffix(".png")
    fig.savefig(png)
    plt.close(fig)
    return png
