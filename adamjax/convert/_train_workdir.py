"""The checkpoints of a ``train/mnist.py`` workdir: where they are, their integrity, one reader.

A workdir keeps Orbax checkpoints in ``checkpoints/<step>/``, each with two items: ``state``
(the train state: ``step``, ``params``, ``opt_state``, ``loss_sum``, ``correct``, ``count``) and
``meta`` (JSON: the run's settings, epoch and step, the metrics so far and ``digest``, the sha256
of the state). Beside them, ``sha256.json`` records the sha256 of every file Orbax wrote.

:func:`read_checkpoint` is the one reader: ``train/`` resumes through it (with the state's
typed, sharded target) and ``python -m adamjax.convert to-keras`` reads a workdir with it (no
model or optimizer needed). Both get a checkpoint whose files match their manifest and, where the
caller gives a target, whose restored state matches its digest; anything else is a
:class:`~adamjax.convert.ConversionError` naming the checkpoint and what is wrong with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from adamjax.convert._ir import ConversionError

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "sha256.json"  # In each checkpoint: the sha256 of every file Orbax wrote.


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the committed checkpoints in ``workdir``, oldest first.

  Orbax renames a save to its step number only once it is complete, so a half-written one
  (a temporary name) is never listed.
  """
  folder = Path(workdir, CHECKPOINT_DIR)
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def file_digests(step_dir: Path) -> dict[str, str]:
  """The sha256 of every file of a checkpoint (relative path -> hex), the manifest excepted."""
  return {
    str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(step_dir.rglob("*"))
    if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
  }


def check_files(step_dir: Path) -> None:
  """Raises ConversionError if a file of the checkpoint is missing or differs from its sha256.

  Checked before Orbax reads anything, so a damaged file is named plainly (and Orbax is not
  left with reads in flight after a decoding error). A checkpoint whose manifest was never
  written (a kill right after Orbax committed it) is left to the state digest.
  """
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return
  expected, actual = json.loads(manifest.read_text()), file_digests(step_dir)
  for name, digest in expected.items():
    if name not in actual:
      raise ConversionError(f"{step_dir}: {name} is missing")
    if actual[name] != digest:
      raise ConversionError(f"{step_dir}: {name} does not match the sha256 recorded at saving")


def _host(x: Any) -> np.ndarray:
  """The whole value of ``x`` on the host; an array split over several processes is gathered
  (a collective: every process must call this, as every process saves and restores)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def state_digest(state: Any) -> str:
  """sha256 of every leaf's path, dtype, shape and bytes: detects a state restored wrong.

  The paths are ``jax.tree_util.keystr`` of the tree as given, so a typed state (a NamedTuple)
  and the same values as plain dicts have different digests: compare like with like.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = _host(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def read_checkpoint(
  workdir: str | os.PathLike, step: int | None = None, *, target: Any = None
) -> tuple[Any, dict[str, Any]]:
  """Reads one checkpoint of a ``train/mnist.py`` workdir: its train state and its metadata.

  Args:
    workdir: The training run's ``--workdir``.
    step: Which checkpoint; the newest by default.
    target: The state's structure as ``jax.ShapeDtypeStruct`` leaves (with shardings) to
      restore into, e.g. a ``TrainState``; its digest is then checked against the one saved
      with it. None: the state comes back as nested dicts of numpy arrays on the host, shaped
      as the checkpoint's own metadata says (no model or optimizer needed).

  Returns:
    ``(state, meta)``: the restored state and the ``meta`` item (a dict).

  Raises:
    ConversionError: no checkpoint in ``workdir``, a file missing or not matching its sha256,
      one Orbax cannot restore, or (with ``target``) a restored state that does not match its
      digest.
  """
  if step is None:
    steps = checkpoint_steps(workdir)
    if not steps:
      raise ConversionError(f"{Path(workdir, CHECKPOINT_DIR)} holds no checkpoint")
    step = steps[-1]
  step_dir = Path(workdir, CHECKPOINT_DIR, str(step)).absolute()
  if not step_dir.is_dir():
    raise ConversionError(f"{step_dir}: no such checkpoint")
  check_files(step_dir)
  try:
    restored = _restore(step_dir, target)
  except Exception as e:  # Orbax's and TensorStore's many error types, as one named error.
    reason = str(e).splitlines()[0][:300] if str(e) else ""
    raise ConversionError(
      f"{step_dir}: Orbax cannot restore it ({type(e).__name__}: {reason})"
    ) from e
  state, meta = restored.state, restored.meta
  if not isinstance(meta, dict):
    raise ConversionError(f"{step_dir}: its meta item is {type(meta).__name__}, not a JSON object")
  if target is None:
    return jax.tree.map(np.asarray, state), meta
  state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(state))
  if state_digest(state) != meta.get("digest"):
    raise ConversionError(f"{step_dir}: the restored state does not match the sha256 saved with it")
  return state, meta


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed, first lets the tasks still pending on it finish.

  Orbax runs a restore with ``loop.run_until_complete(...)`` and then ``loop.close()``, without
  cancelling or awaiting the other tasks: when one array fails to decode (a truncated or altered
  data file), the reads of the other arrays are still in flight in TensorStore's threads. Their
  completions then land on a closed loop at some later moment ("Event loop is closed", "Task
  exception was never retrieved", from whichever code runs then). Here they finish, and their
  errors are collected, before the restore returns.
  """

  def close(self) -> None:
    pending = [t for t in asyncio.all_tasks(self) if not t.done()]
    if pending and not self.is_running() and not self.is_closed():
      self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


_POLICY_LOCK = threading.Lock()


@contextlib.contextmanager
def _draining_event_loops() -> Iterator[None]:
  """Event loops created meanwhile (Orbax's, one per restore) drain their tasks on close."""
  with _POLICY_LOCK:
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
      yield
    finally:
      asyncio.set_event_loop_policy(previous)


def _restore(step_dir: Path, target: Any) -> Any:
  """Orbax's restore of both items, into ``target`` or onto the host as the metadata says.

  Nothing Orbax started is left running when this returns or raises (see _DrainingLoop).
  """
  with _draining_event_loops():
    return _orbax_restore(step_dir, target)


def _orbax_restore(step_dir: Path, target: Any) -> Any:
  import orbax.checkpoint as ocp

  handler = ocp.CompositeCheckpointHandler(
    state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
  )
  with ocp.Checkpointer(handler) as checkpointer:
    if target is None:
      tree = checkpointer.metadata(step_dir).item_metadata["state"]
      host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
      target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), getattr(tree, "tree", tree)
      )
    return checkpointer.restore(
      step_dir,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
