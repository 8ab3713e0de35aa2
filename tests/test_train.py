"""The main job end to end through the real CLI: learning, outputs, exact resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.n_embd=64", "model.n_heads=2", "model.intermediate_size=128", "model.vocab_size=512",
    "model.block_size=32", "model.n_prelude=1", "model.n_core=1", "model.n_coda=1",
    "recurrence.mean=3", "recurrence.backprop_depth=2",
    "train.global_batch_size=8", "train.micro_batch_size=4", "train.progress_bar=false",
    "optim.lr=3e-3", "optim.warmup_steps=2", "optim.cooldown_steps=2", "eval.batches=2",
    "data.sample_mb=1",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample-cache")


def cli(args: list[str], cache: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "run.py", *TINY, f"data.cache_dir={cache}", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600, **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run_dir) if "train/loss" in m}


def test_default_run_learns_and_writes_outputs(tmp_path, cache_dir):
    out = tmp_path / "run"
    res = cli([f"out_dir={out}", "train.max_steps=60", "train.log_every=5", "eval.every=30",
               "checkpoint.every=30", "optim.cooldown_steps=10"], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = train_rows(out)
    first, last = rows[min(rows)]["train/loss"], rows[max(rows)]["train/loss"]
    assert last < first - 1.5, (first, last)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    done = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert done == ["step-00000030", "step-00000060"]
    assert all((out / "checkpoints" / d / "COMPLETE").exists() for d in done)
    assert (out / "eval" / "depth-00000060.png").stat().st_size > 1000
    curve = json.loads((out / "eval" / "depth-00000060.json").read_text())["loss"]
    assert sorted(int(d) for d in curve) == [1, 2, 3, 4]  # [1, 2, 4, 8, ...] clipped to 2 x mean, plus the mean
    assert "validation loss by recurrence depth" in res.stdout
    val = [m for m in metrics(out) if "val/loss" in m]
    assert len(val) == 2 and val[-1]["val/loss"] == val[-1]["val/loss_3"]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_after_sigkill(tmp_path, cache_dir, workers):
    common = ["train.max_steps=10", "train.log_every=1", "eval.every=0", "checkpoint.every=5",
              f"data.num_workers={workers}", "model.n_embd=128", "model.intermediate_size=256"]
    straight = tmp_path / "straight"
    res = cli([f"out_dir={straight}", *common], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ)
    cmd = [sys.executable, "run.py", *TINY, f"data.cache_dir={cache_dir}", f"out_dir={killed}", *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    marker = killed / "checkpoints" / "step-00000005" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    assert not (killed / "checkpoints" / "step-00000010").exists(), "the run finished before it could be killed"

    res = cli([f"out_dir={killed}", *common], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    a, b = _weights(straight, 10), _weights(killed, 10)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = train_rows(straight), train_rows(killed)
    assert sorted(ra) == sorted(rb) == list(range(1, 11))
    for step in ra:
        for key in ("train/loss", "recurrence/num_steps_no_grad", "recurrence/num_steps_with_grad", "data/checksum"):
            assert ra[step][key] == rb[step][key], (step, key)


def test_interrupted_checkpoint_write_is_never_resumed(tmp_path, cache_dir, monkeypatch):
    from lightning_fabric import Fabric

    from recdepth.config import ModelConfig, OptimConfig, RecurrenceConfig
    from recdepth.model import RecurrentLM
    from recdepth.train import checkpoint as ckpt
    from recdepth.train.optim import build_optimizer

    fabric = Fabric(accelerator="cpu", devices=1)
    cfg = ModelConfig(n_embd=32, n_heads=2, intermediate_size=64, vocab_size=64, block_size=16,
                      n_prelude=1, n_core=1, n_coda=1)
    model = RecurrentLM(cfg, RecurrenceConfig(mean=2, backprop_depth=1))
    opt = build_optimizer(model, OptimConfig())
    root = tmp_path / "checkpoints"
    kw = dict(fabric=fabric, model=model, optimizer=opt, data_state={"C": 1}, config_yaml="x: 1\n")
    ckpt.save_checkpoint(root, 1, trainer_state={"step": 1}, **kw)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def crash(*args, **kwargs):  # the process dies half-way through writing the weights
        Path(args[1]).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt("simulated crash")

    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1.0)
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, trainer_state={"step": 2}, **kw)
    assert (root / "step-00000002.tmp").exists()
    assert ckpt.latest_checkpoint(root) == root / "step-00000001"

    model2 = RecurrentLM(cfg, RecurrenceConfig(mean=2, backprop_depth=1))
    opt2 = build_optimizer(model2, OptimConfig())
    state, data_state = ckpt.load_checkpoint(root / "step-00000001", fabric=fabric, model=model2, optimizer=opt2)
    assert state["step"] == 1 and data_state == {"C": 1}
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())
    monkeypatch.undo()
    ckpt.save_checkpoint(root, 2, trainer_state={"step": 2}, **kw)  # a later save cleans the leftover
    assert ckpt.latest_checkpoint(root) == root / "step-00000002"
    assert not (root / "step-00000002.tmp").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model=no_such_model"], "no_such_model"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["optim.warmup_steps=500", "train.max_steps=100"], "optim.warmup_steps"),
        (["model.n_embd=65"], "model.n_embd"),
        (["recurrence.scheme=zigzag"], "recurrence.scheme"),
        (["train.micro_batch_size=3"], "train.global_batch_size"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, cache_dir, args, needle):
    out = tmp_path / "run"
    res = cli([f"out_dir={out}", *args], cache_dir)
    assert res.returncode != 0
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "checkpoints").exists()


def test_data_dir_without_shards(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli([f"out_dir={tmp_path / 'run'}", "data=local", f"data.path={empty}"], cache_dir)
    assert res.returncode != 0
    assert str(empty) in res.stderr and "Traceback" not in res.stderr


def test_checkpoint_of_another_shape_is_refused_and_kept(tmp_path, cache_dir):
    out = tmp_path / "run"
    res = cli([f"out_dir={out}", "train.max_steps=5", "eval.every=0", "checkpoint.every=5"], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = out / "checkpoints" / "step-00000005"
    before = {p.name: p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    res = cli([f"out_dir={out}", "train.max_steps=10", "model.n_embd=96", "model.n_heads=2"], cache_dir)
    assert res.returncode != 0
    assert "different model shape" in res.stderr and "model.n_embd" in res.stderr
    assert "Traceback" not in res.stderr
    assert {p.name: p.read_bytes() for p in ck.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path, cache_dir):
    out = tmp_path / "run"
    # an absurd learning rate drives the weights to inf within a few steps
    res = cli([f"out_dir={out}", "optim.lr=1e30", "optim.warmup_steps=0", "optim.cooldown_steps=0",
               "train.grad_clip=0", "train.max_steps=50", "train.max_nonfinite_in_row=3", "eval.every=0",
               "checkpoint.every=0", "train.log_every=1"], cache_dir)
    assert res.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in res.stderr
    assert "Traceback" not in res.stderr
    saved = ckpt_steps(out)
    assert len(saved) == 1 and saved[0] < 50
    rows = train_rows(out)
    assert rows[saved[0]]["optim/skipped_steps"] >= 3


def test_loss_guardrail_stops_with_a_checkpoint(tmp_path, cache_dir):
    out = tmp_path / "run"
    res = cli([f"out_dir={out}", "train.loss_guard_max=1.0", "train.loss_guard_tokens=0", "train.max_steps=20",
               "train.log_every=2", "eval.every=0"], cache_dir)
    assert res.returncode != 0
    assert "train.loss_guard_max=1.0" in res.stderr
    assert ckpt_steps(out) == [2]


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
