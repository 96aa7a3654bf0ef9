"""Checkpoints of a run, with integrity: Orbax saves, sha256 manifests, resume, quarantine.

A checkpoint (``checkpoints/<step>``) holds the train state and ``meta``: the run's settings,
epoch and step, the metrics so far and the sha256 of the state; a ``sha256.json`` beside Orbax's
files records each file's sha256. Orbax writes into a temporary directory and renames it when
complete, so a kill leaves either the whole checkpoint or none. :func:`restore_latest_good`
resumes from the newest checkpoint whose files and state match their digests; a damaged one is
reported, moved to ``damaged_checkpoints/``, and the previous one is used.

Several processes (``--distributed``) share one workdir: every process saves through Orbax, which
writes each process's shards and has the primary commit the checkpoint; the manifest, metrics,
plot and summary come from process 0 alone. :func:`check_shared_workdir` makes sure at start-up
that every process sees the same directory (Orbax would otherwise wait for ever for a directory
the primary made in a folder another process never sees).

The layout, the digests and the reader are in ``adamjax.convert._train_workdir``, shared with
``python -m adamjax.convert to-keras``, which reads a workdir the same way.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from adamjax.convert._train_workdir import (
  CHECKPOINT_DIR,
  MANIFEST,
  checkpoint_steps,
  file_digests,
  read_checkpoint,
  state_digest,
)
from train.config import OPTIMIZERS, Config
from train.files import atomic_write
from train.runtime import all_true, put, sync

DAMAGED_DIR = "damaged_checkpoints"
OUTPUTS = ("metrics.jsonl", "metrics.png", "summary.json")


class WorkdirNotShared(RuntimeError):
  """The processes of a multi-process run do not all see the same ``--workdir``."""


def check_shared_workdir(workdir: Path) -> None:
  """Raises :class:`WorkdirNotShared` on every process unless all of them see one directory.

  Process 0 creates ``workdir`` and writes a file with a random name into it; the name goes to
  the others through a collective (which also orders the write before their look); each looks
  for the file; the verdicts are gathered, so every process raises the same error or none.
  One process: nothing to check.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  lead = jax.process_index() == 0
  nonce = np.frombuffer(secrets.token_bytes(16), np.int32) if lead else np.zeros(4, np.int32)
  probe = lambda n: workdir / f".shared-check-{bytes(np.asarray(n)).hex()}"  # noqa: E731
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(probe(nonce), lambda p: p.write_text(str(os.getpid())))
  nonce = multihost_utils.broadcast_one_to_all(nonce, is_source=lead)
  sees = all_true(probe(nonce).is_file())  # After this collective, every process has looked.
  if lead:
    probe(nonce).unlink()
  if not sees.all():
    blind = [i for i, ok in enumerate(sees) if not ok]
    raise WorkdirNotShared(
      f"--workdir {workdir} (here {workdir.absolute()}, process {jax.process_index()}) is not "
      f"the directory process 0 writes to, as seen from process(es) {blind}: every process "
      "must be given the same --workdir on a file system they all share (NFS, GCS FUSE, ...)"
    )


def prepare_workdir(workdir: Path, config: Config) -> None:
  """Continue an earlier run's checkpoints (resume), delete them (overwrite), or refuse."""
  check_shared_workdir(workdir)
  if config.overwrite and jax.process_index() == 0:
    for name in (CHECKPOINT_DIR, DAMAGED_DIR):
      shutil.rmtree(workdir / name, ignore_errors=True)
    for name in OUTPUTS:
      (workdir / name).unlink(missing_ok=True)
  sync("prepare_workdir")  # The others look for checkpoints once process 0 has deleted them.
  if not config.resume and checkpoint_steps(workdir):
    raise FileExistsError(
      f"{workdir / CHECKPOINT_DIR} holds checkpoints of an earlier run: pass --resume to "
      "continue it, --overwrite to start over, or another --workdir"
    )
  workdir.mkdir(parents=True, exist_ok=True)


def checkpoint_manager(workdir: Path, config: Config):
  """The Orbax manager the run saves through."""
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


def save(manager, state: Any, meta: dict[str, Any]) -> None:
  """Saves ``state`` and ``meta`` (with the state's digest) at ``meta["step"]``, then the
  manifest of the files written. Does nothing if that step is saved already."""
  import orbax.checkpoint as ocp

  step = int(meta["step"])
  if step in manager.all_steps():
    return
  meta = dict(meta, digest=state_digest(state))
  manager.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  )
  if jax.process_index() == 0:
    step_dir = Path(manager.directory) / str(step)
    text = json.dumps(file_digests(step_dir), indent=1) + "\n"
    atomic_write(step_dir / MANIFEST, lambda p: p.write_text(text))


def save_step(manager, run_meta, history, state, step: int, epoch_seconds: float) -> None:
  """A checkpoint at ``step`` with the run's settings, its position and the metrics so far.

  ``epoch_seconds`` is the training time spent on its epoch so far (a resumed epoch adds to it).
  """
  epoch, pos = divmod(step, run_meta["steps_per_epoch"])
  meta = dict(run_meta, step=step, epoch=epoch, step_in_epoch=pos, history=history)
  save(manager, state, dict(meta, epoch_elapsed=epoch_seconds))


def restore_latest_good(workdir: Path, abstract: Any) -> tuple[Any, dict[str, Any]] | None:
  """The newest checkpoint that restores and matches its digests; damaged ones are moved aside.

  Args:
    workdir: The run's workdir.
    abstract: The state's structure, ``jax.ShapeDtypeStruct`` leaves with their shardings.

  Returns:
    ``(state, meta)``, or None if there is no checkpoint at all.

  Raises:
    RuntimeError: if there are checkpoints but every one is damaged.
  """
  steps = checkpoint_steps(workdir)
  sync("restore_latest_good")  # Nobody moves a damaged checkpoint before all have listed them.
  for step in reversed(steps):
    try:
      restored, reason = read_checkpoint(workdir, step, target=abstract), ""
    # Any failure (a missing, truncated or altered file, bad metadata, a digest mismatch)
    # means this checkpoint is unusable; the previous one may be fine.
    except Exception as e:  # noqa: BLE001
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      reason = reason if len(reason) < 300 else reason[:300] + "..."
    # With several processes, all of them take or pass over the same checkpoint.
    if all_true(not reason).all():
      return restored
    if reason:
      step_dir, damaged = workdir / CHECKPOINT_DIR / str(step), workdir / DAMAGED_DIR / str(step)
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
    sync(f"damaged {step}")
  if steps:
    raise RuntimeError(
      f"no usable checkpoint in {workdir / CHECKPOINT_DIR}: all of "
      f"{steps} are damaged (moved to {workdir / DAMAGED_DIR})"
    )
  return None


def load_train_state(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, dict]:
  """Reads a checkpoint's train state and metadata (the newest checkpoint by default).

  Needs no model or optimizer: the state comes back as nested dicts of numpy arrays (a
  ``TrainState``'s fields by name). For tests and inspection; training resumes through
  ``Config.resume``. See ``adamjax.convert._train_workdir.read_checkpoint``.
  """
  return read_checkpoint(workdir, step)


def init_from_checkpoint(path: str | os.PathLike, config: Config, state: Any) -> tuple[Any, str]:
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
  tx = OPTIMIZERS[config.optimizer](config.learning_rate)
  params = jax.tree.map(np.asarray, state.params)
  if config.optimizer == "keras_adam":
    # The exact continuation: the checkpoint's own Keras settings must be this run's. Both
    # optimizers' first update of the same gradient must agree bit for bit.
    keras_tx = convert.keras_optimizer(ckpt)
    probe = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
    theirs = keras_tx.update(probe, keras_tx.init(params), params)[0]
    ours = tx.update(probe, tx.init(params), params)[0]
    if not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours), strict=True)
    ):
      raise convert.ConversionError(
        f"{path}: the checkpoint's {ckpt.optimizer.class_name} settings "
        f"(learning rate {ckpt.optimizer.learning_rate}, {ckpt.optimizer.config}) are not "
        f"this run's keras_adam({config.learning_rate}); pass the matching --learning-rate"
      )
  params = convert.to_flax(ckpt, params)
  step = np.int32(ckpt.optimizer.iterations)
  state = state._replace(step=step, params=params, opt_state=convert.adam_state(ckpt, tx, params))
  return state, f"{ckpt.format} checkpoint {path} at step {int(step)}"


def run_meta(config: Config, steps_per_epoch: int, data_source: str) -> dict[str, Any]:
  """Saved with every checkpoint; a resumed run must agree on all of these."""
  return {
    "seed": config.seed,
    "batch_size": config.batch_size,
    "optimizer": config.optimizer,
    "learning_rate": config.learning_rate,
    "dropout_rate": config.dropout_rate,
    "hidden": config.hidden,
    "steps_per_epoch": steps_per_epoch,
    "data_source": data_source,
    "data_order": "numpy.random.default_rng([seed, epoch]).permutation",
    "dropout_key": "jax.random.fold_in(jax.random.key(seed), step)",
  }


def initial_state(
  config: Config, workdir: Path, state: Any, run_meta: dict[str, Any], log: Callable[[str], None]
) -> tuple[Any, dict[str, Any] | None]:
  """The new ``state`` as is, or taken from ``config.init_from``, or (resume) from the workdir's
  newest good checkpoint, which must have been made with this ``run_meta``.

  Returns the state (placed as ``state`` is) and, when resumed, the checkpoint's meta. With
  ``init_from``, ``run_meta`` records it, so that a resume of this run must name it too.
  """
  if config.init_from and config.resume:
    raise ValueError(
      "pass either --init-from (a new run from a converted checkpoint) or "
      "--resume (this workdir's own checkpoints), not both"
    )
  if config.init_from:
    host_state, what = init_from_checkpoint(config.init_from, config, state)
    # Each leaf placed as the new state's is (replicated, or split by --shard-optimizer-state).
    leaves, treedef = jax.tree.flatten(host_state)
    shardings = [x.sharding for x in jax.tree.leaves(state)]
    state = treedef.unflatten([put(x, s) for x, s in zip(leaves, shardings, strict=True)])
    run_meta["init_from"] = str(config.init_from)
    log(f"Initialised from the {what}")
  if not config.resume:
    return state, None
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  restored = restore_latest_good(workdir, abstract)
  if restored is None:
    log(f"--resume: no checkpoint in {workdir / CHECKPOINT_DIR}, starting from scratch")
    return state, None
  state, meta = restored
  for key, value in run_meta.items():
    if meta.get(key) != value:
      raise ValueError(
        f"cannot resume: the checkpoint was made with {key}={meta.get(key)!r}, "
        f"this run has {key}={value!r}"
      )
  log(
    f"Resumed from {workdir / CHECKPOINT_DIR / str(meta['step'])}: step "
    f"{meta['step']} (epoch {meta['epoch'] + 1}, step {meta['step_in_epoch']} of "
    f"{meta['steps_per_epoch']})"
  )
  return state, meta
