"""Analytic parameter counts (model spec §8) and FLOPs per token (training spec §9) for MFU and planning.

Matmul FLOPs are 2 per multiply-accumulate. With N_out the weights outside the loop (prelude, coda, head)
and N_it those of one recurrence (adapter + core blocks), a token at depth r = n + k costs

    forward    2(N_out + (n+k)·N_it) + A_l·(L_pc + L_c·(n+k))
    backward   4(N_out + k·N_it)     + 2·A_l·(L_pc + L_c·k)        (only the last k iterations)
    recompute  2k·N_it               + A_l·L_c·k                   (per-iteration checkpointing only)

where L_pc = prelude + coda layers, L_c = core layers and A_l = 2·d·(S + 1) is causal attention
(q·kᵀ and p·v over on average (S + 1)/2 keys) per token per layer. Norms, RoPE, softmax, SiLU and the
embedding gather are not counted; the tied head is counted once (as a matmul, in N_out).
"""

from __future__ import annotations

from dataclasses import dataclass

from recdepth.config import ModelConfig, RecurrenceConfig


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token, split by pass, so MFU (model) and HFU (hardware) come from one count."""

    forward: float
    backward: float
    recompute: float

    @property
    def model(self) -> float:
        """FLOPs the algorithm needs: forward + backward (MFU numerator)."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        """FLOPs the device executes, including activation-checkpoint recompute (HFU numerator)."""
        return self.model + self.recompute


def _block_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one SandwichBlock that enter a matmul: Wqkv + proj (4d²) and the gated MLP (3dI)."""
    d = cfg.n_embd
    return 4 * d * d + 3 * d * cfg.intermediate_size


def outer_params(cfg: ModelConfig) -> int:
    """N_out: matmul weights outside the recurrence (prelude, coda, head V·d); 1,927,495,680 for nebel."""
    return (cfg.n_prelude + cfg.n_coda) * _block_matmul_params(cfg) + cfg.vocab_size * cfg.n_embd


def iteration_params(cfg: ModelConfig) -> int:
    """N_it: matmul weights of one recurrence (core blocks + adapter 2d²); 1,637,222,400 for nebel."""
    return cfg.n_core * _block_matmul_params(cfg) + 2 * cfg.n_embd * cfg.n_embd


def attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """A_l = 2·d·(S+1): causal attention FLOPs per token per layer, forward (scores + weighted sum)."""
    return 2.0 * cfg.n_embd * (seq_len + 1)


def flops_per_token(
    cfg: ModelConfig, n: float, k: float, seq_len: int | None = None, checkpointing: bool | None = None
) -> FlopCount:
    """FLOPs per token of one training step at n no-grad and k grad iterations (training spec §9).

    n and k may be fractional (expectations); the count is linear in both.
    """
    S = cfg.block_size if seq_len is None else seq_len
    ckpt = cfg.activation_checkpointing == "per-iteration" if checkpointing is None else checkpointing
    n_out, n_it, a_l = outer_params(cfg), iteration_params(cfg), attention_flops(cfg, S)
    l_pc, l_c = cfg.n_prelude + cfg.n_coda, cfg.n_core
    forward = 2.0 * (n_out + (n + k) * n_it) + a_l * (l_pc + l_c * (n + k))
    backward = 4.0 * (n_out + k * n_it) + 2.0 * a_l * (l_pc + l_c * k)
    recompute = (2.0 * k * n_it + a_l * l_c * k) if ckpt else 0.0
    return FlopCount(forward=forward, backward=backward, recompute=recompute)


def mean_depths(recurrence: RecurrenceConfig, samples: int = 10000) -> tuple[float, float]:
    """Mean (n, k) of the sampler's draws for micro-steps 1..samples (rank 0)."""
    from recdepth.model.sampler import DepthSampler

    sampler = DepthSampler(recurrence)
    total_n = total_k = 0
    for step in range(1, samples + 1):
        n, k = sampler.draw(step, 0)
        total_n += n
        total_k += k
    return total_n / samples, total_k / samples


def expected_flops_per_token(
    cfg: ModelConfig,
    recurrence: RecurrenceConfig,
    seq_len: int | None = None,
    checkpointing: bool | None = None,
    samples: int = 10000,
) -> FlopCount:
    """Mean FLOPs per token over the sampler's draws for steps 1..samples (linear, so mean n and k suffice)."""
    n, k = mean_depths(recurrence, samples)
    return flops_per_token(cfg, n, k, seq_len, checkpointing)


def count_params(cfg: ModelConfig, r: float = 32) -> dict[str, int]:
    """Analytic parameter breakdown (model spec §8.1/§8.2); `unfolded` = total + (r − 1)·core.

    Counts unique parameters: a tied head adds nothing, an untied one adds V·d (`head`).
    """
    d, i_size, v = cfg.n_embd, cfg.intermediate_size, cfg.vocab_size
    parts = {
        "wqkv": 3 * d * d,
        "attn_proj": d * d,
        "fc": 2 * d * i_size,
        "mlp_proj": d * i_size,
        "qk_bias": 2 * d if cfg.qk_bias else 0,
        "norms": 4 * d,
    }
    per_block = sum(parts.values())
    out = {
        "embedding": v * d,
        **{f"block_{key}": value for key, value in parts.items()},
        "per_block": per_block,
        "blocks": cfg.n_layers * per_block,
        "adapter": 2 * d * d,
        "ln_f": d,
        "head": 0 if cfg.tie_embeddings else v * d,
    }
    out["total"] = out["embedding"] + out["blocks"] + out["adapter"] + out["ln_f"] + out["head"]
    out["core"] = cfg.n_core * per_block
    out["non_recurrent"] = out["total"] - out["core"]
    out["unfolded"] = round(out["total"] + (r - 1) * out["core"])
    return out
