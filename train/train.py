"""Training and evaluation: the loss, the step, the on-device epoch, and ``train_and_evaluate``.

The training step is a pure function ``(state, batch) -> state`` over a :class:`TrainState`
pytree (the model is ``nnx.split`` into a graphdef and a plain dict of parameters once). An epoch
runs on device as one jitted ``lax.fori_loop`` over the shuffled, batched epoch, with the state
donated: no Python round trip per step. The loop's bounds are traced values, so running an epoch
in segments (for the progress bar, or ending at ``checkpoint_every`` steps) reuses one compiled
program and gives bit-identical results to running it whole.

Randomness is a function of the seed alone: the data order of epoch ``e`` is
``np.random.default_rng([seed, e]).permutation``, the dropout key of global step ``t`` is
``fold_in(key(seed), t)``. So (seed, step) is the whole RNG state, and resuming mid-epoch is
exact. The final partial batch (when the batch size does not divide the training set) is padded
and masked: Keras's ``fit`` runs ``ceil(N / batch)`` steps, the last on fewer examples, and so
does this (the loss is the mean over the real examples).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
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
from train import checkpointing, input_pipeline, reporting
from train.config import OPTIMIZERS, Config
from train.input_pipeline import epoch_batches
from train.models import MLP
from train.runtime import describe_devices, host, make_mesh, put, sync


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


def loss_fn(params, graphdef, images, labels, mask, dropout_key=None):
  """The tutorial's loss: softmax cross-entropy on logits, the mean over the real examples.

  Returns ``(mean loss, (loss sum, correct count))``; ``mask`` is False for padding.
  """
  logits = nnx.merge(graphdef, params)(images, dropout_key=dropout_key)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = mask.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask, dtype=jnp.int32)
  loss_sum = jnp.sum(losses * weights)
  return loss_sum / jnp.sum(weights), (loss_sum, correct)


def apply_gradients(tx: optax.GradientTransformation, params, opt_state, grads):
  """The optimizer's update of ``grads``, applied: returns ``(params, opt_state)``."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_step(graphdef, tx, state: TrainState, images, labels, mask, dropout_key):
  """One step on one batch: returns ``(state, mean loss, gradients)``.

  ``images`` are float32 pixels (:func:`~train.input_pipeline.scale_pixels` of the uint8 ones).
  """
  loss = lambda params: loss_fn(params, graphdef, images, labels, mask, dropout_key)  # noqa: E731
  (mean, (loss_sum, correct)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  params, opt_state = apply_gradients(tx, state.params, state.opt_state, grads)
  state = TrainState(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    loss_sum=state.loss_sum + loss_sum,
    correct=state.correct + correct,
    count=state.count + jnp.sum(mask, dtype=jnp.int32),
  )
  return state, mean, grads


def make_train_steps(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  seed: int,
  mesh: Mesh,
  state_shardings: Any = None,
) -> Callable[..., TrainState]:
  """Returns ``train_steps(state, images, labels, index, mask, start, stop) -> state``.

  It applies steps ``start..stop-1`` of the epoch whose batches are ``index``/``mask``
  ([steps, batch], from :func:`~train.input_pipeline.epoch_batches`), reading examples from
  the device-resident ``images`` (float32 pixels) and ``labels``. Jitted, ``state`` donated.
  ``state_shardings`` (a ``TrainState`` of shardings, :func:`state_shardings`) keeps the state
  laid out so through every step; None leaves the layout to XLA (all replicated here).
  """
  dropout_root = jax.random.key(seed)
  batch_sharding = NamedSharding(mesh, P("data"))

  def train_steps(state, images, labels, index, mask, start, stop):
    _check_pixels(images)

    def body(i, state):
      rows = jax.lax.with_sharding_constraint(index[i], batch_sharding)
      x = jax.lax.with_sharding_constraint(images[rows], batch_sharding)
      key = jax.random.fold_in(dropout_root, state.step)
      state = train_step(graphdef, tx, state, x, labels[rows], mask[i], key)[0]
      if state_shardings is not None:
        state = jax.lax.with_sharding_constraint(state, state_shardings)
      return state

    return jax.lax.fori_loop(start, stop, body, state)

  return jax.jit(train_steps, donate_argnums=0, out_shardings=state_shardings)


def make_evaluate(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Returns jitted ``evaluate(params, images, labels, num_valid) -> (mean loss, correct)``.

  Only the first ``num_valid`` examples count (the rest pad the set to a multiple of devices).
  """

  def evaluate(params, images, labels, num_valid):
    _check_pixels(images)
    mask = jnp.arange(labels.shape[0]) < num_valid
    mean, (_, correct) = loss_fn(params, graphdef, images, labels, mask)
    return mean, correct

  return jax.jit(evaluate)


def _check_pixels(images: jax.Array) -> None:
  if images.dtype != jnp.float32:
    raise TypeError(
      f"images must be float32 pixels in [0, 1] (scale_pixels of the uint8 images), "
      f"got {images.dtype}"
    )


def state_shardings(state: TrainState, mesh: Mesh, shard_optimizer_state: bool) -> TrainState:
  """Where each leaf of ``state`` lives: all replicated, or with ``shard_optimizer_state`` the
  optimizer state split over the ``data`` axis (:func:`adamjax.state_sharding`: each moment
  along its largest dimension the device count divides; scalars and the rest replicated).

  Adam is elementwise, so each device updates its slice of the moments and XLA gathers the
  parameter updates: every element goes through the same float32 operations as replicated.
  """
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, state)
  if shard_optimizer_state:
    shardings = shardings._replace(opt_state=adamjax.state_sharding(state.opt_state, mesh))
  return shardings


def create_train_state(
  config: Config, mesh: Mesh
) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
  """The model's graphdef, the optimizer, and the initial state placed over ``mesh``
  (replicated; the optimizer state split with ``config.shard_optimizer_state``)."""
  model = MLP(config.hidden, config.dropout_rate, rngs=nnx.Rngs(params=config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = OPTIMIZERS[config.optimizer](config.learning_rate)
  state = TrainState(np.int32(0), params, tx.init(params), np.float32(0), np.int32(0), np.int32(0))
  shardings = state_shardings(state, mesh, config.shard_optimizer_state)
  return graphdef, tx, jax.tree.map(put, state, shardings)


def bytes_per_device(tree: Any) -> int:
  """Bytes of ``tree``'s arrays held by one device (the first shard of each)."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def train_and_evaluate(config: Config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains and evaluates the MLP as configured; writes metrics, plot and checkpoints.

  Returns:
    A dict: ``history`` (one dict per finished epoch: epoch, step, loss, accuracy, val_loss,
    val_accuracy, seconds, train_seconds), ``test_loss`` and ``test_accuracy`` of the final
    parameters, ``step``, ``compile_seconds``, ``devices``, ``data_source``, ``config``, and
    ``state`` (the final ``TrainState``).
  """
  workdir, lead = Path(workdir), jax.process_index() == 0
  log = reporting.console(lead and config.progress != "none")
  writer = reporting.WorkdirWriter(workdir, plot=config.plot, enabled=lead)
  log(describe_devices())
  mesh = make_mesh(config.batch_size)
  checkpointing.prepare_workdir(workdir, config)

  data = input_pipeline.load_data(config, verbose=lead and config.progress != "none")
  n_train, n_test = len(data.train_labels), len(data.test_labels)
  log(f"MNIST ({data.source}): {n_train} training and {n_test} test examples")
  on_device = input_pipeline.to_devices(data, mesh)
  test_set = (on_device.test_images, on_device.test_labels, n_test)
  steps_per_epoch = math.ceil(n_train / config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)

  run_meta = checkpointing.run_meta(config, steps_per_epoch, data.source)
  graphdef, tx, state = create_train_state(config, mesh)
  if config.shard_optimizer_state:
    log(
      f"Optimizer state split over {mesh.size} device(s): params + state "
      f"{bytes_per_device((state.params, state.opt_state))} bytes per device "
      f"(replicated: {sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))})"
    )
  state, resumed = checkpointing.initial_state(config, workdir, state, run_meta, log)
  writer.resume(resumed["history"] if resumed else [])
  epoch_elapsed = resumed["epoch_elapsed"] if resumed else 0.0  # This epoch's, before a resume.
  progress = reporting.KerasProgress(config.progress, config.epochs, steps_per_epoch, enabled=lead)
  manager = checkpointing.checkpoint_manager(workdir, config)
  save = functools.partial(checkpointing.save_step, manager, run_meta, writer.history)

  # Compile before the first epoch, so that its time is the training time: a zero-step call
  # (start == stop) compiles the loop and returns the state unchanged.
  shardings = state_shardings(state, mesh, config.shard_optimizer_state)
  train_steps = make_train_steps(
    graphdef, tx, config.seed, mesh, shardings if config.shard_optimizer_state else None
  )
  evaluate = make_evaluate(graphdef)
  step = int(host(state.step))
  data_epoch, pos = divmod(step, steps_per_epoch)
  batches = _epoch_data(on_device, config, data_epoch, mesh)
  start = time.perf_counter()
  state = train_steps(state, *batches, pos, pos)
  jax.block_until_ready(evaluate(state.params, *test_set))
  compile_seconds = time.perf_counter() - start
  log(
    f"Compiled the training loop and evaluation in {compile_seconds:.2f}s; {steps_per_epoch} "
    f"steps per epoch of batch {config.batch_size}, optimizer {config.optimizer}"
  )

  while step < total_steps:  # One epoch (or what is left of it) per iteration.
    epoch, pos = divmod(step, steps_per_epoch)
    if pos == 0:  # A new epoch: fresh metric sums.
      state, epoch_elapsed = _zero_metrics(state, mesh), 0.0
    if data_epoch != epoch:
      data_epoch, batches = epoch, _epoch_data(on_device, config, epoch, mesh)
    stop = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    progress.start(epoch)
    state, pos, train_seconds = _train_epoch(
      train_steps, state, batches, epoch, pos, stop, config, progress, save, epoch_elapsed
    )
    step = epoch * steps_per_epoch + pos
    if pos < steps_per_epoch:  # Stopped mid-epoch by max_steps.
      save(state, step, train_seconds)
      progress.stopped(f"Stopped at step {step} (max_steps), in epoch {epoch + 1}")
      break
    row = _epoch_metrics(state, evaluate, test_set, epoch, step, train_seconds)
    writer.write_scalars(step, row)
    save(state, step, 0.0)
    progress.end(pos, row)
  manager.close()

  test_loss, test_correct = map(host, evaluate(state.params, *test_set))
  metrics = {
    "history": writer.history,
    "test_loss": float(test_loss),
    "test_accuracy": int(test_correct) / n_test,
    "step": int(host(state.step)),
    "compile_seconds": compile_seconds,
    "devices": [str(d) for d in jax.devices()],
    "data_source": data.source,
    "config": dataclasses.asdict(config),
  }
  log(
    f"Final test accuracy: {metrics['test_accuracy']:.4f} "
    f"(loss {metrics['test_loss']:.4f}) after {metrics['step']} steps"
  )
  writer.write_summary(metrics)
  sync("train_and_evaluate")  # Every process returns once process 0 has written the summary.
  return dict(metrics, state=state)


def _epoch_data(on_device, config: Config, epoch: int, mesh: Mesh):
  """The device arrays one epoch's steps read: the training set and the epoch's batches."""
  index, mask = epoch_batches(len(on_device.train_labels), config.batch_size, config.seed, epoch)
  batches = NamedSharding(mesh, P(None, "data"))
  return on_device.train_images, on_device.train_labels, put(index, batches), put(mask, batches)


def _zero_metrics(state: TrainState, mesh: Mesh) -> TrainState:
  replicated = NamedSharding(mesh, P())
  return state._replace(
    loss_sum=put(np.float32(0), replicated),
    correct=put(np.int32(0), replicated),
    count=put(np.int32(0), replicated),
  )


def _train_epoch(train_steps, state, batches, epoch, pos, stop, config, progress, save, elapsed):
  """Steps ``pos..stop-1`` of ``epoch`` on device, returning to Python only at checkpoints and
  progress-bar chunks. Returns the state, the position reached and the epoch's seconds so far
  (``elapsed`` of them before a resume)."""
  steps_per_epoch = len(batches[2])
  chunks = config.progress_chunks if progress.mode == "bar" else 0
  every = config.checkpoint_every
  start = time.perf_counter()
  for end in _segment_ends(epoch * steps_per_epoch, pos, stop, steps_per_epoch, every, chunks):
    state = train_steps(state, *batches, pos, end)
    pos, step = end, epoch * steps_per_epoch + end
    checkpoint = bool(every) and step % every == 0
    if chunks or checkpoint:
      jax.block_until_ready(state)
      progress(pos, elapsed + time.perf_counter() - start, state)
    if checkpoint and pos < steps_per_epoch:  # The epoch's end is saved by the caller.
      save(state, step, elapsed + time.perf_counter() - start)
  jax.block_until_ready(state)
  return state, pos, elapsed + time.perf_counter() - start


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


def _epoch_metrics(state, evaluate, test_set, epoch, step, train_seconds) -> dict[str, Any]:
  """Keras's epoch logs: the training sums' means and the test set's loss and accuracy."""
  start = time.perf_counter()
  val_loss, val_correct = map(host, evaluate(state.params, *test_set))
  count = max(int(host(state.count)), 1)
  return {
    "epoch": epoch + 1,
    "step": step,
    "loss": float(host(state.loss_sum)) / count,
    "accuracy": int(host(state.correct)) / count,
    "val_loss": float(val_loss),
    "val_accuracy": int(val_correct) / test_set[2],
    "seconds": train_seconds + time.perf_counter() - start,
    "train_seconds": train_seconds,
  }
