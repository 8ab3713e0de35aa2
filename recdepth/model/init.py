"""`takase` initialisation of huginn-0125: truncated normals (±3σ) with σ = √(2/(5d)), outputs scaled by depth."""

from __future__ import annotations

import math

import torch
from torch import nn

from recdepth.config import ModelConfig


def takase_std(cfg: ModelConfig, mean_recurrence: float) -> tuple[float, float]:
    """(σ, σ_out): σ_out = σ / √(2 · effective depth), effective depth = prelude + coda + core · r̄."""
    std = math.sqrt(2.0 / (5.0 * cfg.n_embd))
    effective_depth = cfg.n_prelude + cfg.n_coda + cfg.n_core * mean_recurrence
    return std, std / math.sqrt(2.0 * effective_depth)


def _trunc_normal(t: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


@torch.no_grad()
def init_takase(model: nn.Module, cfg: ModelConfig, mean_recurrence: float, generator=None) -> None:
    """Initialise every parameter by its role (model spec §4); norms to 1, qk_bias to 0."""
    std, out_std = takase_std(cfg, mean_recurrence)
    d = cfg.n_embd
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if name.endswith("attn.Wqkv.weight"):
            for chunk in p.split(d, dim=0):  # q, k, v drawn separately
                _trunc_normal(chunk, std, generator)
        elif name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            _trunc_normal(p, out_std, generator)
        elif name.endswith(("mlp.fc.weight", "adapter.weight", "wte.weight", "lm_head.weight")):
            _trunc_normal(p, std, generator)
        elif name.endswith("qk_bias"):
            p.zero_()
        elif "norm" in name or name.endswith("ln_f.weight"):
            p.fill_(1.0)
        else:
            raise ValueError(f"no init rule for parameter {name}")
