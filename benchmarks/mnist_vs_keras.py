"""Seconds per epoch of the tutorial MLP on real MNIST: Keras `fit` (TF, JAX) vs train/mnist.py.

All three train the same model (Flatten -> Dense(128, relu) -> Dropout(0.2) -> Dense(10)), loss
(softmax cross-entropy on logits), optimizer (Adam 1e-3), batch size (32), epochs and data
(real MNIST from ``train/mnist_data.py``, pixels / 255), with the test set as validation data,
so an epoch's time includes the same validation pass for everyone. Each run is a fresh
subprocess (a process holds one Keras backend); runs of the three variants are interleaved, so
load on a shared machine hits them alike.

Reported per variant: the first epoch (which, for Keras, includes tracing and compilation),
train/mnist.py's separate compile time, seconds per epoch as the median over epochs 2.. of the
median over repeats (compile excluded), and the ratios. Usage, from the repository root::

    python -m benchmarks.mnist_vs_keras [--epochs 3] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adamjax.testing import call_in_keras_backend
from train.mnist_data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (label, KERAS_BACKEND or None for train/mnist.py)
  "keras_tf": ("Keras fit, TensorFlow backend", "tensorflow"),
  "keras_jax": ("Keras fit, JAX backend", "jax"),
  "adamjax": ("train/mnist.py (one XLA:CPU thread, the default)", None),
  "adamjax_all_threads": ("train/mnist.py --cpu-threads all", None),
}
CPU_THREADS = {"adamjax_all_threads": "all"}


def keras_fit_seconds(arrays: dict, spec: dict) -> dict[str, np.ndarray]:
  """Runs in a subprocess with KERAS_BACKEND set (``call_in_keras_backend``): times ``fit``."""
  import keras

  from adamjax.testing import tutorial_mlp

  mnist = load_mnist(source=spec["data_source"], verbose=False)
  x_train, x_test = mnist.train_images / 255.0, mnist.test_images / 255.0  # The tutorial's.
  keras.utils.set_random_seed(spec["seed"])
  model = tutorial_mlp(keras, optimizer=keras.optimizers.Adam(1e-3))

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      seconds.append(time.perf_counter() - self.start)

  seconds: list[float] = []
  history = model.fit(
    x_train,
    mnist.train_labels,
    batch_size=32,
    epochs=spec["epochs"],
    validation_data=(x_test, mnist.test_labels),
    callbacks=[Timer()],
    verbose=0,
  )
  return {
    "seconds": np.asarray(seconds),
    "test_accuracy": np.asarray(history.history["val_accuracy"][-1]),
  }


def run_variant(name: str, epochs: int, seed: int, data_source: str) -> dict:
  backend = VARIANTS[name][1]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if backend is not None:
    spec = {"epochs": epochs, "seed": seed, "data_source": data_source}
    out = call_in_keras_backend(
      backend, __file__, "keras_fit_seconds", {}, spec, timeout=None, pythonpath=[ROOT]
    )
    return {
      "backend": backend,
      "seconds": out["seconds"].tolist(),
      "compile_seconds": None,
      "test_accuracy": float(out["test_accuracy"]),
    }
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [
      sys.executable,
      "-m",
      "train.mnist",
      "--workdir",
      workdir,
      "--epochs",
      str(epochs),
      "--seed",
      str(seed),
      "--data-source",
      data_source,
      "--progress",
      "none",
      "--no-plot",
    ]
    if name in CPU_THREADS:
      cmd += ["--cpu-threads", CPU_THREADS[name]]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    summary = json.loads(Path(workdir, "summary.json").read_text())
  return {
    "backend": "jax",
    "seconds": [row["seconds"] for row in summary["history"]],
    "compile_seconds": summary["compile_seconds"],
    "test_accuracy": summary["test_accuracy"],
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-source", default="auto")
  parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
  parser.add_argument("--json", help="also write the raw timings here")
  args = parser.parse_args(argv)
  if args.epochs < 2:
    parser.error("--epochs must be at least 2 (epoch 1 includes compilation)")

  # Fetch and verify MNIST once, before anything is timed.
  load_mnist(source=args.data_source, verbose=False)
  # Timings on a shared machine depend on what else runs: record the load beside them.
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
  runs: dict[str, list[dict]] = {name: [] for name in args.variants}
  for repeat in range(args.repeats):
    for name in args.variants:
      run = run_variant(name, args.epochs, args.seed + repeat, args.data_source)
      runs[name].append(run)
      print(
        f"[{repeat + 1}/{args.repeats}] {name}: epochs "
        + ", ".join(f"{s:.3f}" for s in run["seconds"])
        + f" s; test accuracy {run['test_accuracy']:.4f}",
        file=sys.stderr,
        flush=True,
      )

  rows = {}
  for name, variant_runs in runs.items():
    per_run = [statistics.median(r["seconds"][1:]) for r in variant_runs]
    compiles = [r["compile_seconds"] for r in variant_runs if r["compile_seconds"] is not None]
    rows[name] = {
      "label": VARIANTS[name][0],
      "first_epoch": statistics.median(r["seconds"][0] for r in variant_runs),
      "compile": statistics.median(compiles) if compiles else None,
      "per_epoch": statistics.median(per_run),
      "best_epoch": min(s for r in variant_runs for s in r["seconds"][1:]),
      "test_accuracy": [r["test_accuracy"] for r in variant_runs],
    }
  load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(
    f"MNIST MLP, batch 32, {args.epochs} epochs, {args.repeats} repeat(s); "
    f"s/epoch = median of epochs 2..{args.epochs} (compile excluded), median over repeats"
  )
  if load_start and load_end:
    print(
      f"load average (1, 5, 15 min) on {os.cpu_count()} CPUs: "
      f"{', '.join(f'{x:.2f}' for x in load_start)} at the start, "
      f"{', '.join(f'{x:.2f}' for x in load_end)} at the end"
    )
  header = (
    f"{'variant':50s} {'s/epoch':>8s} {'best':>7s} {'epoch 1':>8s} {'compile':>8s} "
    f"{'vs Keras-TF':>11s} {'vs Keras-JAX':>12s} {'test acc':>9s}"
  )
  print(header)
  print("-" * len(header))
  for row in rows.values():
    ratios = []
    for ref in ("keras_tf", "keras_jax"):
      ratios.append(f"{rows[ref]['per_epoch'] / row['per_epoch']:.1f}x" if ref in rows else "-")
    compile_s = f"{row['compile']:.2f}" if row["compile"] is not None else "in ep. 1"
    print(
      f"{row['label']:50s} {row['per_epoch']:8.3f} {row['best_epoch']:7.3f} "
      f"{row['first_epoch']:8.2f} {compile_s:>8s} {ratios[0]:>11s} {ratios[1]:>12s} "
      f"{statistics.median(row['test_accuracy']):9.4f}"
    )
  if args.json:
    Path(args.json).write_text(
      json.dumps({"runs": runs, "summary": rows, "load_average": [load_start, load_end]}, indent=2)
      + "\n"
    )
  return rows


if __name__ == "__main__":
  main()
