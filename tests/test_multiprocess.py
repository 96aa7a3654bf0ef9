"""train/mnist.py over two processes on 127.0.0.1 (JAX's distributed runtime, gloo collectives).

Two real processes with one CPU device each train on one shared workdir; one is SIGKILLed after a
checkpoint, the other killed too, both resumed; the result is compared with one process training
the same global batch on two simulated devices (``--xla_force_host_platform_device_count=2``).
With two devices the gradient all-reduce adds two partial sums, and ``a + b`` is the same in any
order, so the two must agree bit for bit. A workdir the processes do not share is refused by
every process at start-up. The resumed half runs with ``--shard-optimizer-state``, so the
replicated save, the restore into moments split across processes and their saves (the digest
gathers them) are all on the path that must end bit-identical.

Every subprocess has a timeout and is killed in a ``finally``; ports come from binding port 0.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train import checkpointing

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 32, 6  # 1024 examples in batches of 32.
STEPS = STEPS_PER_EPOCH * EPOCHS
ARGS = [
  "--data-source",
  "synthetic",
  "--limit-train-examples",
  "1024",
  "--limit-test-examples",
  "256",
  "--epochs",
  str(EPOCHS),
  "--seed",
  "3",
  "--checkpoint-every",
  "16",
  "--progress",
  "epoch",
  "--no-plot",
  "--cpu-threads",
  "1",
]
TIMEOUT = 240  # Seconds for any one run to end: a bound, not a wait (runs take 10-30 s).


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(log_dir: Path, workdirs: list[Path], *extra: str, env: dict | None = None) -> list:
  """Starts one ``python -m train.mnist`` per workdir: process i of len(workdirs), or a plain
  single-process run when given one workdir and no ``--distributed``."""
  procs, n = [], len(workdirs)
  port = free_port()
  for i, workdir in enumerate(workdirs):
    dist = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}"] if n > 1 else []
    dist += ["--num-processes", str(n), "--process-id", str(i)] if n > 1 else []
    log_path = log_dir / f"{workdir.name}.{i}.{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
      proc = subprocess.Popen(
        [sys.executable, "-m", "train.mnist", "--workdir", str(workdir), *ARGS, *dist, *extra],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
      )
    proc.log_path = log_path
    procs.append(proc)
  return procs


def output(proc) -> str:
  return Path(proc.log_path).read_text()


def wait_all(procs, timeout: float = TIMEOUT) -> list[int]:
  deadline = time.monotonic() + timeout
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      logs = "\n".join(output(p)[-3000:] for p in procs)
      raise AssertionError(f"no exit within {timeout} s:\n{logs}") from None
  return codes


def kill_all(procs) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait(30)


def committed_steps(workdir: Path) -> list[int]:
  try:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  except FileNotFoundError:
    return []


def read_metrics(workdir: Path) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
  """The same global batch on one process with two simulated devices."""
  tmp = tmp_path_factory.mktemp("single")
  procs = launch(tmp, [tmp / "run"], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  try:
    assert wait_all(procs) == [0], output(procs[0])
  finally:
    kill_all(procs)
  assert "2 device(s)" in output(procs[0]) and "1 process(es)" in output(procs[0])
  return tmp / "run"


def test_two_processes_killed_and_resumed_match_one_process(tmp_path, single_process):
  start, workdir = time.monotonic(), tmp_path / "shared"
  procs = launch(tmp_path, [workdir, workdir])
  try:
    # SIGKILL process 1 once a checkpoint past the first epoch is committed, then the other.
    deadline = time.monotonic() + TIMEOUT
    while not any(s >= STEPS_PER_EPOCH + 16 for s in committed_steps(workdir)):
      assert time.monotonic() < deadline, output(procs[0])
      assert all(p.poll() is None for p in procs), "\n".join(map(output, procs))
      time.sleep(0.005)
    procs[1].send_signal(signal.SIGKILL)
    killed_after = committed_steps(workdir)[-1]
    assert procs[1].wait(30) == -signal.SIGKILL
    procs[0].kill()
    procs[0].wait(30)
  finally:
    kill_all(procs)
  assert killed_after < STEPS, "the run finished before it was killed"

  # Resumed with the Adam moments split over the two processes (--shard-optimizer-state): the
  # checkpoint does not depend on the layout, and the numbers must not either.
  procs = launch(tmp_path, [workdir, workdir], "--resume", "--shard-optimizer-state")
  try:
    codes = wait_all(procs)
  finally:
    kill_all(procs)
  logs = [output(p) for p in procs]
  assert codes == [0, 0], "\n".join(logs)
  resumed_at = int(logs[0].split("Resumed from ")[1].split(": step ")[1].split()[0])
  assert resumed_at >= killed_after and resumed_at % 16 == 0
  assert "2 device(s)" in logs[0] and "2 process(es)" in logs[0]
  assert "Optimizer state split over 2 device(s)" in logs[0]
  # Process 0 alone reports; process 1 says nothing of the training.
  assert "Final test accuracy" in logs[0] and "Final test accuracy" not in logs[1]
  assert "XLA:CPU threads" in logs[0] and "XLA:CPU threads" not in logs[1]

  state, meta = checkpointing.load_train_state(workdir)
  ref_state, ref_meta = checkpointing.load_train_state(single_process)
  assert meta["step"] == ref_meta["step"] == STEPS
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  assert meta["digest"] == ref_meta["digest"]
  assert read_metrics(workdir) == read_metrics(single_process)
  # Orbax wrote each process's shards of the state, process 0 the manifest.
  step_dir = workdir / "checkpoints" / str(STEPS)
  assert {p.name for p in (step_dir / "state").glob("ocdbt.process_*")} == {
    "ocdbt.process_0",
    "ocdbt.process_1",
  }
  assert (step_dir / "sha256.json").is_file()
  print(
    f"\n2 processes, {STEPS} steps, SIGKILL of process 1 after checkpoint {killed_after}, "
    f"resumed at step {resumed_at} with the moments split: bit-identical to 1 process on 2 devices; "
    f"{time.monotonic() - start:.1f} s"
  )


def test_a_workdir_the_processes_do_not_share_is_refused_by_every_process(tmp_path):
  procs = launch(tmp_path, [tmp_path / "a", tmp_path / "b"])
  try:
    codes = wait_all(procs)
  finally:
    kill_all(procs)
  for i, (code, proc) in enumerate(zip(codes, procs, strict=True)):
    log = output(proc)
    assert code == 1, log
    assert "error: WorkdirNotShared:" in log and "as seen from process(es) [1]" in log, log
    assert f"process {i})" in log
  assert not committed_steps(tmp_path / "a") and not committed_steps(tmp_path / "b")
