"""train/mnist.py end to end: a tiny run, exact resume after SIGKILL, bad checkpoints, 8 devices.

Everything runs on small synthetic MNIST-shaped data (``--data-source synthetic``: the real-data
loader accepts only the canonical MNIST digests), except ``test_real_mnist_one_epoch``, which
trains one epoch on real MNIST from ``train/mnist_data.py`` (downloaded once into its cache).

In-process runs share this process's JAX (one CPU device); the kill/resume and 8-device tests run
``train/mnist.py`` as real subprocesses, as a user would. Bit-for-bit comparisons are only made
between runs in the same kind of process (same XLA thread pool, so the same summation order).
"""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from adamjax.convert import ConversionError
from adamjax.convert.__main__ import _train_workdir_state
from adamjax.convert._train_workdir import read_checkpoint
from train import checkpointing, input_pipeline, mnist, models
from train import train as train_lib
from train.config import OPTIMIZERS, Config, add_flags
from train.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "mnist.py"

# In-process runs: 256 examples in batches of 32 (8 steps per epoch).
TINY = Config(
  data_source="synthetic",
  limit_train_examples=256,
  limit_test_examples=128,
  epochs=2,
  progress="none",
  plot=False,
)
# Subprocess runs: 2048 examples (64 steps per epoch), 3 epochs, a checkpoint every 8 steps,
# all kept, so any step of the reference run can be compared with.
SMALL_ARGS = [
  "--data-source",
  "synthetic",
  "--limit-train-examples",
  "2048",
  "--limit-test-examples",
  "512",
  "--epochs",
  "3",
  "--seed",
  "7",
  "--checkpoint-every",
  "8",
  "--progress",
  "epoch",
  "--no-plot",
  "--cpu-threads",
  "1",
]
SMALL_STEPS = 3 * 64


def leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_bitwise_equal(a, b) -> None:
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def without_timings(history: list[dict]) -> list[dict]:
  return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The pieces.


def test_model_is_the_keras_tutorial_mlp():
  model = models.MLP(rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  shapes = jax.tree.map(np.shape, params)
  assert shapes == {
    "dense": {"kernel": (784, 128), "bias": (128,)},
    "dense_1": {"kernel": (128, 10), "bias": (10,)},
  }
  for layer, (fan_in, fan_out) in {"dense": (784, 128), "dense_1": (128, 10)}.items():
    kernel = np.asarray(params[layer]["kernel"])
    limit = np.sqrt(6 / (fan_in + fan_out))  # Keras's GlorotUniform bound.
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    np.testing.assert_array_equal(params[layer]["bias"], 0)
  logits = model(np.zeros((3, 28, 28), np.float32))
  assert logits.shape == (3, 10)


def test_epoch_batches_are_a_seeded_permutation_with_a_masked_last_batch():
  index, mask = input_pipeline.epoch_batches(100, 32, seed=3, epoch=1)
  assert index.shape == mask.shape == (4, 32)  # ceil(100 / 32) steps, as Keras's fit.
  assert mask.sum() == 100 and mask[:3].all() and mask[3].sum() == 4
  assert sorted(index[mask]) == list(range(100))
  again, _ = input_pipeline.epoch_batches(100, 32, seed=3, epoch=1)
  np.testing.assert_array_equal(index, again)  # A function of (seed, epoch) only.
  assert not np.array_equal(index, input_pipeline.epoch_batches(100, 32, seed=3, epoch=2)[0])
  assert not np.array_equal(index, input_pipeline.epoch_batches(100, 32, seed=4, epoch=1)[0])


def test_segment_ends_stop_at_checkpoints_chunks_and_the_end():
  # Epoch 2 of 10 steps (global steps 10..19), resumed at position 3, checkpoints every 4.
  assert train_lib._segment_ends(10, 3, 10, 10, 4, 0) == [6, 10]
  assert train_lib._segment_ends(10, 3, 10, 10, 0, 0) == [10]
  assert train_lib._segment_ends(0, 0, 10, 10, 0, 2) == [5, 10]
  assert train_lib._segment_ends(0, 0, 7, 10, 3, 0) == [3, 6, 7]  # Stopped by max_steps.


def test_command_line_maps_onto_config():
  args, config = mnist.parse_args(
    [
      "--workdir",
      "w",
      "--seed",
      "5",
      "--epochs",
      "2",
      "--batch-size",
      "64",
      "--learning-rate",
      "0.01",
      "--optimizer",
      "optax.adam",
      "--data-source",
      "idx",
      "--data-dir",
      "d",
      "--checkpoint-every",
      "100",
      "--resume",
      "--max-steps",
      "7",
      "--limit-train-examples",
      "1000",
      "--progress",
      "bar",
      "--no-plot",
      "--distributed",
    ]
  )
  assert args.workdir == "w" and args.distributed
  assert config == Config(
    seed=5,
    epochs=2,
    batch_size=64,
    learning_rate=0.01,
    optimizer="optax.adam",
    data_source="idx",
    data_dir="d",
    checkpoint_every=100,
    resume=True,
    max_steps=7,
    limit_train_examples=1000,
    progress="bar",
    plot=False,
  )
  assert mnist.parse_args([])[1] == Config()  # The defaults are the tutorial's.
  assert set(OPTIMIZERS) == {"keras_adam", "adam", "tf1_adam", "torch_adam", "optax.adam"}


def test_every_config_field_is_a_flag_with_its_default():
  parser = argparse.ArgumentParser()
  add_flags(parser, Config)
  flags = {a.dest: a for a in parser._actions if a.dest != "help"}
  fields = {f.name: f for f in dataclasses.fields(Config)}
  assert set(flags) == set(fields)
  for name, field in fields.items():
    assert flags[name].default == field.default, name
    assert flags[name].choices == field.metadata.get("choices"), name
  assert flags["plot"].option_strings == ["--no-plot"]  # A True default is turned off.
  assert flags["resume"].option_strings == ["--resume"]
  _, changed = mnist.parse_args(["--hidden", "64", "--dropout-rate", "0.5"])
  assert (changed.hidden, changed.dropout_rate) == (64, 0.5)


@pytest.mark.parametrize("field", ["optimizer", "data_source", "progress"])
def test_a_value_outside_a_fields_choices_is_refused_by_name(field, capsys):
  with pytest.raises(ValueError, match=f"^{field} must be one of .* got 'nope'"):
    Config(**{field: "nope"})
  with pytest.raises(SystemExit):  # argparse refuses it too, naming the flag.
    mnist.parse_args([f"--{field.replace('_', '-')}", "nope"])
  assert f"--{field.replace('_', '-')}: invalid choice" in capsys.readouterr().err


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "out.txt"
  atomic_write(path, lambda p: p.write_text("first"))
  assert path.read_text() == "first"

  def fail(p):
    p.write_text("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    atomic_write(path, fail)
  assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ---------------------------------------------------------------------------------------------
# In-process runs.


def test_smoke_tiny_run_end_to_end(tmp_path, capsys):
  config = dataclasses.replace(TINY, checkpoint_every=5, progress="epoch", plot=True)
  metrics = train_lib.train_and_evaluate(config, tmp_path)

  out = capsys.readouterr().out
  assert "1 device(s)" in out and "Epoch 2/2" in out and "Final test accuracy" in out
  assert "val_accuracy" in out
  history = read_metrics(tmp_path)
  assert [row["epoch"] for row in history] == [1, 2]
  assert history == metrics["history"]
  for row in history:
    assert set(row) == {
      "epoch",
      "step",
      "loss",
      "accuracy",
      "val_loss",
      "val_accuracy",
      "seconds",
      "train_seconds",
    }
  assert history[1]["loss"] < history[0]["loss"]
  assert metrics["step"] == 16 and 0 <= metrics["test_accuracy"] <= 1
  assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((tmp_path / "summary.json").read_text())["step"] == 16
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert saved == [10, 15, 16]  # Every 5 steps and every epoch end (8, 16); 3 kept.
  state, meta = checkpointing.load_train_state(tmp_path)
  assert meta["step"] == 16 and meta["history"] == history
  assert_bitwise_equal(state["params"], metrics["state"].params)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_trains(tmp_path, optimizer):
  metrics = train_lib.train_and_evaluate(dataclasses.replace(TINY, optimizer=optimizer), tmp_path)
  assert metrics["history"][1]["loss"] < metrics["history"][0]["loss"]


def test_segments_and_resume_in_process_are_bit_identical(tmp_path):
  whole = train_lib.train_and_evaluate(TINY, tmp_path / "whole")
  # The same run cut into segments (checkpoints every 3 steps, a progress bar in 4 chunks),
  # stopped at step 11 (mid-epoch 2) and resumed.
  cut = dataclasses.replace(TINY, checkpoint_every=3, progress="bar", progress_chunks=4)
  train_lib.train_and_evaluate(dataclasses.replace(cut, max_steps=11), tmp_path / "cut")
  resumed = train_lib.train_and_evaluate(dataclasses.replace(cut, resume=True), tmp_path / "cut")
  assert_bitwise_equal(whole["state"], resumed["state"])
  assert without_timings(resumed["history"]) == without_timings(whole["history"])
  assert without_timings(read_metrics(tmp_path / "cut")) == without_timings(whole["history"])


def test_partial_last_batch_averages_over_its_real_examples(tmp_path):
  # 40 examples in batches of 32: 2 steps, the second on 8 examples. Without dropout, that is
  # exactly training on batches of 32 and then 8 (as Keras's fit does), to float32 rounding.
  config = dataclasses.replace(TINY, limit_train_examples=40, epochs=1, dropout_rate=0.0)
  padded = train_lib.train_and_evaluate(config, tmp_path)["state"]

  data = input_pipeline.load_data(config, verbose=False)
  index, mask = input_pipeline.epoch_batches(40, 32, config.seed, 0)
  model = models.MLP(dropout_rate=0.0, rngs=nnx.Rngs(params=config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = OPTIMIZERS[config.optimizer](config.learning_rate)
  state = train_lib.TrainState(
    np.int32(0), params, tx.init(params), np.float32(0), np.int32(0), np.int32(0)
  )
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  steps = train_lib.make_train_steps(graphdef, tx, config.seed, mesh)
  for rows in (index[0], index[1][mask[1]]):  # Two unpadded batches: 32, then 8 examples.
    batch = rows[None]
    state = steps(
      state,
      input_pipeline.scale_pixels(data.train_images),
      data.train_labels,
      batch,
      np.ones_like(batch, bool),
      0,
      1,
    )
  assert int(padded.count) == int(state.count) == 40
  for x, y in zip(leaves(padded.params), leaves(state.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage, capsys):
  config = dataclasses.replace(TINY, checkpoint_every=3, progress="epoch")
  whole = train_lib.train_and_evaluate(config, tmp_path / "whole")
  run = tmp_path / "run"
  train_lib.train_and_evaluate(dataclasses.replace(config, max_steps=11), run)
  latest = run / "checkpoints" / "11"
  data_files = sorted((latest / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  if damage == "truncated":  # A write cut short.
    big = data_files[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  elif damage == "corrupted":  # Flipped bits that may still decode: the digest catches them.
    for path in data_files:
      raw = bytearray(path.read_bytes())
      for i in range(len(raw) // 2, len(raw), 97):
        raw[i] ^= 0x5A
      path.write_bytes(bytes(raw))
  else:  # A file lost.
    (latest / "meta" / "metadata").unlink()
  capsys.readouterr()

  resumed = train_lib.train_and_evaluate(dataclasses.replace(config, resume=True), run)
  out, err = capsys.readouterr()
  assert f"checkpoint {latest} is damaged" in err
  assert "Resumed from" in out and "step 9 " in out
  assert (run / "damaged_checkpoints" / "11").is_dir()
  assert_bitwise_equal(whole["state"], resumed["state"])


def test_workdir_reader_checks_the_manifest(tmp_path):
  """The one reader of a workdir (resume, load_train_state, `adamjax.convert to-keras`)."""
  metrics = train_lib.train_and_evaluate(TINY, tmp_path)
  state, meta = read_checkpoint(tmp_path)  # The newest; no model or optimizer needed.
  assert meta["step"] == 16 and set(state) == set(train_lib.TrainState._fields)
  assert_bitwise_equal(state["params"], metrics["state"].params)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), metrics["state"]
  )
  typed, _ = read_checkpoint(tmp_path, 8, target=target)
  assert isinstance(typed, train_lib.TrainState)  # Restored into the target, digest checked.
  to_keras_reads = _train_workdir_state(tmp_path)  # What `adamjax.convert to-keras` reads.
  assert_bitwise_equal(to_keras_reads["params"], metrics["state"].params)

  kernel = next((tmp_path / "checkpoints" / "16" / "state").rglob("d/*"))
  kernel.write_bytes(kernel.read_bytes()[:-1] + b"?")
  for read in (read_checkpoint, _train_workdir_state):
    with pytest.raises(ConversionError, match="does not match the sha256"):
      read(tmp_path)
  with pytest.raises(ConversionError, match="holds no checkpoint"):
    read_checkpoint(tmp_path / "elsewhere")
  # Without its manifest (a kill right after Orbax committed it), a damaged checkpoint is still
  # one named error, not Orbax's own.
  older = tmp_path / "checkpoints" / "8"
  (older / "sha256.json").unlink()
  data = max((older / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  with pytest.raises(ConversionError, match="Orbax cannot restore it"):
    read_checkpoint(tmp_path, 8)


def test_refuses_to_mix_runs(tmp_path):
  train_lib.train_and_evaluate(dataclasses.replace(TINY, max_steps=4), tmp_path)
  with pytest.raises(FileExistsError, match="--resume"):
    train_lib.train_and_evaluate(TINY, tmp_path)
  with pytest.raises(ValueError, match="seed"):
    train_lib.train_and_evaluate(dataclasses.replace(TINY, resume=True, seed=1), tmp_path)
  metrics = train_lib.train_and_evaluate(dataclasses.replace(TINY, overwrite=True), tmp_path)
  assert metrics["step"] == 16


# ---------------------------------------------------------------------------------------------
# Real subprocesses: SIGKILL and resume, 8 devices.


def start(
  workdir: Path, *extra: str, env: dict | None = None, command: tuple = (str(SCRIPT),)
) -> subprocess.Popen:
  """Starts ``python train/mnist.py`` (or ``command``, e.g. ``-m train.mnist``) on SMALL_ARGS."""
  log_path = workdir.with_suffix(f".{time.monotonic_ns()}.log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      [sys.executable, *command, "--workdir", str(workdir), *SMALL_ARGS, *extra],
      cwd=ROOT,
      stdout=log,
      stderr=subprocess.STDOUT,
      env=dict(os.environ, **(env or {})),
    )
  proc.log_path = log_path  # type: ignore[attr-defined]
  return proc


def output(proc: subprocess.Popen) -> str:
  return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
  assert proc.wait(timeout) == 0, output(proc)
  return output(proc)


def committed_steps(workdir: Path) -> list[int]:
  try:  # Orbax renames a finished save to its step number; anything else is in progress.
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  except FileNotFoundError:
    return []


def kill_after(proc: subprocess.Popen, workdir: Path, step: int, delay: float) -> int:
  """SIGKILLs `proc` `delay` seconds after it commits a checkpoint at or past `step`."""
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    steps = committed_steps(workdir)
    if steps and steps[-1] >= step:
      time.sleep(delay)
      os.kill(proc.pid, signal.SIGKILL)
      assert proc.wait(30) == -signal.SIGKILL, (
        f"the run ended before it was killed:\n{output(proc)}"
      )
      return steps[-1]
    assert proc.poll() is None, f"the run ended before step {step}:\n{output(proc)}"
    time.sleep(0.002)
  raise AssertionError(f"no checkpoint at step {step} within 120 s:\n{output(proc)}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
  """An uninterrupted subprocess run of SMALL_ARGS, every checkpoint kept."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  finish(start(workdir, "--keep-checkpoints", "100"))
  return workdir


def test_sigkill_and_resume_is_bit_identical(tmp_path, reference_run):
  workdir = tmp_path / "run"
  proc = start(workdir)
  # Killed three times (once in each epoch, at varying delays after a checkpoint), resumed
  # each time, then left to finish.
  killed_at = [kill_after(proc, workdir, 20, 0.0)]
  for step, delay in ((90, 0.01), (150, 0.03)):
    proc = start(workdir, "--resume")
    killed_at.append(kill_after(proc, workdir, step, delay))
  log = finish(start(workdir, "--resume"))
  assert "Resumed from" in log and "Final test accuracy" in log

  assert killed_at == sorted(killed_at) and killed_at[0] < 64 < killed_at[1] < 128
  ref_state, ref_meta = checkpointing.load_train_state(reference_run, SMALL_STEPS)
  state, meta = checkpointing.load_train_state(workdir)
  assert meta["step"] == SMALL_STEPS
  assert_bitwise_equal(ref_state, state)
  assert meta["digest"] == ref_meta["digest"]
  assert without_timings(read_metrics(workdir)) == without_timings(read_metrics(reference_run))


def test_eight_devices_match_one_device(tmp_path, reference_run):
  workdir = tmp_path / "run"
  log = finish(
    start(  # As a module from the repository root, as scripts/train runs it.
      workdir,
      "--max-steps",
      "72",
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
      command=("-m", "train.mnist"),
    )
  )
  assert "8 device(s)" in log and "data-parallel over 8 devices" in log
  state, meta = checkpointing.load_train_state(workdir)
  ref_state, _ = checkpointing.load_train_state(reference_run, 72)
  assert meta["step"] == 72
  # Eight devices sum the batch's gradient in another order than one device: float32 rounding
  # differences (~1e-7 relative). Adam divides by sqrt(v), so where a gradient is rounding
  # noise the step (up to ~lr = 1e-3) carries it: measured at most 7.3e-7 absolute, the same
  # after 8, 72 and 192 steps (it does not compound).
  for x, y in zip(leaves(ref_state["params"]), leaves(state["params"]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6)
  ref_row, row = read_metrics(reference_run)[0], read_metrics(workdir)[0]
  for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
    assert row[key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Real MNIST.


@pytest.mark.slow
def test_real_mnist_one_epoch(tmp_path):
  metrics = train_lib.train_and_evaluate(
    dataclasses.replace(Config(), epochs=1, progress="none", plot=False), tmp_path
  )
  assert metrics["data_source"] in {"cache", "tfds", "idx", "pypi"}
  assert metrics["step"] == 1875
  assert metrics["test_accuracy"] > 0.95  # The tutorial reaches ~0.96 after one epoch.


def test_sharded_optimizer_state_on_eight_devices_is_bit_identical_and_smaller(tmp_path):
  """``--shard-optimizer-state`` on 8 simulated devices (tests/sharded_train_worker.py)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-m", "tests.sharded_train_worker", str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["steps"] == 48 and report["params_moved"] > 1e-3  # It really trained.
  # Three epochs (48 steps) with the moments split 8 ways: the same bits as replicated, and a run
  # stopped at step 25 and resumed from its (sharded) checkpoint too.
  assert report["bit_identical"] and report["digests_equal"], report
  assert report["resumed_bit_identical"] and report["resumed_sharded"] == "P('data',)", report
  specs = report["specs"]
  assert specs["[0].count"] == "P()" and specs["[0].mu['dense']['kernel']"] == "P('data',)"
  assert specs["[0].nu['dense_1']['bias']"] == "P()"  # 10 elements: 8 does not divide them.
  # XLA's per-device figures drop by 7/8 of the moments (less dense_1/bias's, 2 x 10 float32).
  split_moments = report["moment_bytes"] - 2 * 10 * 4
  rep, sh = report["xla_bytes_per_device"]["replicated"], report["xla_bytes_per_device"]["sharded"]
  for what in ("params_and_state", "train_loop"):
    assert rep[what] - sh[what] == split_moments * 7 // 8, report
