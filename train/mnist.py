"""Train the Keras tutorial's MNIST MLP with Flax NNX and adamjax, fast, with exact checkpoints.

The model, loss, batch size, epochs and optimizer are those of the TensorFlow 2 quickstart
(``Flatten -> Dense(128, relu) -> Dropout(0.2) -> Dense(10)``, glorot-uniform kernels, zero biases,
softmax cross-entropy on logits, batch 32, 3 epochs, Adam 1e-3, pixels scaled by 1/255, validation
on the test set), with :func:`adamjax.keras_adam` as the default optimizer::

    python train/mnist.py            # a new workdir/mnist/<date-time>; scripts/train runs this
    python -m train.mnist --help     # the same, from the repository root

This file is the command line; the rest of ``train/`` is laid out as Flax's examples are:

- ``config.py``: the hyperparameters (the tutorial's) and run options; every flag comes from it.
- ``models.py``: the ``MLP``. ``input_pipeline.py``: MNIST scaled, placed on the devices, batched
  (real, verified MNIST from ``mnist_data.py``, or ``--data-source synthetic`` for tests).
- ``train.py``: the loss, the step, the on-device epoch and ``train_and_evaluate``.
- ``checkpointing.py``: Orbax checkpoints with sha256 manifests, resume, quarantine of damaged
  checkpoints, ``--init-from`` a Keras/TF checkpoint.
- ``reporting.py``: the metric writer (``metrics.jsonl``, ``metrics.png``, ``summary.json``),
  Keras-style progress. ``runtime.py``: JAX start-up (multi-host, XLA:CPU threads), the mesh.

``--workdir`` receives ``metrics.jsonl`` (one object per epoch), ``metrics.png`` (loss and accuracy
curves), ``summary.json`` and Orbax checkpoints (``checkpoints/<step>``: train state, RNG seed,
epoch, step and the metrics so far, with a sha256 of the state), saved at the end of every epoch
and every ``--checkpoint-every`` steps. ``--resume`` continues from the newest checkpoint that
restores and matches its digests, bit for bit as if never stopped.

Multi-host: run the same command on every host with ``--distributed`` (see ``--help``) and the
same ``--workdir`` on a file system every host shares (checked at start-up). Each process loads
the data and feeds its devices' rows of each global batch; the mesh spans every process's devices,
Orbax writes the checkpoints from all of them, and process 0 writes the metrics and summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # Run as `python train/mnist.py`: import train/ as a package from the root.
  sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax

from train.checkpointing import WorkdirNotShared, init_from_checkpoint, load_train_state
from train.config import DATA_SOURCES, OPTIMIZERS, PROGRESS, Config, add_flags, from_args
from train.input_pipeline import epoch_batches, load_data, scale_pixels, synthetic_mnist
from train.models import MLP
from train.runtime import Runtime, cpu_thread_count, start_jax
from train.train import (
  TrainState,
  create_train_state,
  make_evaluate,
  make_train_steps,
  train_and_evaluate,
)

# What notebooks and scripts use, from one import (each is defined in the module named above).
__all__ = [
  "DATA_SOURCES",
  "MLP",
  "OPTIMIZERS",
  "PROGRESS",
  "Config",
  "TrainState",
  "cpu_thread_count",
  "create_train_state",
  "epoch_batches",
  "init_from_checkpoint",
  "load_data",
  "load_train_state",
  "main",
  "make_evaluate",
  "make_train_steps",
  "parse_args",
  "scale_pixels",
  "start_jax",
  "synthetic_mnist",
  "train_and_evaluate",
]

DEFAULT_RUNS = Path("workdir", "mnist")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
  """The command line: ``--workdir``, a flag per :class:`Config` and :class:`Runtime` field."""
  parser = argparse.ArgumentParser(
    description="Train the Keras tutorial's MNIST MLP with Flax NNX and adamjax."
  )
  parser.add_argument(
    "--workdir",
    help="metrics.jsonl, metrics.png, summary.json, checkpoints/ (default: a "
    f"new {DEFAULT_RUNS}/<date-time>; with --resume, the newest of those)",
  )
  add_flags(parser, Config)
  add_flags(parser.add_argument_group("JAX start-up"), Runtime)
  args = parser.parse_args(argv)
  return args, from_args(Config, args)


def default_workdir(resume: bool) -> Path:
  """A fresh run directory under DEFAULT_RUNS, or with ``resume`` the newest existing one."""
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
  if jax.default_backend() == "cpu" and config.progress != "none" and jax.process_index() == 0:
    print(
      f"XLA:CPU threads: {threads or 'one per core'} (--cpu-threads {args.cpu_threads}; "
      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
      flush=True,
    )
  try:
    return train_and_evaluate(config, args.workdir or default_workdir(config.resume))
  # A workdir holding another run, or one the processes do not share: say so plainly.
  except (FileExistsError, WorkdirNotShared) as e:
    sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
  main()
