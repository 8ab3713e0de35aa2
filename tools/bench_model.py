"""Model benchmark: this machine's fp32 GEMM peak, raven_small training throughput, peak step memory vs n and k.

`bench_model(out)` fills `out["model"]`; `tools/bench.py model` prints it and writes JSON. Throughput is
reported next to the GEMM peak measured in the same run, so the utilisation is comparable across machines.

Peak memory (CPU): each configuration runs in a fresh subprocess. After building the model and a small
warm-up step (kernels, thread pools) the child resets the kernel's resident-set high-water mark
(`/proc/self/clear_refs` ← 5), records the current RSS as the baseline, runs one training step
(forward + backward, gradients included) and reports VmHWM − baseline. glibc is told to serve every block
above 64 KiB by mmap (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident set at once and the
high-water mark tracks live tensor memory rather than allocator caching. Where clear_refs is unavailable
the child falls back to ru_maxrss − baseline (an upper bound) and says so.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, SEQ = 8, 256
GEMM_SHAPES = [  # (m, k, n): raven_small's matmuls at 8×256 tokens, plus square ones
    (2048, 512, 1536),  # Wqkv
    (2048, 512, 3072),  # mlp.fc
    (2048, 1536, 512),  # mlp.proj
    (2048, 1024, 512),  # adapter
    (2048, 512, 8192),  # head
    (2048, 2048, 2048),
    (4096, 4096, 4096),
]


def _small_cfg(activation_checkpointing: str | None = None):
    from omegaconf import OmegaConf

    from recdepth.config import ModelConfig

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "raven_small.yaml"))
    if activation_checkpointing is not None:
        raw["activation_checkpointing"] = activation_checkpointing
    return ModelConfig(**raw)


def gemm_peak(min_seconds: float = 0.3, repeats: int = 3) -> dict[str, Any]:
    """Best fp32 torch.matmul FLOP/s over the shapes (each: best of `repeats` timed batches of calls)."""
    import torch

    per_shape = {}
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        t0 = time.perf_counter()
        a @ b
        once = time.perf_counter() - t0
        calls = max(1, int(min_seconds / max(once, 1e-6)))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                a @ b
            best = min(best, (time.perf_counter() - t0) / calls)
        per_shape[f"{m}x{k}@{k}x{n}"] = 2.0 * m * k * n / best / 1e9
    best_shape = max(per_shape, key=per_shape.get)
    return {"gemm_gflops": per_shape, "gemm_peak_gflops": per_shape[best_shape], "gemm_peak_shape": best_shape}


def _step(model, ids, labels, num_steps) -> None:
    out = model(ids, labels=labels, num_steps=num_steps, return_logits=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def throughput(checkpointing: str, n: int = 4, k: int = 4, timed_steps: int = 3) -> dict[str, Any]:
    """Tokens/s and model FLOP/s of forward + backward + zero_grad at fixed (n, k), fp32."""
    import torch

    from recdepth.model import RecurrentLM
    from recdepth.model.flops import flops_per_token

    cfg = _small_cfg(checkpointing)
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    ids, labels = x[:, :-1], x[:, 1:]
    _step(model, ids[:2], labels[:2], (1, 1))  # warm-up: kernels and thread pools
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        _step(model, ids, labels, (n, k))
        times.append(time.perf_counter() - t0)
    step_s = min(times)
    tokens = BATCH * SEQ
    f = flops_per_token(cfg, n, k, seq_len=SEQ)
    result = {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_gflops_per_s": f.model * tokens / step_s / 1e9,
        "hardware_gflops_per_s": f.hardware * tokens / step_s / 1e9,
        "model_gflop_per_token": f.model / 1e9,
        "hardware_gflop_per_token": f.hardware / 1e9,
    }
    if checkpointing == "none":  # optimizer step: cheap next to the step, timed separately
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        opt.step()  # allocates the state
        t0 = time.perf_counter()
        for _ in range(3):
            opt.step()
        opt_s = (time.perf_counter() - t0) / 3
        result["adamw_step_s"] = opt_s
        result["tokens_per_s_with_adamw"] = tokens / (step_s + opt_s)
    return result


# -------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: peak resident memory of one training step above the post-build baseline."""
    import gc

    import torch

    from recdepth.model import RecurrentLM

    cfg = _small_cfg(spec["checkpointing"])
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    ids, labels = x[:, :-1], x[:, 1:]
    _step(model, ids[:1, :16], labels[:1, :16], (1, 1))
    gc.collect()
    reset = _reset_hwm()
    base = _rss_bytes()
    out = model(ids, labels=labels, num_steps=(spec["n"], spec["k"]), return_logits=False)
    out.loss.backward()
    peak = _hwm_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mib": (peak - base) / 2**20, "baseline_mib": base / 2**20, "hwm_reset": reset}


def peak_memory(n: int, k: int, checkpointing: str) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    spec = json.dumps({"n": n, "k": k, "checkpointing": checkpointing})
    proc = subprocess.run([sys.executable, __file__, "--memory-child", spec], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def bench_model(out: dict) -> None:
    """All model figures into out["model"]: GEMM peak, throughput and utilisation, memory ratios."""
    import torch

    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "model": "raven_small",
        "batch": f"{BATCH}x{SEQ}",
        "dtype": "float32",
    }
    res.update(gemm_peak())
    peak = res["gemm_peak_gflops"]
    for ckpt in ("none", "per-iteration"):
        r = throughput(ckpt)
        r["model_flops_fraction_of_gemm_peak"] = r["model_gflops_per_s"] / peak
        r["hardware_flops_fraction_of_gemm_peak"] = r["hardware_gflops_per_s"] / peak
        res[f"train_n4_k4_ckpt_{ckpt}"] = r

    m0 = peak_memory(0, 4, "per-iteration")
    m32 = peak_memory(32, 4, "per-iteration")
    k1 = peak_memory(0, 1, "per-iteration")
    k8 = peak_memory(0, 8, "per-iteration")
    res["mem_n0_k4_mib"] = m0["peak_mib"]
    res["mem_n32_k4_mib"] = m32["peak_mib"]
    res["mem_ratio_n32_vs_n0"] = m32["peak_mib"] / m0["peak_mib"]
    res["mem_ratio_n32_vs_n0_ok"] = res["mem_ratio_n32_vs_n0"] <= 1.10
    res["mem_ckpt_k1_mib"] = k1["peak_mib"]
    res["mem_ckpt_k8_mib"] = k8["peak_mib"]
    res["mem_ratio_ckpt_k8_vs_k1"] = k8["peak_mib"] / k1["peak_mib"]
    res["mem_ratio_ckpt_k8_vs_k1_ok"] = res["mem_ratio_ckpt_k8_vs_k1"] <= 1.5
    res["mem_method"] = "VmHWM - RSS after build, fresh process" if m0["hwm_reset"] else "ru_maxrss - RSS (bound)"
    res["bench_seconds"] = time.perf_counter() - t_start
    out["model"] = res


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        print(json.dumps(memory_child(json.loads(sys.argv[2]))))
    else:
        figures: dict = {}
        bench_model(figures)
        print(json.dumps(figures, indent=2))
