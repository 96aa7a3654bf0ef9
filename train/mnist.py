"""Train the Keras tutorial's MNIST MLP with Flax NNX and adamjax, fast, with exact checkpoints.

The model, loss, batch size, epochs and optimizer are those of the TensorFlow 2 quickstart
(``Flatten -> Dense(128, relu) -> Dropout(0.2) -> Dense(10)``, glorot-uniform kernels, zero biases,
softmax cross-entropy on logits, batch 32, 3 epochs, Adam 1e-3, pixels scaled by 1/255, validation
on the test set), with :func:`adamjax.keras_adam` as the default optimizer::

    python train/mnist.py            # a new workdir/mnist/<date-time>; scripts/train runs this

How it runs:

- The training step is a pure function ``(state, batch) -> state`` over a ``TrainState`` pytree
  (the model is ``nnx.split`` into a graphdef and a plain dict of parameters once). An epoch runs
  on device as one jitted ``lax.fori_loop`` over the shuffled, batched epoch, with the state
  donated: no Python round trip per step. The loop's bounds are traced values, so running an epoch
  in segments (for the progress bar, or ending at ``--checkpoint-every`` steps) reuses one compiled
  program and gives bit-identical results to running it whole.
- Randomness is a function of ``--seed`` alone: the data order of epoch ``e`` is
  ``np.random.default_rng([seed, e]).permutation``, the dropout key of global step ``t`` is
  ``fold_in(key(seed), t)``. So (seed, step) is the whole RNG state, and resuming mid-epoch is
  exact.
- The final partial batch (when the batch size does not divide the training set) is padded and
  masked: Keras's ``fit`` runs ``ceil(N / batch)`` steps, the last on fewer examples, and so does
  this (the loss is the mean over the real examples). MNIST's 60000 / 32 has no partial batch.
- On CPU, XLA runs each op on one thread by default (``--cpu-threads``): the ops of this model
  take microseconds, and splitting them over threads that share cores with other processes
  costs more than it gains (:func:`cpu_thread_count`). The thread count does not change results.
- With several devices (``jax.devices()``), it trains data-parallel: one mesh axis ``data`` over all
  devices, the batch split along it, parameters and optimizer state replicated. Results equal one
  device within float32 tolerance (the gradient sum is reduced in a different order).
- ``--workdir`` receives ``metrics.jsonl`` (one object per epoch), ``metrics.png`` (loss and
  accuracy curves), ``summary.json`` and Orbax checkpoints (``checkpoints/<step>``: train state,
  RNG seed, epoch, step and the metrics so far, with a sha256 of the state), saved atomically at
  the end of every epoch and every ``--checkpoint-every`` steps. ``--resume`` continues from the
  newest checkpoint that restores and matches its digest; a damaged one is reported, moved to
  ``damaged_checkpoints/``, and the previous one is used.

Multi-host: run the same command on every host with ``--distributed`` (see ``--help``); each
process loads the data, the mesh spans every process's devices, and process 0 writes the files.

``--data-source synthetic`` (random class templates plus noise, MNIST's shapes) exists for tests
and benchmarks that must not depend on the real data; every other source is real, verified MNIST
from ``train/mnist_data.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adamjax

__all__ = [
  "MLP",
  "OPTIMIZERS",
  "Config",
  "Data",
  "TrainState",
  "create_train_state",
  "epoch_batches",
  "load_data",
  "load_train_state",
  "main",
  "make_evaluate",
  "make_train_steps",
  "scale_pixels",
  "start_jax",
  "synthetic_mnist",
  "train_and_evaluate",
]

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
  "keras_adam": lambda lr: adamjax.keras_adam(lr),
  "adam": lambda lr: adamjax.adam(lr),
  "tf1_adam": lambda lr: adamjax.tf1_adam(lr),
  "torch_adam": lambda lr: adamjax.torch_adam(lr),
  "optax.adam": lambda lr: optax.adam(lr),
}
DATA_SOURCES = ("auto", "tfds", "idx", "pypi", "synthetic")
PROGRESS = ("auto", "bar", "epoch", "none")
CHECKPOINT_DIR, DAMAGED_DIR = "checkpoints", "damaged_checkpoints"
MANIFEST = "sha256.json"  # In each checkpoint: the sha256 of every file Orbax wrote.


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters and run options; the defaults are the Keras tutorial's."""

  seed: int = 0
  epochs: int = 3
  batch_size: int = 32
  learning_rate: float = 1e-3
  optimizer: str = "keras_adam"  # A key of OPTIMIZERS.
  dropout_rate: float = 0.2
  hidden: int = 128
  data_source: str = "auto"  # See DATA_SOURCES; "synthetic" is for tests and benchmarks.
  data_dir: str | None = None  # Folder with the four MNIST IDX files (source "idx" / "auto").
  cache_dir: str | None = None  # MNIST cache; default: mnist_data.default_cache_dir().
  limit_train_examples: int | None = None  # Train on the first N examples only (fast tests).
  limit_test_examples: int | None = None
  max_steps: int | None = None  # Stop after this many steps in all (may end mid-epoch).
  checkpoint_every: int = 0  # Also checkpoint every N steps (0: only at the end of each epoch).
  keep_checkpoints: int = 3  # More than one, so a damaged newest one has a predecessor.
  resume: bool = False  # Continue from the newest good checkpoint in the workdir.
  init_from: str | None = None  # Start from a Keras/TF checkpoint or an adamjax.convert output.
  overwrite: bool = False  # Delete an earlier run's checkpoints and metrics in the workdir.
  progress: str = "auto"  # "bar" on a terminal, "epoch" lines otherwise; or "none".
  progress_chunks: int = 20  # Progress bar updates per epoch (each one is a host sync).
  plot: bool = True


class Data(NamedTuple):
  """Images uint8 [N, 28, 28] and labels int32 [N], as ``mnist_data.MnistArrays``."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str


class TrainState(NamedTuple):
  """Everything a training step reads and writes; a pytree, checkpointed as is.

  Attributes:
    step: int32 global step (number of optimizer updates applied).
    params: The MLP's parameters as a plain nested dict (``nnx.to_pure_dict``).
    opt_state: The optimizer's state.
    loss_sum: Sum over this epoch's examples of the training loss, for Keras's epoch ``loss``.
    correct: Correctly classified training examples this epoch.
    count: Training examples seen this epoch.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array


class MLP(nnx.Module):
  """The tutorial's model, with Keras's initializers (glorot-uniform kernels, zero biases).

  The layers are named as Keras names the tutorial's (``dense``, ``dropout``, ``dense_1``), so
  ``adamjax.convert`` maps a Keras checkpoint onto this model by layer and variable name.
  """

  def __init__(self, hidden: int = 128, dropout_rate: float = 0.2, *, rngs: nnx.Rngs):
    glorot, zeros = nnx.initializers.glorot_uniform(), nnx.initializers.zeros_init()
    self.dense = nnx.Linear(28 * 28, hidden, kernel_init=glorot, bias_init=zeros, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.dense_1 = nnx.Linear(hidden, 10, kernel_init=glorot, bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Returns logits; dropout is applied only when a ``dropout_key`` is given (training)."""
    x = x.reshape(x.shape[0], -1)  # Flatten
    x = nnx.relu(self.dense(x))
    x = self.dropout(x, deterministic=dropout_key is None, rngs=dropout_key)
    return self.dense_1(x)


# ---------------------------------------------------------------------------------------------
# Data.


def synthetic_mnist(num_train: int = 60000, num_test: int = 10000, seed: int = 0) -> Data:
  """MNIST-shaped learnable data (noisy copies of 10 random class templates), for tests only."""
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)

  def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n).astype(np.int32)
    noise = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    keep = rng.random((n, 28, 28)) < 0.3  # 30% of the pixels show the class template.
    return np.where(keep, templates[labels], noise), labels

  train_images, train_labels = split(num_train)
  test_images, test_labels = split(num_test)
  return Data(train_images, train_labels, test_images, test_labels, source="synthetic")


def _mnist_data_module():
  if __package__:  # Imported as train.mnist.
    from train import mnist_data
  else:  # Run as a script: train/ is sys.path[0].
    import mnist_data
  return mnist_data


def load_data(config: Config, *, verbose: bool = True) -> Data:
  """Loads MNIST (real and verified, or synthetic) and applies the example limits."""
  if config.data_source == "synthetic":
    n_train = config.limit_train_examples or 60000
    n_test = config.limit_test_examples or 10000
    data = synthetic_mnist(n_train, n_test, seed=1234)
  else:
    arrays = _mnist_data_module().load_mnist(
      source=config.data_source,
      data_dir=config.data_dir,
      cache_dir=config.cache_dir,
      verbose=verbose,
    )
    data = Data(*arrays[:4], source=arrays.source)
  n_train = config.limit_train_examples or len(data.train_labels)
  n_test = config.limit_test_examples or len(data.test_labels)
  return Data(
    data.train_images[:n_train],
    data.train_labels[:n_train].astype(np.int32),
    data.test_images[:n_test],
    data.test_labels[:n_test].astype(np.int32),
    data.source,
  )


def epoch_batches(
  num_examples: int, batch_size: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
  """The shuffled batches of one epoch: example indices and a mask, both [steps, batch_size].

  The order is a function of (seed, epoch) only, so a run resumed mid-epoch sees the same
  batches. The last batch is padded (index 0, mask False) when ``batch_size`` does not divide
  ``num_examples``; the step then averages over its real examples, as Keras's ``fit`` does.
  """
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = math.ceil(num_examples / batch_size)
  index = np.zeros(steps * batch_size, np.int32)
  index[:num_examples] = order
  mask = np.arange(steps * batch_size) < num_examples
  return index.reshape(steps, batch_size), mask.reshape(steps, batch_size)


# ---------------------------------------------------------------------------------------------
# The pure training and evaluation functions.


# The tutorial's `x / 255.0`: divided in float64 by numpy, then float32 as Keras casts it. A
# float32 division under jit differs: XLA multiplies by the reciprocal of 255 instead, which is one
# ulp off for 126 of the 256 pixel values. So pixels are looked up in this table.
_PIXEL_VALUES = (np.arange(256) / 255.0).astype(np.float32)


def scale_pixels(images: Any) -> Any:
  """uint8 pixels as the float32 values Keras trains on (``x / 255.0``), bit for bit.

  A NumPy array gives a NumPy array (the training data is scaled once, on the host, before it
  goes to the devices: a per-step lookup cost about 4% of a step); anything else, a jax.Array.
  """
  if isinstance(images, np.ndarray):
    return _PIXEL_VALUES[images]
  return jnp.asarray(_PIXEL_VALUES)[images]


def _check_pixels(images: jax.Array) -> None:
  if images.dtype != jnp.float32:
    raise TypeError(
      f"images must be float32 pixels in [0, 1] (mnist.scale_pixels of the "
      f"uint8 images), got {images.dtype}"
    )


def _masked_loss_and_correct(logits, labels, mask):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = mask.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask, dtype=jnp.int32)
  return jnp.sum(losses * weights), jnp.sum(weights), correct


def make_train_steps(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, seed: int, mesh: Mesh
) -> Callable[..., TrainState]:
  """Returns ``train_steps(state, images, labels, index, mask, start, stop) -> state``.

  It applies steps ``start..stop-1`` of the epoch whose batches are ``index``/``mask``
  ([steps, batch], from :func:`epoch_batches`), reading examples from the device-resident
  ``images`` (float32 pixels, :func:`scale_pixels` of the uint8 ones) and ``labels``. Jitted,
  with ``state`` donated.
  """
  dropout_root = jax.random.key(seed)
  batch_sharding = NamedSharding(mesh, P("data"))

  def train_step(state: TrainState, images, labels, mask) -> TrainState:
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      logits = model(images, dropout_key=jax.random.fold_in(dropout_root, state.step))
      loss_sum, n, correct = _masked_loss_and_correct(logits, labels, mask)
      return loss_sum / n, (loss_sum, correct)

    grads, (loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      loss_sum=state.loss_sum + loss_sum,
      correct=state.correct + correct,
      count=state.count + jnp.sum(mask, dtype=jnp.int32),
    )

  def train_steps(state, images, labels, index, mask, start, stop):
    _check_pixels(images)

    def body(i, state):
      rows = jax.lax.with_sharding_constraint(index[i], batch_sharding)
      x = jax.lax.with_sharding_constraint(images[rows], batch_sharding)
      return train_step(state, x, labels[rows], mask[i])

    return jax.lax.fori_loop(start, stop, body, state)

  return jax.jit(train_steps, donate_argnums=0)


def make_evaluate(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Returns jitted ``evaluate(params, images, labels, mask) -> (mean loss, correct count)``.

  ``images`` are float32 pixels (:func:`scale_pixels` of the uint8 ones).
  """

  def evaluate(params, images, labels, mask):
    _check_pixels(images)
    logits = nnx.merge(graphdef, params)(images)
    loss_sum, n, correct = _masked_loss_and_correct(logits, labels, mask)
    return loss_sum / n, correct

  return jax.jit(evaluate)


# ---------------------------------------------------------------------------------------------
# Devices, checkpoints, output.


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value every process holds (works with several processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _host(x: jax.Array) -> np.ndarray:
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def state_digest(state: TrainState) -> str:
  """sha256 of every leaf's bytes, dtype and shape: detects a checkpoint restored wrong."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = _host(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def _checkpoint_manager(workdir: Path, config: Config):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=max(2, config.keep_checkpoints),
    create=True,
    # Synchronous saves: the state is donated to the next step right after a save, and an
    # async save would still be reading it. A save of this model takes well under 0.1 s.
    enable_async_checkpointing=False,
    cleanup_tmp_directories=True,  # Half-written saves left by a kill.
  )
  return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def _file_digests(step_dir: Path) -> dict[str, str]:
  return {
    str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(step_dir.rglob("*"))
    if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
  }


def _check_files(step_dir: Path) -> None:
  """Raises ValueError if a file of the checkpoint is missing or differs from its sha256.

  Checked before Orbax reads anything, so a damaged file is named plainly (and Orbax is not
  left with reads in flight after a decoding error). A checkpoint whose manifest was never
  written (a kill right after Orbax committed it) is left to the state digest.
  """
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return
  expected, actual = json.loads(manifest.read_text()), _file_digests(step_dir)
  for name, digest in expected.items():
    if name not in actual:
      raise ValueError(f"{name} is missing")
    if actual[name] != digest:
      raise ValueError(f"{name} does not match the sha256 recorded when it was saved")


def _save(manager, state: TrainState, meta: dict[str, Any]) -> None:
  import orbax.checkpoint as ocp

  step = int(meta["step"])
  if step in manager.all_steps():
    return
  # Orbax writes into a temporary directory and renames it when complete, so a kill leaves
  # either the whole checkpoint or none; the sha256 of the state and of every file it wrote
  # let a later resume tell a damaged checkpoint from a good one.
  meta = dict(meta, digest=state_digest(state))
  manager.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  )
  if jax.process_index() == 0:
    step_dir = Path(manager.directory) / str(step)
    text = json.dumps(_file_digests(step_dir), indent=1) + "\n"
    _atomic_write(step_dir / MANIFEST, lambda p: p.write_text(text))


def _restore_latest_good(
  workdir: Path, config: Config, abstract: TrainState
) -> tuple[TrainState, dict[str, Any]] | None:
  """The newest checkpoint that restores and matches its digests; damaged ones are moved aside."""
  import orbax.checkpoint as ocp

  manager = _checkpoint_manager(workdir, config)
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    step_dir = workdir / CHECKPOINT_DIR / str(step)
    try:
      _check_files(step_dir)
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
      state, meta = TrainState(*restored.state), restored.meta
      if state_digest(state) != meta["digest"]:
        raise ValueError("the restored state does not match the sha256 saved with it")
    # Any failure (a missing, truncated or altered file, bad metadata, a digest mismatch)
    # means this checkpoint is unusable; the previous one may be fine.
    except Exception as e:  # noqa: BLE001
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      reason = reason if len(reason) < 300 else reason[:300] + "..."
      damaged = workdir / DAMAGED_DIR / str(step)
      if jax.process_index() == 0:
        print(
          f"WARNING: checkpoint {step_dir} is damaged ({reason}); moved to "
          f"{damaged}; trying the previous one.",
          file=sys.stderr,
          flush=True,
        )
        damaged.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.move(str(step_dir), str(damaged))
      continue
    manager.close()
    return state, meta
  manager.close()
  if steps:
    raise RuntimeError(
      f"no usable checkpoint in {workdir / CHECKPOINT_DIR}: all of "
      f"{sorted(steps)} are damaged (moved to {workdir / DAMAGED_DIR})"
    )
  return None


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  write(tmp)
  os.replace(tmp, path)


def _write_metrics(workdir: Path, history: list[dict[str, Any]]) -> None:
  text = "".join(json.dumps(row) + "\n" for row in history)
  _atomic_write(workdir / "metrics.jsonl", lambda p: p.write_text(text))


def _write_outputs(workdir: Path, history: list[dict[str, Any]], plot: bool) -> None:
  _write_metrics(workdir, history)
  if plot:
    _plot(workdir, history)


def _plot(workdir: Path, history: list[dict[str, Any]]) -> None:
  # A bare Figure (no pyplot), so plotting never switches the caller's backend (a notebook's
  # inline one) and needs no display.
  from matplotlib.figure import Figure

  epochs = [row["epoch"] for row in history]
  fig = Figure(figsize=(10, 4), constrained_layout=True)
  axes = fig.subplots(1, 2)
  for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
    ax.plot(epochs, [row[name] for row in history], "o-", label=f"train {name}")
    ax.plot(epochs, [row[f"val_{name}"] for row in history], "s--", label=f"test {name}")
    ax.set_xlabel("epoch")
    ax.set_title(name)
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend()
  _atomic_write(workdir / "metrics.png", lambda p: fig.savefig(p, format="png", dpi=100))


class _Progress:
  """Keras-style epoch output: a live bar on a terminal, one line per epoch otherwise."""

  BAR = 20

  def __init__(self, mode: str, epochs: int, steps: int):
    if mode == "auto":
      mode = "bar" if sys.stdout.isatty() else "epoch"
    self.mode, self.epochs, self.steps = mode, epochs, steps
    self.enabled = mode != "none" and jax.process_index() == 0

  def _bar(self, done: int, seconds: float, metrics: str) -> str:
    filled = self.BAR * done // self.steps
    per_step = seconds / max(done, 1)
    rate = f"{per_step * 1e3:.0f}ms" if per_step >= 1e-3 else f"{per_step * 1e6:.0f}us"
    width = len(str(self.steps))
    return (
      f"{done:{width}d}/{self.steps} {'━' * filled}{'─' * (self.BAR - filled)} "
      f"{seconds:.2f}s {rate}/step - {metrics}"
    )

  def start(self, epoch: int) -> None:
    if self.enabled:
      print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)

  def update(self, done: int, seconds: float, state: TrainState) -> None:
    if self.enabled and self.mode == "bar":
      n = max(int(_host(state.count)), 1)
      text = (
        f"accuracy: {int(_host(state.correct)) / n:.4f} - "
        f"loss: {float(_host(state.loss_sum)) / n:.4f}"
      )
      print("\r" + self._bar(done, seconds, text), end="", flush=True)

  def end(self, done: int, row: dict[str, Any]) -> None:
    if self.enabled:
      text = " - ".join(
        f"{k}: {row[k]:.4f}" for k in ("accuracy", "loss", "val_accuracy", "val_loss")
      )
      print(
        ("\r" if self.mode == "bar" else "") + self._bar(done, row["seconds"], text), flush=True
      )


# ---------------------------------------------------------------------------------------------
# The run.


class _DeviceData(NamedTuple):
  """The data on the device(s): training set replicated, test set split over the devices."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  test_mask: jax.Array  # False for padding (the test set is padded to a multiple of devices).


def _to_devices(data: Data, mesh: Mesh) -> _DeviceData:
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  n_test = len(data.test_labels)
  pad = -n_test % mesh.size
  return _DeviceData(
    _put(scale_pixels(data.train_images), replicated),
    _put(data.train_labels, replicated),
    _put(scale_pixels(np.concatenate([data.test_images, data.test_images[:pad]])), split),
    _put(np.concatenate([data.test_labels, data.test_labels[:pad]]), split),
    _put(np.arange(n_test + pad) < n_test, split),
  )


def _zero_metrics(state: TrainState, sharding: NamedSharding) -> TrainState:
  return state._replace(
    loss_sum=_put(np.float32(0), sharding),
    correct=_put(np.int32(0), sharding),
    count=_put(np.int32(0), sharding),
  )


def create_train_state(
  config: Config, mesh: Mesh
) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
  """The model's graphdef, the optimizer, and the initial state, replicated over ``mesh``."""
  model = MLP(config.hidden, config.dropout_rate, rngs=nnx.Rngs(params=config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = OPTIMIZERS[config.optimizer](config.learning_rate)
  state = TrainState(np.int32(0), params, tx.init(params), np.float32(0), np.int32(0), np.int32(0))
  replicated = NamedSharding(mesh, P())
  return graphdef, tx, jax.tree.map(lambda x: _put(x, replicated), state)


def init_from_checkpoint(
  path: str | os.PathLike, config: Config, state: TrainState
) -> tuple[TrainState, str]:
  """``state`` with parameters, optimizer state and step taken from a Keras/TF checkpoint.

  Anything ``adamjax.convert.read`` reads works, including a ``to-jax`` output directory. The
  parameters and Adam slots are mapped onto this model by layer name and checked against it
  (every missing, unexpected or mis-shaped entry is reported); the checkpoint's optimizer
  settings must be the ones this run uses, so that training continues exactly.

  Returns:
    The new state (on the host; the caller places it) and a line describing what was loaded.

  Raises:
    adamjax.convert.ConversionError: if the checkpoint does not fit this model or run.
  """
  from adamjax import convert

  ckpt = convert.read(path)
  if ckpt.optimizer is None:
    raise convert.ConversionError(
      f"{path}: the {ckpt.format} checkpoint holds no optimizer state to continue from"
    )
  if config.optimizer == "keras_adam":
    # The exact continuation: the checkpoint's own Keras settings must be this run's.
    keras_tx = convert.keras_optimizer(ckpt)
    ours = OPTIMIZERS[config.optimizer](config.learning_rate)
    params = jax.tree.map(np.asarray, state.params)
    probe = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
    theirs_update = keras_tx.update(probe, keras_tx.init(params), params)[0]
    ours_update = ours.update(probe, ours.init(params), params)[0]
    if not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(theirs_update), jax.tree.leaves(ours_update), strict=True)
    ):
      raise convert.ConversionError(
        f"{path}: the checkpoint's {ckpt.optimizer.class_name} settings "
        f"(learning rate {ckpt.optimizer.learning_rate}, {ckpt.optimizer.config}) are not "
        f"this run's keras_adam({config.learning_rate}); pass the matching "
        "--learning-rate"
      )
  tx = OPTIMIZERS[config.optimizer](config.learning_rate)
  params = convert.to_flax(ckpt, jax.tree.map(np.asarray, state.params))
  opt_state = convert.adam_state(ckpt, tx, params)
  step = np.int32(ckpt.optimizer.iterations)
  return (
    state._replace(step=step, params=params, opt_state=opt_state),
    f"{ckpt.format} checkpoint {path} at step {int(step)}",
  )


def _prepare_workdir(workdir: Path, config: Config) -> None:
  """Continue an earlier run's checkpoints (resume), delete them (overwrite), or refuse."""
  ckpt_dir = workdir / CHECKPOINT_DIR
  if config.overwrite and jax.process_index() == 0:
    for name in (CHECKPOINT_DIR, DAMAGED_DIR):
      shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "metrics.png", "summary.json"):
      (workdir / name).unlink(missing_ok=True)
  if not config.resume and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise FileExistsError(
      f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to "
      "continue it, --overwrite to start over, or another --workdir"
    )
  workdir.mkdir(parents=True, exist_ok=True)


def train_and_evaluate(config: Config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains and evaluates the MLP as configured; writes metrics, plot and checkpoints.

  Returns:
    A dict: ``history`` (one dict per finished epoch: epoch, step, loss, accuracy, val_loss,
    val_accuracy, seconds, train_seconds), ``test_loss`` and ``test_accuracy`` of the final
    parameters, ``step``, ``compile_seconds``, ``devices``, ``data_source``, ``config``, and
    ``state`` (the final ``TrainState``).
  """
  for name, value, allowed in (
    ("optimizer", config.optimizer, tuple(OPTIMIZERS)),
    ("data_source", config.data_source, DATA_SOURCES),
    ("progress", config.progress, PROGRESS),
  ):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  workdir = Path(workdir)
  lead = jax.process_index() == 0

  def log(message: str) -> None:
    if lead and config.progress != "none":
      print(message, flush=True)

  devices = jax.devices()
  log(
    f"JAX {jax.__version__}: {len(devices)} device(s) {[str(d) for d in devices]} "
    f"on {jax.default_backend()}, {jax.process_count()} process(es)"
    + (f"; data-parallel over {len(devices)} devices" if len(devices) > 1 else "")
  )
  if config.batch_size % len(devices):
    raise ValueError(
      f"batch_size {config.batch_size} is not divisible by the "
      f"{len(devices)} devices it is split over"
    )
  mesh = Mesh(np.array(devices), ("data",))
  replicated, batches = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  _prepare_workdir(workdir, config)

  data = load_data(config, verbose=lead and config.progress != "none")
  n_train, n_test = len(data.train_labels), len(data.test_labels)
  log(f"MNIST ({data.source}): {n_train} training and {n_test} test examples")
  on_device = _to_devices(data, mesh)
  graphdef, tx, state = create_train_state(config, mesh)
  steps_per_epoch = math.ceil(n_train / config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)

  # Saved with every checkpoint; a resumed run must agree on all of these.
  run_meta = {
    "seed": config.seed,
    "batch_size": config.batch_size,
    "optimizer": config.optimizer,
    "learning_rate": config.learning_rate,
    "dropout_rate": config.dropout_rate,
    "hidden": config.hidden,
    "steps_per_epoch": steps_per_epoch,
    "data_source": data.source,
    "data_order": "numpy.random.default_rng([seed, epoch]).permutation",
    "dropout_key": "jax.random.fold_in(jax.random.key(seed), step)",
  }
  history: list[dict[str, Any]] = []
  epoch_elapsed = 0.0  # Seconds already spent on the current epoch before a resume.
  if config.init_from and config.resume:
    raise ValueError(
      "pass either --init-from (a new run from a converted checkpoint) or "
      "--resume (this workdir's own checkpoints), not both"
    )
  if config.init_from:
    host_state, what = init_from_checkpoint(config.init_from, config, state)
    state = jax.tree.map(lambda x: _put(x, replicated), host_state)
    run_meta["init_from"] = str(config.init_from)
    log(f"Initialised from the {what}")
  if config.resume:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = _restore_latest_good(workdir, config, abstract)
    if restored is None:
      log(f"--resume: no checkpoint in {workdir / CHECKPOINT_DIR}, starting from scratch")
    else:
      state, meta = restored
      for key, value in run_meta.items():
        if meta.get(key) != value:
          raise ValueError(
            f"cannot resume: the checkpoint was made with {key}="
            f"{meta.get(key)!r}, this run has {key}={value!r}"
          )
      history, epoch_elapsed = meta["history"], meta["epoch_elapsed"]
      if lead and history:  # The kill may have come between the save and these writes.
        _write_outputs(workdir, history, config.plot)
      log(
        f"Resumed from {workdir / CHECKPOINT_DIR / str(meta['step'])}: step "
        f"{meta['step']} (epoch {meta['epoch'] + 1}, step {meta['step_in_epoch']} of "
        f"{steps_per_epoch})"
      )

  train_steps = make_train_steps(graphdef, tx, config.seed, mesh)
  evaluate = make_evaluate(graphdef)
  test_set = (on_device.test_images, on_device.test_labels, on_device.test_mask)
  manager = _checkpoint_manager(workdir, config)
  progress = _Progress(config.progress, config.epochs, steps_per_epoch)

  def save(step: int, epoch_seconds: float) -> None:
    epoch, pos = divmod(step, steps_per_epoch)
    _save(
      manager,
      state,
      dict(
        run_meta,
        step=step,
        epoch=epoch,
        step_in_epoch=pos,
        history=history,
        epoch_elapsed=epoch_seconds,
      ),
    )

  def epoch_data(epoch: int) -> tuple[jax.Array, jax.Array]:
    index, mask = epoch_batches(n_train, config.batch_size, config.seed, epoch)
    return _put(index, batches), _put(mask, batches)

  def run_steps(state, index, mask, start, stop):
    return train_steps(
      state, on_device.train_images, on_device.train_labels, index, mask, start, stop
    )

  step = int(_host(state.step))
  data_epoch, pos = divmod(step, steps_per_epoch)
  index, mask = epoch_data(data_epoch)

  # Compile before the first epoch, so that its time is the training time: a zero-step call
  # (start == stop) compiles the loop and returns the state unchanged.
  start = time.perf_counter()
  state = run_steps(state, index, mask, pos, pos)
  jax.block_until_ready(evaluate(state.params, *test_set))
  compile_seconds = time.perf_counter() - start
  log(
    f"Compiled the training loop and evaluation in {compile_seconds:.2f}s; "
    f"{steps_per_epoch} steps per epoch of batch {config.batch_size}, "
    f"optimizer {config.optimizer}"
  )

  chunks = config.progress_chunks if progress.mode == "bar" else 0
  while step < total_steps:  # One epoch (or what is left of it) per iteration.
    epoch, pos = divmod(step, steps_per_epoch)
    if pos == 0:  # A new epoch: fresh metric sums.
      state, epoch_elapsed = _zero_metrics(state, replicated), 0.0
    if data_epoch != epoch:
      data_epoch, (index, mask) = epoch, epoch_data(epoch)
    stop = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    progress.start(epoch)
    start = time.perf_counter()
    for end in _segment_ends(
      epoch * steps_per_epoch, pos, stop, steps_per_epoch, config.checkpoint_every, chunks
    ):
      state = run_steps(state, index, mask, pos, end)
      pos, step = end, epoch * steps_per_epoch + end
      checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
      if chunks or checkpoint:
        jax.block_until_ready(state)
        progress.update(pos, epoch_elapsed + time.perf_counter() - start, state)
      if checkpoint and pos < steps_per_epoch:  # The epoch's end is saved below.
        save(step, epoch_elapsed + time.perf_counter() - start)
    jax.block_until_ready(state)
    train_seconds = epoch_elapsed + time.perf_counter() - start
    if pos < steps_per_epoch:  # Stopped mid-epoch by max_steps.
      save(step, train_seconds)
      log(("\n" if chunks else "") + f"Stopped at step {step} (max_steps), in epoch {epoch + 1}")
      break
    val_loss, val_correct = map(_host, evaluate(state.params, *test_set))
    count = max(int(_host(state.count)), 1)
    history.append(
      {
        "epoch": epoch + 1,
        "step": step,
        "loss": float(_host(state.loss_sum)) / count,
        "accuracy": int(_host(state.correct)) / count,
        "val_loss": float(val_loss),
        "val_accuracy": int(val_correct) / n_test,
        "seconds": epoch_elapsed + time.perf_counter() - start,
        "train_seconds": train_seconds,
      }
    )
    save(step, 0.0)
    progress.end(pos, history[-1])
    if lead:
      _write_outputs(workdir, history, config.plot)
  manager.close()

  test_loss, test_correct = map(_host, evaluate(state.params, *test_set))
  step = int(_host(state.step))
  metrics = {
    "history": history,
    "test_loss": float(test_loss),
    "test_accuracy": int(test_correct) / n_test,
    "step": step,
    "compile_seconds": compile_seconds,
    "devices": [str(d) for d in devices],
    "data_source": data.source,
    "config": dataclasses.asdict(config),
  }
  log(
    f"Final test accuracy: {metrics['test_accuracy']:.4f} "
    f"(loss {metrics['test_loss']:.4f}) after {step} steps"
  )
  if lead:
    text = json.dumps(metrics, indent=2) + "\n"
    _atomic_write(workdir / "summary.json", lambda p: p.write_text(text))
  return dict(metrics, state=state)


def _segment_ends(
  epoch_start: int, pos: int, stop: int, steps_per_epoch: int, checkpoint_every: int, chunks: int
) -> list[int]:
  """In-epoch positions after ``pos`` where the device loop returns to Python, up to ``stop``."""
  ends = {stop}
  if checkpoint_every:
    first = (epoch_start + pos) // checkpoint_every + 1
    ends.update(range(first * checkpoint_every - epoch_start, stop, checkpoint_every))
  if chunks:
    ends.update(math.ceil(k * steps_per_epoch / chunks) for k in range(1, chunks))
  return sorted(e for e in ends if pos < e <= stop)


def load_train_state(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, dict]:
  """Reads a checkpoint's train state and metadata (the newest checkpoint by default).

  Needs no model or optimizer: the state comes back as nested dicts of numpy arrays (a
  ``TrainState``'s fields by name), shaped as the checkpoint's own metadata says. For tests
  and inspection; training resumes through ``Config.resume``.
  """
  import orbax.checkpoint as ocp

  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  with ocp.CheckpointManager(
    Path(workdir, CHECKPOINT_DIR).absolute(), item_handlers=handlers, options=options
  ) as manager:
    step = manager.latest_step() if step is None else step
    tree = manager.item_metadata(step)["state"].tree
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), tree)
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
  return jax.tree.map(np.asarray, restored.state), restored.meta


# ---------------------------------------------------------------------------------------------
# Command line.


def _cpu_threads_setting(value: str) -> str:
  if value in ("all", "auto") or (value.isdigit() and int(value) > 0):
    return value
  raise argparse.ArgumentTypeError(f"expected a positive number, 'all' or 'auto', got {value!r}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
  defaults = Config()
  parser = argparse.ArgumentParser(
    description="Train the Keras tutorial's MNIST MLP with Flax NNX and adamjax."
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="metrics.jsonl, metrics.png, summary.json, checkpoints/ (default: a "
    f"new {DEFAULT_RUNS}/<date-time>; with --resume, the newest of those)",
  )
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
  parser.add_argument(
    "--optimizer",
    choices=sorted(OPTIMIZERS),
    default=defaults.optimizer,
    help="an adamjax preset, or optax.adam for comparison (default: %(default)s)",
  )
  parser.add_argument(
    "--data-source",
    choices=DATA_SOURCES,
    default=defaults.data_source,
    help="where MNIST comes from (see train/mnist_data.py); 'synthetic' is "
    "random data for tests (default: %(default)s)",
  )
  parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (raw or .gz)")
  parser.add_argument("--cache-dir", help="MNIST cache (default: ~/.cache/adamjax/mnist)")
  parser.add_argument(
    "--checkpoint-every",
    type=int,
    default=defaults.checkpoint_every,
    metavar="STEPS",
    help="also checkpoint every STEPS steps (default: only at the end of each epoch)",
  )
  parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
  parser.add_argument(
    "--resume", action="store_true", help="continue from the newest good checkpoint in --workdir"
  )
  parser.add_argument(
    "--init-from",
    metavar="PATH",
    help="start from converted weights and Adam state: any checkpoint "
    "adamjax.convert reads (.keras, .weights.h5, a TF checkpoint, ...) or "
    "the output of `python -m adamjax.convert to-jax`; training "
    "continues at its step count",
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="delete the checkpoints and metrics of an earlier run in --workdir",
  )
  parser.add_argument("--max-steps", type=int, help="stop after this many steps in all")
  parser.add_argument(
    "--limit-train-examples",
    type=int,
    metavar="N",
    help="train on the first N training examples only",
  )
  parser.add_argument(
    "--limit-test-examples",
    type=int,
    metavar="N",
    help="evaluate on the first N test examples only",
  )
  parser.add_argument(
    "--progress",
    choices=PROGRESS,
    default=defaults.progress,
    help="'bar' (live, per chunk of steps), 'epoch' (a line per epoch) or "
    "'none'; auto: bar on a terminal (default: %(default)s)",
  )
  parser.add_argument("--no-plot", dest="plot", action="store_false")
  parser.add_argument(
    "--cpu-threads",
    default="1",
    type=_cpu_threads_setting,
    metavar="N|all|auto",
    help="threads XLA:CPU splits each op over: a number, all cores, or auto "
    "(the cores no other process keeps busy); one is fastest for this "
    "small model on a shared machine (default: %(default)s)",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="multi-host: call jax.distributed.initialize() first; it finds the "
    "coordinator and process ids on Cloud TPU, SLURM, Open MPI and "
    "Kubernetes, or takes them from the three flags below",
  )
  parser.add_argument("--coordinator-address", help="host:port of process 0 (--distributed)")
  parser.add_argument("--num-processes", type=int, help="number of processes (--distributed)")
  parser.add_argument("--process-id", type=int, help="this process's id (--distributed)")
  args = parser.parse_args(argv)
  fields = {f.name for f in dataclasses.fields(Config)}
  config = Config(**{k: v for k, v in vars(args).items() if k in fields})
  return args, config


def cpu_thread_count(setting: str) -> int | None:
  """XLA:CPU threads for ``--cpu-threads``: a number, ``all`` (None: XLA's default) or ``auto``.

  XLA:CPU splits every op of a step over its threads, and each op waits for the slowest. This
  model's ops take microseconds, so a thread that shares its core with another process stalls
  every op: on the 2-core CI machine with other jobs running, one thread trained an epoch in
  about 0.5 s and two in 0.75-0.8 s; with both cores idle two were ~15% faster. ``auto`` leaves
  out the cores the 1-minute load average says are busy (at least one thread), but that
  average lags, so the default is one thread: never much slower, often much faster.
  """
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if setting == "all":
    return None
  if setting == "auto":
    return max(1, cpus - round(os.getloadavg()[0]))
  return min(max(1, int(setting)), cpus)


def start_jax(
  *, distributed: bool = False, cpu_threads: str = "1", **distributed_args: Any
) -> int | None:
  """Starts JAX's backends: multi-host first if asked, with XLA:CPU's thread pool sized.

  XLA sizes its CPU thread pool from the process's CPU affinity when the backend starts (JAX's
  documented way to limit it, jax-ml/jax#1539). So this pins the process to as many cores as
  :func:`cpu_thread_count` says while the backends start, then gives every thread all the
  cores back: the pool keeps its size, and its threads may run on any core. The thread count
  does not change results (the ops split their outputs, not their sums). Must run before
  anything else starts JAX's backends; GPU and TPU backends are unaffected.

  Args:
    distributed: Call ``jax.distributed.initialize(**distributed_args)`` first (multi-host).
    cpu_threads: ``--cpu-threads``, see :func:`cpu_thread_count`.
    **distributed_args: ``coordinator_address``, ``num_processes``, ``process_id``.

  Returns:
    The size of the XLA:CPU thread pool, or None where XLA chose it (one thread per core).
  """
  if distributed:  # Before anything starts a backend. None arguments are auto-detected.
    jax.distributed.initialize(**distributed_args)
  threads = cpu_thread_count(cpu_threads)
  if threads is None or not hasattr(os, "sched_setaffinity"):
    jax.devices()
    return None
  cpus = os.sched_getaffinity(0)
  os.sched_setaffinity(0, sorted(cpus)[:threads])
  try:
    jax.devices()
  finally:
    for tid in os.listdir("/proc/self/task"):
      try:
        os.sched_setaffinity(int(tid), cpus)
      except OSError:  # A thread that has exited since the listing.
        pass
  return threads


DEFAULT_RUNS = Path("workdir", "mnist")


def _default_workdir(resume: bool) -> Path:
  """A fresh run directory under DEFAULT_RUNS, or with `resume` the newest existing one."""
  runs = sorted(p for p in DEFAULT_RUNS.glob("*") if p.is_dir()) if DEFAULT_RUNS.is_dir() else []
  if resume and runs:
    return runs[-1]
  return DEFAULT_RUNS / time.strftime("%Y%m%d-%H%M%S")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args, config = parse_args(argv)
  threads = start_jax(
    distributed=args.distributed,
    cpu_threads=args.cpu_threads,
    coordinator_address=args.coordinator_address,
    num_processes=args.num_processes,
    process_id=args.process_id,
  )
  if jax.default_backend() == "cpu" and config.progress != "none":
    print(
      f"XLA:CPU threads: {threads or 'one per core'} (--cpu-threads {args.cpu_threads}; "
      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
      flush=True,
    )
  try:
    return train_and_evaluate(config, args.workdir or _default_workdir(config.resume))
  except FileExistsError as e:  # A workdir holding another run: say so without a traceback.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
