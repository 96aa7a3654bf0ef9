"""Starting JAX for training (multi-host, XLA:CPU's thread pool), the mesh, host <-> device.

On CPU, XLA runs each op on one thread by default here (``--cpu-threads``): the ops of this
model take microseconds, and splitting them over threads that share cores with other processes
costs more than it gains (:func:`cpu_thread_count`). The thread count does not change results.

With several devices (``jax.devices()``), training is data-parallel: one mesh axis ``data`` over
all devices, the batch split along it, parameters and optimizer state replicated (or the
optimizer state split along it, ``--shard-optimizer-state``). Multi-host: :func:`start_jax` with
``distributed=True`` on every host (gloo collectives on CPU); the mesh spans every process's
devices, and :func:`sync` and :func:`all_true` keep the processes in step where only process 0
acts or where all must agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from train.config import option


def _cpu_threads_setting(value: str) -> str:
  if value in ("all", "auto") or (value.isdigit() and int(value) > 0):
    return value
  raise argparse.ArgumentTypeError(f"expected a positive number, 'all' or 'auto', got {value!r}")


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How JAX starts (the flags beside :class:`train.config.Config`'s): :func:`start_jax`'s."""

  cpu_threads: str = option(
    "1",
    "threads XLA:CPU splits each op over: a number, all cores, or auto (the cores no other "
    "process keeps busy); one is fastest for this small model on a shared machine",
    type=_cpu_threads_setting,
    metavar="N|all|auto",
  )
  distributed: bool = option(
    False,
    "multi-host: call jax.distributed.initialize() first; it finds the coordinator and "
    "process ids on Cloud TPU, SLURM, Open MPI and Kubernetes, or takes them from the three "
    "flags below",
  )
  coordinator_address: str | None = option(None, "host:port of process 0 (--distributed)")
  num_processes: int | None = option(None, "number of processes (--distributed)")
  process_id: int | None = option(None, "this process's id (--distributed)")


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
    if _may_use_cpu() and jax.config.jax_cpu_collectives_implementation in (None, "none"):
      # XLA:CPU has no cross-process collectives of its own: without gloo (the default since
      # JAX 0.5; "none" before), a CPU mesh over several processes cannot all-reduce. Only the
      # CPU client reads this setting; an MPI choice of the user's is kept.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def _may_use_cpu() -> bool:
  """Whether JAX may pick the CPU backend (``JAX_PLATFORMS`` unset, or naming cpu)."""
  platforms = jax.config.jax_platforms
  return not platforms or "cpu" in platforms.split(",")


def sync(name: str) -> None:
  """Every process waits here until all have arrived (nothing to do with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_true(flag: bool) -> np.ndarray:
  """Every process's ``flag``, in process order, on every process (a collective)."""
  if jax.process_count() == 1:
    return np.array([flag])
  return np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).reshape(-1) != 0


def describe_devices() -> str:
  """One line: JAX's version, its devices, backend and processes."""
  devices = jax.devices()
  return (
    f"JAX {jax.__version__}: {len(devices)} device(s) {[str(d) for d in devices]} "
    f"on {jax.default_backend()}, {jax.process_count()} process(es)"
    + (f"; data-parallel over {len(devices)} devices" if len(devices) > 1 else "")
  )


def make_mesh(batch_size: int) -> Mesh:
  """One ``data`` axis over every device; the batch must split evenly over them."""
  devices = jax.devices()
  if batch_size % len(devices):
    raise ValueError(
      f"batch_size {batch_size} is not divisible by the {len(devices)} devices it is split over"
    )
  return Mesh(np.array(devices), ("data",))


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value every process holds (works with several processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def host(x: Any) -> np.ndarray:
  """This process's copy of a replicated array (or any value) as a NumPy array."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
