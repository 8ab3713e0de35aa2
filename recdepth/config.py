"""Config schemas (dataclasses registered in Hydra's ConfigStore) and their validation.

YAML files under `conf/` name one of these schemas first in their defaults list, so composition type-checks
every value and rejects unknown keys. Range checks live in `__post_init__`, which runs when a section is
turned into its dataclass (`to_dataclass`), i.e. before any heavy work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from recdepth.errors import ConfigError, require

# ----------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Shape of a depth-recurrent transformer: prelude → (adapter + core) × r → coda, tied head."""

    name: str = "raven_tiny"
    n_embd: int = 256
    n_heads: int = 4
    intermediate_size: int = 704
    vocab_size: int = 8192
    block_size: int = 256
    n_prelude: int = 2
    n_core: int = 4
    n_coda: int = 2
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    tie_embeddings: bool = True
    # per-iteration: one checkpoint region (adapter + core blocks) per grad iteration; none: keep all
    activation_checkpointing: str = "per-iteration"
    # huginn-0125 special ids (written to the HF config); the tokenizer decides the ids used in training
    bos_token_id: int = 65504
    eos_token_id: int = 65505
    pad_token_id: int = 65509

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_heads", "intermediate_size", "vocab_size", "block_size", "n_core"):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "an integer >= 1")
        for name in ("n_prelude", "n_coda"):
            require(getattr(self, name) >= 0, f"model.{name}", getattr(self, name), "an integer >= 0")
        require(
            self.n_embd % self.n_heads == 0,
            "model.n_embd",
            self.n_embd,
            f"a multiple of model.n_heads={self.n_heads}",
        )
        require(self.head_dim % 2 == 0, "model.n_embd", self.n_embd, "n_embd / n_heads even (RoPE pairs)")
        require(self.rope_base > 0, "model.rope_base", self.rope_base, "a positive float")
        require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "a positive float")
        require(
            self.activation_checkpointing in ("per-iteration", "none"),
            "model.activation_checkpointing",
            self.activation_checkpointing,
            "one of per-iteration, none",
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def n_layers(self) -> int:
        return self.n_prelude + self.n_core + self.n_coda


# ------------------------------------------------------------------------------------------ recurrence

SCHEMES = (
    "poisson-lognormal-filling",
    "poisson-lognormal-fill",
    "poisson-lognormal",
    "poisson-unbounded",
    "poisson-fill",
    "poisson-bounded",
    "bptt",
    "non-uniform",
    "simple",
    "gupta",
    "sobol",
    "geometric",
    "fixed",
    "non-recurrent",
    "full",
)


@dataclass
class RecurrenceConfig:
    """How many core iterations each micro-step runs: r = n (no grad) + k (grad), drawn per step."""

    scheme: str = "poisson-lognormal-filling"
    mean: int = 32  # mean recurrence r̄ (also the default eval depth)
    backprop_depth: int = 8  # mean backprop depth b̄
    lockstep: bool = True  # every rank draws the same (n, k)
    curriculum_steps: int = 0  # ramp t and s linearly over this many micro-steps (0: off)
    seed: int = 0  # added to the reference seeds 514229 / 317811 (0 reproduces huginn-0125's draws)

    def __post_init__(self) -> None:
        require(self.scheme in SCHEMES, "recurrence.scheme", self.scheme, "one of " + ", ".join(SCHEMES))
        require(self.mean >= 1, "recurrence.mean", self.mean, "an integer >= 1")
        require(self.backprop_depth >= 1, "recurrence.backprop_depth", self.backprop_depth, "an integer >= 1")
        require(self.curriculum_steps >= 0, "recurrence.curriculum_steps", self.curriculum_steps, "an integer >= 0")
        require(self.seed >= 0, "recurrence.seed", self.seed, "an integer >= 0")
        if self.scheme not in ("non-recurrent", "fixed", "full"):
            require(
                self.mean > self.backprop_depth or self.scheme == "poisson-lognormal-filling",
                "recurrence.mean",
                self.mean,
                f"greater than recurrence.backprop_depth={self.backprop_depth} for scheme {self.scheme}",
            )

    @property
    def expected_depth(self) -> float:
        """Mean number of core iterations of a training step (used by init and FLOP planning)."""
        return 1.0 if self.scheme == "non-recurrent" else float(self.mean)


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Batch sizes, step budget, precision and the loop's guardrails."""

    global_batch_size: int = 32  # rows per optimizer step, all ranks together
    micro_batch_size: int = 8  # rows per forward per rank
    max_steps: int = 300  # optimizer steps
    batch_ramp_steps: int = 0  # ramp accumulation from 1 to full over this many optimizer steps
    precision: str = "32-true"
    compile: bool = False
    grad_clip: float = 1.0
    log_every: int = 10  # optimizer steps
    max_nonfinite_in_row: int = 5  # non-finite loss/grad steps are skipped; stop (with a checkpoint) after this many in a row
    loss_guard_tokens: float = 10e9  # guardrail: stop if loss > loss_guard_max after this many tokens
    loss_guard_max: float = 0.0  # 0 disables the guardrail
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up the device, else MFU absent
    progress_bar: bool = True

    def __post_init__(self) -> None:
        require(self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, "an integer >= 1")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, "an integer >= 1")
        require(self.max_steps >= 1, "train.max_steps", self.max_steps, "an integer >= 1")
        require(self.batch_ramp_steps >= 0, "train.batch_ramp_steps", self.batch_ramp_steps, "an integer >= 0")
        require(
            self.precision in ("32-true", "bf16-mixed", "bf16-true"),
            "train.precision",
            self.precision,
            "one of 32-true, bf16-mixed, bf16-true",
        )
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a float >= 0 (0 disables clipping)")
        require(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        require(
            self.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row", self.max_nonfinite_in_row, "an integer >= 1"
        )


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and weight-decay rules (training spec §3-§5)."""

    name: str = "adamw"  # adamw | ellis_adam
    lr: float = 1e-3  # peak learning rate η
    min_lr: float = 0.0
    schedule: str = "trapezoid"  # trapezoid | cosine | linear | constant
    warmup_steps: int = 20  # optimizer steps
    cooldown_steps: int = 20  # optimizer steps
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    no_wd_for_bias_and_norm: bool = True
    no_wd_on_embedding: bool = False
    # ELLISAdam options (ignored by adamw)
    atan_adam: bool = False
    update_clipping: bool = False
    running_init: bool = False
    decouple_wd: bool = True
    eps_adjustment: bool = False
    nesterov: bool = False
    tensor_wise_finite_check: bool = False
    tensor_wise_gradient_normalization: bool = False
    kahan_sum: bool = False  # compensated summation of updates (for bf16 parameters)
    buffer_dtype: Optional[str] = None  # ELLISAdam state dtype: float32 | bfloat16 | float64 | null (= param)
    shard: str = "none"  # none | node | world (optimizer-state sharding)

    def __post_init__(self) -> None:
        require(self.name in ("adamw", "ellis_adam"), "optim.name", self.name, "one of adamw, ellis_adam")
        require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr, "a positive float")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"a float in [0, optim.lr={self.lr}]")
        require(
            self.schedule in ("trapezoid", "cosine", "linear", "constant"),
            "optim.schedule",
            self.schedule,
            "one of trapezoid, cosine, linear, constant",
        )
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(self.cooldown_steps >= 0, "optim.cooldown_steps", self.cooldown_steps, "an integer >= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a float >= 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            list(self.betas),
            "two floats in [0, 1)",
        )
        require(self.eps > 0, "optim.eps", self.eps, "a positive float")
        require(
            self.buffer_dtype in (None, "float32", "bfloat16", "float64"),
            "optim.buffer_dtype",
            self.buffer_dtype,
            "null or one of float32, bfloat16, float64",
        )
        require(self.shard in ("none", "node", "world"), "optim.shard", self.shard, "one of none, node, world")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Where training rows come from: prepared WebDataset shards of one or several weighted sources."""

    name: str = "sample"
    path: Optional[str] = None  # a prepared dataset dir holding shards/{train,val}/ (single source)
    sources: dict[str, str] = field(default_factory=dict)  # name -> prepared dataset dir (mixture)
    weights: dict[str, float] = field(default_factory=dict)  # name -> mixture weight
    cache_dir: Optional[str] = None  # where data=sample builds its corpus (default: ~/.cache/recdepth)
    num_workers: int = 0
    seed: int = 233
    exhaustion: str = "next_epoch"  # next_epoch | stop (per source: source_exhaustion.<name>)
    source_exhaustion: dict[str, str] = field(default_factory=dict)  # name -> next_epoch | stop
    # piecewise-constant weights: [{at: rows consumed per rank, weights: {name: w}}, ...]
    weight_schedule: list[Any] = field(default_factory=list)
    categories: dict[str, str] = field(default_factory=dict)  # name -> category (reporting only)
    verify_checksums: bool = True  # sha256 of every shard read against index.json
    # resume onto another world size, worker count, micro batch or dataset: a new data segment (a fresh order
    # of the data from its start; statistically sound, not an exact replay). Off: such a resume is an error.
    allow_reshard: bool = False
    prefetch_factor: int = 2
    sample_mb: float = 10.0  # data=sample: MB of standard-library source text to build the corpus from

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        for name, ex in {"exhaustion": self.exhaustion, **self.source_exhaustion}.items():
            field_name = "data.exhaustion" if name == "exhaustion" else f"data.source_exhaustion.{name}"
            require(ex in ("next_epoch", "stop"), field_name, ex, "one of next_epoch, stop")
        for name, w in self.weights.items():
            require(w >= 0 and math.isfinite(w), f"data.weights.{name}", w, "a finite float >= 0")
        require(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor, "an integer >= 1")
        require(0 < self.sample_mb <= 64, "data.sample_mb", self.sample_mb, "a float in (0, 64]")
        for i, ph in enumerate(self.weight_schedule):
            ok = isinstance(ph, dict) and set(ph) <= {"at", "weights"} and int(ph.get("at", -1)) >= 0
            require(ok, f"data.weight_schedule[{i}]", ph, "{at: rows per rank >= 0, weights: {name: w}}")


# ------------------------------------------------------------------------------------ eval, checkpoints


@dataclass
class EvalConfig:
    """Held-out loss at several recurrence depths (the test-time-compute curve)."""

    every: int = 100  # optimizer steps (0: only at the end)
    depths: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32, 64])
    batches: int = 4  # micro-batches per depth
    seed: int = 1234  # fixed initial-state noise so rounds are comparable

    def __post_init__(self) -> None:
        require(self.every >= 0, "eval.every", self.every, "an integer >= 0")
        require(len(self.depths) >= 1 and all(d >= 1 for d in self.depths), "eval.depths", list(self.depths),
                "a non-empty list of integers >= 1")
        require(self.batches >= 1, "eval.batches", self.batches, "an integer >= 1")


@dataclass
class CheckpointConfig:
    """When to save, how many to keep."""

    every: int = 100  # optimizer steps (0: only at the end)
    keep: int = 3  # newest complete checkpoints kept (plus every keep_every-th)
    keep_every: int = 0

    def __post_init__(self) -> None:
        require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")
        require(self.keep_every >= 0, "checkpoint.keep_every", self.keep_every, "an integer >= 0")


# -------------------------------------------------------------------------------- cluster, parallelism


@dataclass
class ClusterConfig:
    """Where processes run: this machine, a generic SLURM cluster, or Frontier."""

    name: str = "local"
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1  # processes per node
    num_nodes: int = 1
    # SLURM fields (cluster=slurm|frontier)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 60  # job time limit (Frontier: <= 120/360/720 by node count)
    cpus_per_task: int = 1
    gpus_per_node: Optional[int] = None  # null: do not request GPUs (CPU partitions)
    array: int = 1  # segments chained as a job array with %1 (each resumes from the last checkpoint)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module loads, paths)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job and applied in-process at startup
    srun_args: list[str] = field(default_factory=list)  # extra srun flags of the dry-run plan
    signal_delay_s: int = 300  # SIGUSR2 this many seconds before the time limit (>= one step + one save)
    save_before_end_min: float = 5.0  # time-based save using SLURM_JOB_END_TIME
    device_tflops: float = 0.0  # per-device TFLOP/s for the dry-run plan's step-time estimate
    device_mem_gib: float = 0.0  # per-device memory for the dry-run plan's warning (0: unknown)

    def __post_init__(self) -> None:
        require(self.name in ("local", "slurm", "frontier"), "cluster.name", self.name, "one of local, slurm, frontier")
        require(self.accelerator in ("auto", "cpu", "gpu"), "cluster.accelerator", self.accelerator,
                "one of auto, cpu, gpu")
        require(self.devices >= 1, "cluster.devices", self.devices, "an integer >= 1")
        require(self.num_nodes >= 1, "cluster.num_nodes", self.num_nodes, "an integer >= 1")
        require(self.time_min >= 1, "cluster.time_min", self.time_min, "an integer >= 1 (minutes)")
        require(self.cpus_per_task >= 1, "cluster.cpus_per_task", self.cpus_per_task, "an integer >= 1")
        require(self.array >= 1, "cluster.array", self.array, "an integer >= 1")
        require(self.signal_delay_s >= 0, "cluster.signal_delay_s", self.signal_delay_s, "an integer >= 0")


@dataclass
class ParallelismConfig:
    """How replicas synchronise: one process, Fabric DDP, the chunked all-reduce, or FSDP."""

    name: str = "single"  # single | ddp | chunked_ddp | fsdp
    chunk_mib: float = 64.0  # chunked_ddp message size
    warmup_mib: list[float] = field(default_factory=lambda: [1.0, 16.0])  # all-reduce warm-up sizes
    timeout_s: int = 900
    lockstep_check_every: int = 100  # optimizer steps between cross-rank (n, k) checks (0: off)

    def __post_init__(self) -> None:
        require(self.name in ("single", "ddp", "chunked_ddp", "fsdp"), "parallelism.name", self.name,
                "one of single, ddp, chunked_ddp, fsdp")
        require(self.chunk_mib > 0, "parallelism.chunk_mib", self.chunk_mib, "a positive float")
        require(all(m > 0 for m in self.warmup_mib), "parallelism.warmup_mib", list(self.warmup_mib),
                "a list of positive sizes in MiB")
        require(self.timeout_s >= 1, "parallelism.timeout_s", self.timeout_s, "an integer >= 1 (seconds)")


# ------------------------------------------------------------------------------------------------ root


@dataclass
class RunConfig:
    """The root of `conf/train.yaml`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    seed: int = 0
    out_dir: Optional[str] = None  # default: Hydra's run dir
    resume: str = "auto"  # auto | never | <checkpoint dir>
    dry_run: bool = False  # print the plan and exit


def register_configs() -> None:
    """Register the root schema; `conf/train.yaml` lists `run_schema` first, so every group is type-checked."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("rd_or"):
        # `${rd_or:${out_dir},default}`: the first value unless it is null (oc.select keeps nulls)
        OmegaConf.register_new_resolver("rd_or", lambda value, default: default if value is None else value)


def to_dataclass(section: Any, schema: type):
    """Turn a composed config section into its dataclass, running the range checks."""
    if isinstance(section, schema):
        return section
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, dict):
        raise ConfigError(f"expected a mapping for {schema.__name__}, got {type(section).__name__}")
    known = set(schema.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} for {schema.__name__}; valid: {sorted(known)}")
    return schema(**section)


register_configs()
