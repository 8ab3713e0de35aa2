"""Optimizers: parameter groups with their weight-decay rules, ELLISAdam, and the builder (spec §4-§5)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from recdepth.config import OptimConfig
from recdepth.errors import ConfigError

GROUP_NAMES = ("weights", "embedding", "scale_and_norm")

# matched on the lower-cased parameter name, in this order; the first rule that matches wins (spec §4)
_EMBEDDING_KEYS = ("wte", "embedding", "abacus", "lm_head")
_SCALE_AND_NORM_KEYS = ("ln_f", "norm", "bias", "diff_lmb")
_WEIGHT_KEYS = ("proj", "qkv", "fc")

_BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _group_of(name: str, param: Tensor) -> str:
    lower = name.lower()
    if any(key in lower for key in _EMBEDDING_KEYS):
        return "embedding"
    if any(key in lower for key in _SCALE_AND_NORM_KEYS):
        return "scale_and_norm"
    if any(key in lower for key in _WEIGHT_KEYS) or param.dim() == 2:
        return "weights"
    raise ConfigError(
        f"parameter {name!r} (shape {tuple(param.shape)}) matches no parameter-group rule: expected a name "
        f"containing one of {_EMBEDDING_KEYS + _SCALE_AND_NORM_KEYS + _WEIGHT_KEYS} or a 2-D tensor"
    )


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split trainable parameters into [weights, embedding, scale_and_norm] with their weight decay.

    Every group is returned (possibly empty) so the layout, and thus the optimizer state dict, does not depend
    on the model. Tied parameters appear once because `named_parameters()` deduplicates them.
    """
    params: dict[str, list[Tensor]] = {name: [] for name in GROUP_NAMES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[_group_of(name, p)].append(p)
    decay = {
        "weights": cfg.weight_decay,
        "embedding": 0.0 if cfg.no_wd_on_embedding else cfg.weight_decay,
        "scale_and_norm": 0.0 if cfg.no_wd_for_bias_and_norm else cfg.weight_decay,
    }
    # base_lr is the per-group LR multiplier (the 1/μP factor for weights; 1.0 everywhere in huginn-0125)
    return [
        {"name": name, "params": params[name], "base_lr": 1.0, "lr": cfg.lr, "weight_decay": decay[name]}
        for name in GROUP_NAMES
    ]


class ELLISAdam(torch.optim.Optimizer):
    """Adam variant of huginn-0125 (spec §5); the production flags reproduce its closed-form update.

    Options (all per group):
    - `atan_adam`: u = atan2(m, √v̂), bounded and scale-invariant, no ε.
    - `update_clipping`: v ← max(v, ε²) in place; the step is divided by max(√mean(g²/v), 1).
    - `running_init`: m = g, v = g² at creation (bias correction still applied).
    - `decouple_wd`: decay (η_t/η₀)·λ with η₀ = `init_lr`, so it follows the schedule; else η_t·λ.
    - `eps_adjustment`: u = m/√(v̂ + ε²) instead of m/(√v̂ + ε).
    - `nesterov`: NAdam-style lerp by 1 − β1², undone after the update so m stays the plain EMA.
    - `tensor_wise_finite_check`: a tensor with non-finite grads is skipped (no state change, no step count).
    - `tensor_wise_gradient_normalization`: g ← g/‖g‖₂.
    - `buffer_dtype`: dtype of m, v and the Kahan buffer (default: the parameter's).

    Changes from the reference (its defects, training spec §15 #19):
    - `kahan_sum` is fixed: p + K is the exact parameter and decays as a whole (K ← K(1 − d) − d·p − a·u), and
      `p.grad` is never written; the reference decayed only the buffer, never p, and clobbered the gradient.
    - η₀ is the explicit `init_lr` argument (the config's peak lr), not the lr the groups were built with.
    - dropped: `brute_force_clip` (normalised every update to norm ≤ 1; the global gradient clip and
      `update_clipping` cover its purpose), `adafactor_like_beta_corrections` and `poly_ema_p` (both advanced
      only the first parameter's counter; off in production), and `foreach` (a per-tensor loop only).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        *,
        init_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        decouple_wd: bool = True,
        atan_adam: bool = False,
        update_clipping: bool = False,
        running_init: bool = False,
        eps_adjustment: bool = False,
        nesterov: bool = False,
        tensor_wise_finite_check: bool = False,
        tensor_wise_gradient_normalization: bool = False,
        kahan_sum: bool = False,
        buffer_dtype: str | None = None,
    ) -> None:
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr={lr!r} is invalid: expected a finite float >= 0")
        if init_lr is not None and not init_lr > 0:
            raise ValueError(f"init_lr={init_lr!r} is invalid: expected a positive float (η₀, the peak lr)")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas={betas!r} is invalid: expected two floats in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps={eps!r} is invalid: expected a positive float")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: expected a float >= 0")
        if buffer_dtype is not None and buffer_dtype not in _BUFFER_DTYPES:
            valid = ", ".join(_BUFFER_DTYPES)
            raise ValueError(f"buffer_dtype={buffer_dtype!r} is invalid: expected None or one of {valid}")
        defaults = {
            "lr": lr,
            "init_lr": init_lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple_wd": decouple_wd,
            "atan_adam": atan_adam,
            "update_clipping": update_clipping,
            "running_init": running_init,
            "eps_adjustment": eps_adjustment,
            "nesterov": nesterov,
            "tensor_wise_finite_check": tensor_wise_finite_check,
            "tensor_wise_gradient_normalization": tensor_wise_gradient_normalization,
            "kahan_sum": kahan_sum,
            "buffer_dtype": buffer_dtype,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # without an explicit η₀ a group's decay ratio is taken against the lr it was created with
        if group["init_lr"] is None:
            group["init_lr"] = float(group["lr"])
        group["betas"] = tuple(group["betas"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("ELLISAdam does not support sparse gradients")
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        lr = float(group["lr"])
        dtype = _BUFFER_DTYPES[group["buffer_dtype"]] if group["buffer_dtype"] else p.dtype
        g = p.grad.to(dtype)  # may alias p.grad: only out-of-place ops on g below
        if group["tensor_wise_finite_check"] and not bool(torch.isfinite(g).all()):
            return
        if group["tensor_wise_gradient_normalization"]:
            g = g / torch.linalg.vector_norm(g).clamp_min(torch.finfo(dtype).tiny)

        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0, dtype=torch.int64)
            if group["running_init"]:
                state["exp_avg"] = g.clone(memory_format=torch.preserve_format)
                state["exp_avg_sq"] = g * g
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
            if group["kahan_sum"]:
                state["kahan"] = torch.zeros_like(p, dtype=dtype)
        m, v = state["exp_avg"], state["exp_avg_sq"]

        nesterov = group["nesterov"] and beta1 > 0
        m.lerp_(g, 1 - beta1 * beta1 if nesterov else 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

        state["step"] += 1
        t = int(state["step"])
        scale: float | Tensor = lr / (1 - beta1**t)
        if group["update_clipping"]:
            v.clamp_min_(eps * eps)
            scale = scale / (g * g / v).mean().sqrt().clamp_min(1.0)
        c2 = 1 - beta2**t
        decay = (lr / group["init_lr"] if group["decouple_wd"] else lr) * group["weight_decay"]

        if group["atan_adam"]:
            u = torch.atan2(m, (v / c2).sqrt())
        elif group["eps_adjustment"]:
            u = m / (v / c2 + eps * eps).sqrt()
        else:
            u = m / ((v / c2).sqrt() + eps)
        u.mul_(scale)

        if group["kahan_sum"]:
            # compensated: p + kahan is the exact parameter; the update, decay of that sum included, goes into
            # kahan, p takes what its precision can hold, and kahan keeps the rest
            kahan = state["kahan"]
            kahan.mul_(1 - decay).add_(p.to(dtype), alpha=-decay).sub_(u)
            p_old = p.to(dtype, copy=True)
            p.add_(kahan.to(p.dtype))
            kahan.sub_(p.to(dtype) - p_old)
        elif dtype == p.dtype:
            p.mul_(1 - decay).sub_(u)
        else:
            p.copy_(p.to(dtype).mul_(1 - decay).sub_(u))

        if nesterov:
            m.add_(g - m, alpha=1 - 1 / beta1)  # undo the extra lerp: m is the plain EMA again

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then restore the saved buffer dtypes (torch casts them to the param dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for p, i in zip(params, saved_ids, strict=True):
            saved = state_dict["state"].get(i)
            if saved is None:
                continue
            device = {k: torch.device("cpu") if k == "step" else p.device for k in saved}
            self.state[p] = {k: v.to(device[k], copy=True) for k, v in saved.items()}


def _fused_ok(params: list[Tensor]) -> bool:
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig, shard_group: Any = None) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `param_groups(model, cfg)`; groups keep "name" and "base_lr".

    With `shard_group` (a process group, `optim.shard=node|world`) the state is partitioned over its ranks by
    parameter bytes (torch's ZeroRedundancyOptimizer); the schedule sets the LR on the local groups that do
    the update (see `schedule.apply_lr`), and gradients stay fully all-reduced as in the reference.
    """
    groups = param_groups(model, cfg)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        params = [p for g in groups for p in g["params"]]
        # the fused kernel exists on CPU and CUDA and is the fastest; elsewhere torch picks foreach/for-loop
        cls: type = torch.optim.AdamW
        kwargs: dict[str, Any] = {"fused": True if _fused_ok(params) else None}
    elif cfg.name == "ellis_adam":
        cls = ELLISAdam
        kwargs = dict(
            init_lr=cfg.lr,
            decouple_wd=cfg.decouple_wd,
            atan_adam=cfg.atan_adam,
            update_clipping=cfg.update_clipping,
            running_init=cfg.running_init,
            eps_adjustment=cfg.eps_adjustment,
            nesterov=cfg.nesterov,
            tensor_wise_finite_check=cfg.tensor_wise_finite_check,
            tensor_wise_gradient_normalization=cfg.tensor_wise_gradient_normalization,
            kahan_sum=cfg.kahan_sum,
            buffer_dtype=cfg.buffer_dtype,
        )
    else:
        raise ConfigError(f"optim.name={cfg.name!r} is invalid: expected one of adamw, ellis_adam")
    kwargs.update(lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if shard_group is None:
        return cls(groups, **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=shard_group, **kwargs)
