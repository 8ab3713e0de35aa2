"""Two real gloo processes through the CLI: exact resume after killing both ranks, a signal to one rank, a
failure on one rank, and a sweep through the submitit_local launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train import ROOT, TINY, _weights, cli, train_rows

pytestmark = pytest.mark.distributed

DIST = ["parallelism=chunked_ddp", "cluster.devices=2", "parallelism.chunk_mib=0.25"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample-cache-dist")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _rank_pids(pid: int) -> list[int]:
    """The two spawned rank processes of a `python run.py` parent (not the multiprocessing helpers)."""
    pids = []
    for child in _children(pid):
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd:
            pids.append(child)
    return pids


def _start(args: list[str], cache: Path, out: Path, script: str = "run.py", flags=()) -> subprocess.Popen:
    cmd = [sys.executable, script, *flags, *TINY, f"data.cache_dir={cache}", f"out_dir={out}", *DIST, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert path.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "timed out"


def test_kill_both_ranks_and_resume_is_bit_identical(tmp_path, cache_dir):
    common = ["train.max_steps=10", "train.log_every=1", "eval.every=0", "checkpoint.every=5",
              "model.n_embd=128", "model.intermediate_size=256"]
    straight = tmp_path / "straight"
    res = cli([f"out_dir={straight}", *DIST, *common], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = _start(common, cache_dir, killed)
    _wait_for(killed / "checkpoints" / "step-00000005" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # parent and both ranks
    proc.communicate()
    assert not (killed / "checkpoints" / "step-00000010").exists(), "the run finished before it could be killed"

    res = cli([f"out_dir={killed}", *DIST, *common], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(straight, 10), _weights(killed, 10)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = train_rows(straight), train_rows(killed)
    assert sorted(ra) == sorted(rb) == list(range(1, 11))
    assert all(ra[s]["train/loss"] == rb[s]["train/loss"] and ra[s]["data/checksum"] == rb[s]["data/checksum"]
               for s in ra)


def test_sigterm_to_one_rank_saves_same_step_on_both_and_exits_cleanly(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = _start(["train.max_steps=100000", "optim.warmup_steps=1", "optim.cooldown_steps=1", "eval.every=0",
                   "checkpoint.every=3", "train.log_every=1"], cache_dir, out)
    _wait_for(out / "checkpoints" / "step-00000003" / "COMPLETE", proc)
    ranks = _rank_pids(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    done = sorted(p.name for p in (out / "checkpoints").iterdir())
    last = out / "checkpoints" / done[-1]
    assert (last / "COMPLETE").exists() and not any(p.endswith(".tmp") for p in done)
    step = int(last.name.split("-")[1])
    assert 3 <= step < 100000
    # both ranks wrote their data position at that same step
    assert sorted(p.name for p in (last / "data").iterdir()) == ["rank-0.json", "rank-1.json"]
    assert max(train_rows(out)) == step


def test_exception_on_one_rank_fails_every_rank(tmp_path, cache_dir):
    driver = tmp_path / "faulty_run.py"
    # spawned ranks re-run this module (as __mp_main__), so the fault is present in every rank process
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from recdepth.train import loop

        _step = loop.Trainer.train_step

        def faulty(self, batches, window, telemetry):
            if self.fabric.global_rank == 1 and self.state.step == 2:
                raise RuntimeError("injected failure on rank 1")
            return _step(self, batches, window, telemetry)

        loop.Trainer.train_step = faulty

        if __name__ == "__main__":
            import run
            run.run()
    """))
    out = tmp_path / "run"
    t0 = time.time()
    proc = _start(["train.max_steps=50", "eval.every=0", "checkpoint.every=0"], cache_dir, out, script=str(driver),
                  flags=[f"--config-path={ROOT / 'conf'}"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in err
    assert time.time() - t0 < 120
    assert not (out / "checkpoints" / "step-00000050").exists()


def test_sweep_through_submitit_local(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", *TINY, f"data.cache_dir={cache_dir}",
           f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10", "train.max_steps=4",
           "optim.warmup_steps=1", "optim.cooldown_steps=1", "eval.every=0", "recurrence.mean=2,3,4"]
    # build the sample corpus once, before three jobs race for it
    assert cli([f"out_dir={tmp_path / 'warm'}", "train.max_steps=2", "optim.warmup_steps=1",
                "optim.cooldown_steps=1"], cache_dir).returncode == 0
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, mean in zip(jobs, (2, 3, 4)):
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        assert (job / "checkpoints" / "step-00000004" / "COMPLETE").exists()
        assert f"mean: {mean}" in (job / "checkpoints" / "step-00000004" / "config.yaml").read_text()


def test_sharded_optimizer_state_matches_replicated_and_resumes(tmp_path, cache_dir):
    common = ["train.max_steps=6", "train.log_every=1", "eval.every=0", "checkpoint.every=3", "optim=ellis_adam",
              "optim.warmup_steps=2", "optim.cooldown_steps=2"]
    runs = {}
    for shard in ("world", "none"):
        out = tmp_path / shard
        res = cli([f"out_dir={out}", *DIST, *common, f"optim.shard={shard}"], cache_dir)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[shard] = _weights(out, 6)
    a, b = runs["world"], runs["none"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    # the consolidated optimizer state of step 3 resumes to the same step-6 weights
    resumed = tmp_path / "resumed"
    res = cli([f"out_dir={resumed}", *DIST, *common, "optim.shard=world",
               f"resume={tmp_path / 'world' / 'checkpoints' / 'step-00000003'}"], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    c = _weights(resumed, 6)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_on_another_world_size_needs_allow_reshard(tmp_path, cache_dir):
    import json

    out = tmp_path / "run"  # optimizer state sharded over the 2 ranks, then resumed on one process
    first = ["train.max_steps=4", "train.log_every=1", "eval.every=0", "checkpoint.every=2", "optim.shard=world"]
    res = cli([f"out_dir={out}", *DIST, *first], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    more = ["train.max_steps=6", "train.log_every=1", "eval.every=0", "checkpoint.every=2"]  # one process: unsharded
    res = cli([f"out_dir={out}", *more], cache_dir)
    assert res.returncode != 0 and "data.allow_reshard" in res.stderr, res.stderr[-3000:]
    assert not (out / "checkpoints" / "step-00000006").exists()
    res = cli([f"out_dir={out}", *more, "data.allow_reshard=true"], cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing with data segment 1" in res.stdout + res.stderr
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer.json").read_text())
    assert state["world_size"] == 1 and state["data_segment"] == 1 and state["data_segment_step"] == 4
    assert state["step"] == 6
    assert sorted(train_rows(out)) == list(range(1, 7))
