"""Turn a logging window's raw numbers into named scalars (train/, optim/, recurrence/, perf/)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# dense bf16 peaks per device (TFLOP/s); MFU is reported only when the peak is known or configured
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "MI250X": 191.5, "MI300X": 1307.0}


def device_peak_tflops(configured: float) -> float | None:
    """The configured peak, else a lookup of the CUDA device name; None (MFU absent) when unknown."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


@dataclass
class Window:
    """Accumulates one logging window of optimizer steps."""

    losses: list[float] = field(default_factory=list)
    n: list[float] = field(default_factory=list)
    k: list[float] = field(default_factory=list)
    model_flops: float = 0.0  # per-token model FLOPs summed over micro-steps
    hw_flops: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    telemetry: dict[str, float] = field(default_factory=dict)
    checksum: float = 0.0  # of the last step's input rows (exact-replay checks)

    def add_micro(self, loss: float, n: int, k: int, model_flops: float, hw_flops: float, tokens: int) -> None:
        self.losses.append(loss)
        self.n.append(n)
        self.k.append(k)
        self.model_flops += model_flops * tokens
        self.hw_flops += hw_flops * tokens
        self.tokens += tokens


def window_scalars(w: Window, *, world_size: int, peak_tflops: float | None) -> dict[str, float]:
    """Scalars of a window: loss/ppl, sampled depths, tokens/s, FLOP/s, MFU/HFU, recurrence telemetry."""
    out: dict[str, float] = {}
    if w.losses:
        loss = sum(w.losses) / len(w.losses)
        out["train/loss"] = loss
        out["train/ppl"] = math.exp(min(loss, 50.0))
        out["train/mbs_loss"] = w.losses[-1]
        out["recurrence/num_steps_no_grad"] = sum(w.n) / len(w.n)
        out["recurrence/num_steps_with_grad"] = sum(w.k) / len(w.k)
    if w.seconds > 0:
        tokens_global = w.tokens * world_size
        out["perf/tokens_per_s"] = tokens_global / w.seconds
        out["perf/tflops"] = w.model_flops * world_size / w.seconds / 1e12
        if peak_tflops:
            out["perf/mfu"] = w.model_flops / w.seconds / (peak_tflops * 1e12)
            out["perf/hfu"] = w.hw_flops / w.seconds / (peak_tflops * 1e12)
    for key, value in w.telemetry.items():
        out[key if "/" in key else f"recurrence/{key}"] = value
    return out


@torch.no_grad()
def param_scalars(model: torch.nn.Module) -> dict[str, float]:
    """Parameter-norm telemetry: whole model, the recurrent core, the word embedding."""
    def l2(params) -> float:
        return math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))

    core = [p for n, p in model.named_parameters() if ".core_block." in n]
    wte = [p for n, p in model.named_parameters() if "wte" in n]
    return {
        "optim/model_l2_param_norm": l2(model.parameters()),
        "optim/core_block_l2_param_norm": l2(core),
        "optim/word_embed_l2_param_norm": l2(wte),
    }


@torch.no_grad()
def grad_scalars(model: torch.nn.Module) -> dict[str, float]:
    """Per-block gradient norms of the query rows of Wqkv and of mlp.proj (post-clip), block index i in
    execution order (prelude, core, coda)."""
    blocks = [*model.transformer.prelude, *model.transformer.core_block, *model.transformer.coda]
    d = model.cfg.n_embd
    out: dict[str, float] = {}
    for i, blk in enumerate(blocks):
        if blk.attn.Wqkv.weight.grad is not None:
            out[f"grads/query_grad_{i}"] = float(blk.attn.Wqkv.weight.grad[:d].float().norm())
        if blk.mlp.proj.weight.grad is not None:
            out[f"grads/ffn2_grad_{i}"] = float(blk.mlp.proj.weight.grad.float().norm())
    return out


def memory_scalars(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    out = {
        "perf/max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "perf/max_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out
