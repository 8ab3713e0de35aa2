"""RecurrentLM: the huginn-0125 depth-recurrent transformer (model spec §2).

    e0 = √d · wte[ids]                      [B, S, d]
    e  = prelude(e0)                        [B, S, d]   fixed during the loop
    s  = like_init()                        [B, S, d]   random state (or caller-supplied)
    repeat n times without grad, then k times with grad:
        s = core(adapter(concat(s, e)))     [B, S, d]   one checkpoint region per grad iteration
    y  = ln_f(coda(ln_f(s)))                [B, S, d]
    logits = y · wteᵀ                       [B, S, V]   fp32
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recdepth.config import ModelConfig, RecurrenceConfig
from recdepth.errors import ConfigError
from recdepth.model.init import init_takase, takase_std
from recdepth.model.layers import RMSNorm, SandwichBlock, rope_table
from recdepth.model.sampler import DepthSampler


@dataclass
class Output:
    loss: Tensor | None
    logits: Tensor | None
    stats: dict[str, float] = field(default_factory=dict)


def _token_corr(x: Tensor) -> float:
    """Mean pairwise cosine between tokens of the centred state, minus 1/S (≈0 healthy, →1 collapsed)."""
    x = x.float()
    xc = x - x.mean(dim=1, keepdim=True)
    xn = F.normalize(xc, dim=-1)
    S = x.shape[1]
    # Σ_ij cos_ij = ‖Σ_i x̂_i‖², so the mean needs no S×S matrix
    total = xn.sum(dim=1).pow(2).sum(-1)  # [B]
    return float((total / (S * S)).mean()) - 1.0 / S


class RecurrentLM(nn.Module):
    """Prelude, adapter + core block iterated r = n + k times, coda; tied embeddings; huginn-0125 names."""

    def __init__(self, cfg: ModelConfig, recurrence: RecurrenceConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.recurrence = recurrence or RecurrenceConfig()
        self.sampler = DepthSampler(self.recurrence)
        self.step = 0  # micro-step counter, set by the trainer before each forward
        self.rank = 0  # global rank, only used when lockstep is off
        d = cfg.n_embd

        def block() -> SandwichBlock:
            return SandwichBlock(d, cfg.n_heads, cfg.intermediate_size, cfg.norm_eps, cfg.qk_bias)

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, d),
                prelude=nn.ModuleList(block() for _ in range(cfg.n_prelude)),
                adapter=nn.Linear(2 * d, d, bias=False),
                core_block=nn.ModuleList(block() for _ in range(cfg.n_core)),
                coda=nn.ModuleList(block() for _ in range(cfg.n_coda)),
                ln_f=RMSNorm(d, cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("freqs_cis", rope_table(cfg.head_dim, cfg.block_size, cfg.rope_base), persistent=True)
        self.embed_scale = math.sqrt(d)
        self.state_std = takase_std(cfg, self.recurrence.expected_depth)[0]
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ setup

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_takase(self, self.cfg, self.recurrence.expected_depth, generator)
        if self.freqs_cis.device.type != "meta":
            self.freqs_cis.copy_(rope_table(self.cfg.head_dim, self.cfg.block_size, self.cfg.rope_base))

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block; the recurrence loop and the sampler stay eager (variable trip count)."""
        for name in ("prelude", "core_block", "coda"):
            for blk in self.transformer[name]:
                blk.compile(**kwargs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------------- forward

    def initial_state(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`like-init`: truncated normal N(0, σ²) in ±3σ, times √d (per-element std ≈ 0.62 at any d)."""
        x = torch.empty(like.shape, device=like.device, dtype=torch.float32)
        nn.init.trunc_normal_(x, 0.0, self.state_std, -3 * self.state_std, 3 * self.state_std, generator=generator)
        return (x * self.embed_scale).to(like.dtype)

    def core_step(self, state: Tensor, embeds: Tensor, freqs: Tensor) -> Tensor:
        x = self.transformer.adapter(torch.cat([state, embeds], dim=-1))
        for blk in self.transformer.core_block:
            x = blk(x, freqs)
        return x

    def draw_steps(self, step: int | None = None) -> tuple[int, int]:
        """(n, k) for this forward: the sampler's draw in training, the mean depth without grad in eval."""
        if not self.training:
            return self.sampler.eval_steps()
        return self.sampler.draw(self.step if step is None else step, self.rank)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        num_steps: tuple[int, int] | int | None = None,
        step: int | None = None,
        input_states: Tensor | None = None,
        generator: torch.Generator | None = None,
        telemetry: bool = False,
        return_logits: bool = True,
    ) -> Output:
        B, S = input_ids.shape
        if S > self.cfg.block_size:
            raise ConfigError(
                f"sequence length {S} exceeds the RoPE table: model.block_size={self.cfg.block_size}"
            )
        if num_steps is None:
            n, k = self.draw_steps(step)
        elif isinstance(num_steps, int) or (isinstance(num_steps, Tensor) and num_steps.ndim == 0):
            n, k = int(num_steps), 0  # a scalar m means (m, 0), as in the reference
        else:
            n, k = (int(v) for v in num_steps)
        if n < 0 or k < 0 or n + k == 0:
            raise ConfigError(f"num_steps=({n}, {k}) is invalid: expected (n, k) with n >= 0, k >= 0, n + k >= 1")
        freqs = self.freqs_cis[:, :S]

        x = self.transformer.wte(input_ids) * self.embed_scale
        for blk in self.transformer.prelude:
            x = blk(x, freqs)
        embeds = x
        state = self.initial_state(embeds, generator) if input_states is None else input_states

        with torch.no_grad():
            for _ in range(n):
                prev, state = state, self.core_step(state, embeds, freqs)
        ckpt = self.cfg.activation_checkpointing == "per-iteration" and torch.is_grad_enabled()
        for _ in range(k):
            prev = state.detach()
            if ckpt:
                state = checkpoint(self.core_step, state, embeds, freqs, use_reentrant=False, preserve_rng_state=False)
            else:
                state = self.core_step(state, embeds, freqs)

        x = self.transformer.ln_f(state)
        latent = x
        for blk in self.transformer.coda:
            x = blk(x, freqs)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        stats: dict[str, float] = {"num_steps_no_grad": float(n), "num_steps_with_grad": float(k)}
        if telemetry:
            stats.update(self._telemetry(state.detach(), prev, embeds.detach(), x.detach(), latent.detach()))
        return Output(loss=loss, logits=logits if return_logits else None, stats=stats)

    @torch.no_grad()
    def _telemetry(self, state: Tensor, prev: Tensor, embeds: Tensor, last: Tensor, latent: Tensor) -> dict:
        """Recurrence telemetry: state norms, convergence of the last iteration, token collapse."""
        state, prev = state.float(), prev.float()
        residual = (state - prev).norm(dim=-1)
        norm = state.norm(dim=-1)
        return {
            "recurrent_state_norm": float(norm.mean()),
            "recurrent_residual": float(residual.mean()),
            "rel_residual": float((residual / norm.clamp_min(1e-12)).mean()),
            "recurrent_diff": float((state - embeds.float()).norm(dim=-1).mean()),
            "last_hidden_norm": float(last.float().norm(dim=-1).mean()),
            "recurrent_state_token_corr": _token_corr(state),
            "last_hidden_token_corr": _token_corr(last),
            "latent_state_norm": float(latent.float().norm(dim=-1).mean()),
        }
