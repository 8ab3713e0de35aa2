"""Transformer pieces of huginn-0125: RMSNorm, interleaved RoPE, fused-QKV attention, gated MLP, SandwichBlock.

Module and parameter names match the reference (`norm_1..4`, `attn.Wqkv`, `attn.qk_bias`, `attn.proj`,
`mlp.fc`, `mlp.proj`) so state dicts move between the two without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, rounded to the input dtype, then times an fp32 weight (reference rounding order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.dtype == torch.float32:
                # fused kernel; identical to the manual form below for fp32 inputs
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            xf = x.float()
            normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
            return normed * self.weight


def rope_table(head_dim: int, block_size: int, base: float) -> Tensor:
    """(cos, sin) of p·θ_i, θ_i = base^(−2i/head_dim): fp32 [1, block_size, 1, head_dim/2, 2]."""
    theta = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), theta)  # [S, hd/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(0).unsqueeze(2)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs (x_{2i}, x_{2i+1}) of x [B, S, H, hd] by freqs [1, S, 1, hd/2, 2], in fp32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        xp = x.float().unflatten(-1, (-1, 2))  # [B, S, H, hd/2, 2]
        x0, x1 = xp.unbind(-1)
        cos, sin = freqs.unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention: fused Wqkv, per-head qk_bias added before RoPE, SDPA, output proj."""

    def __init__(self, n_embd: int, n_heads: int, qk_bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = n_embd // n_heads
        self.Wqkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        if qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, n_heads, self.head_dim))
        else:
            self.register_parameter("qk_bias", None)

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.Wqkv(x).view(B, S, 3, self.n_heads, self.head_dim).unbind(2)  # each [B, S, H, hd]
        if self.qk_bias is not None:
            q = (q + self.qk_bias[0]).to(q.dtype)
            k = (k + self.qk_bias[1]).to(k.dtype)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # [B, H, S, hd]
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class GatedMLP(nn.Module):
    """SwiGLU with one fused `fc` (rows 0:I gate, I:2I up) and an output `proj`."""

    def __init__(self, n_embd: int, intermediate_size: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 2 * intermediate_size, bias=False)
        self.proj = nn.Linear(intermediate_size, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """x = norm_2(x + attn(norm_1(x))); x = norm_4(x + mlp(norm_3(x)))."""

    def __init__(self, n_embd: int, n_heads: int, intermediate_size: int, eps: float, qk_bias: bool):
        super().__init__()
        self.norm_1 = RMSNorm(n_embd, eps)
        self.attn = Attention(n_embd, n_heads, qk_bias)
        self.norm_2 = RMSNorm(n_embd, eps)
        self.mlp = GatedMLP(n_embd, intermediate_size)
        self.norm_3 = RMSNorm(n_embd, eps)
        self.norm_4 = RMSNorm(n_embd, eps)

    def forward(self, x: Tensor, freqs: Tensor) -> Tensor:
        x = self.norm_2(x + self.attn(self.norm_1(x), freqs))
        return self.norm_4(x + self.mlp(self.norm_3(x)))
