"""Cross-framework parity: a model trained by Keras (TensorFlow backend) and by JAX, compared.

Any Keras 3 model file: ``python -m train.parity MODEL.keras --data DATA.npz`` trains the file's
model in Keras and its converted Flax model (``adamjax.convert.flax_model``, the file's Adam
state) from the same weights on the same batches, with the model's compiled loss, penalties,
constraints and BatchNorm statistics; ``train/parity_model.py`` describes the data layout, the
random layers (rates set to 0 in a copy given to both sides by default) and the JAX step. The
rest of this docstring is the default comparison, the Keras tutorial's MLP.

Both frameworks train the Keras tutorial's model (``Flatten -> Dense(128, relu) -> Dropout(0.2)
-> Dense(10)``, sparse softmax cross-entropy on logits, Adam 1e-3, batch 32) from the same initial
weights on the same batches, and this reports after every step how far apart their parameters
and losses are::

    python train/parity.py                           # keras_adam vs Keras, 1000 MNIST steps
    python train/parity.py --optimizer optax.adam    # the negative control: must fail
    python train/parity.py --dropout shared-masks    # with dropout, the same masks in both

How the two runs are made identical:

- Initial weights: Keras builds the model (``adamjax.testing.tutorial_mlp``: glorot-uniform
  kernels, zero biases, from ``keras.utils.set_random_seed(seed)``) and exports them; the JAX side
  loads them into ``train/models.py``'s ``MLP``, whose layers carry Keras's names.
- Batches: ``train/input_pipeline.py``'s ``load_data`` and ``epoch_batches`` (the training
  order), full batches only. Keras gets ``images / 255.0`` in float64 cast to float32, exactly the
  tutorial's scaling; JAX uses ``scale_pixels``, a table of those same float32 values (checked).
- Dropout (``--dropout``): ``off`` trains without it (Keras ``training=False``, JAX without a
  dropout key), the exact comparison. ``shared-masks`` draws the keep masks in NumPy and applies
  them in both with TensorFlow's dropout arithmetic, ``where(keep, h * f32(1 / (1 - rate)), 0)``
  (``tf.nn.experimental.stateless_dropout``, which Keras's ``Dropout`` calls on this backend).
- Keras trains in a subprocess with ``KERAS_BACKEND=tensorflow`` (one process holds one Keras
  backend, and this process runs JAX; ``adamjax.testing.call_in_keras_backend``, arrays as
  ``.npz`` read without pickles): a ``tf.GradientTape`` step and ``optimizer.apply_gradients``,
  in a ``tf.function`` as ``fit`` runs its step (``--keras-eager`` runs it op by op; for this
  model both give the same bits). The worker is ``train/parity_keras.py``.
- JAX trains with the optimizer ``--optimizer`` names (a key of ``OPTIMIZERS``) through
  ``train/train.py``'s own ``train_step``, jitted with the state donated: its loss (optax's
  softmax cross-entropy, the mean over the batch), gradients and update. With shared masks, the
  model's dropout layer is swapped for one that applies the given mask.
- TensorFlow runs its ops on ``--threads`` threads (default 1): its CPU matmul kernels may split
  a sum over threads, so the count can change TensorFlow's rounding (XLA's does not).

Outputs in ``--workdir``: ``report.json`` (configuration, versions, per-step differences, the
worst step, the first step's gradient differences, pass/fail) and ``parity.png``. The exit code
is 0 when the largest relative parameter difference over the recorded steps is within
``--tolerance``, 1 when it is not, 2 on an error.

Differences are float64 maxima over every entry of every parameter: ``param_abs`` is
max|θ_jax - θ_keras| and ``param_rel`` is that divided by max|θ_keras| (the scale of the weights,
so a tolerance means the same thing for any initialisation).

What to expect (real MNIST, seed 0, dropout off, 1000 steps, one CPU): ``keras_adam`` stays within
about 5e-6 of Keras (8.4e-7 at step 1, 4.7e-6 at worst), ``optax.adam`` drifts to 2e-1. The
default ``--tolerance`` is 1e-5, above that float32 noise floor and far below the negative
control; the 1e-6 first asked for is below it. The gap is float32 rounding in the gradients,
which no optimizer can undo, not the optimizer:

- The optimizer alone is exact: JAX's update applied to Keras's own step-1 gradients gives
  Keras's step-1 parameters bit for bit (``step1_optimizer_only`` in the report).
- The gradients differ by float32 rounding (max ~1e-8 absolute; TensorFlow and XLA sum their
  matmuls in different orders, through oneDNN and YNNPACK, and compute softmax differently), and
  Adam's first step magnifies that: its update ``lr * g / (|g| + eps / sqrt(1 - beta_2))`` has
  slope up to ``lr * sqrt(1 - beta_2) / eps`` = 316 near ``g = 0``. The worst step-1 entry is a
  first-layer weight with g = -9.5e-7 and a gradient difference of 9.3e-10: a 188x gain, 1.75e-7
  in the weight, 8.4e-7 of max|θ|. The later jumps (steps ~100 and ~400 in ``parity.png``) are the
  same effect on weights of border pixels lit for the first time then (pixel 224 first at step
  100, pixel 114 at step 404, each in 2 of the 1000 batches): with ``v = 0`` until then, their
  first nonzero gradient is magnified ~300x again.
- Each framework differs from itself by as much when only its matmul library changes: Keras with
  oneDNN vs Eigen (``TF_ENABLE_ONEDNN_OPTS=0``) 9.8e-7 at step 1, 1.8e-6 at worst; JAX with
  YNNPACK vs Eigen dots (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``) 9.4e-7 and
  4.2e-6. So ~5e-6 at 1000 steps is float32's noise floor for this run, not an error in either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # Run as `python train/parity.py`: import train/ as a package from the root.
  sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from adamjax.testing import call_in_keras_backend
from train import parity_keras
from train.config import (
  DATA_SOURCES,
  OPTIMIZERS,
  Config,
  add_flags,
  check_choices,
  from_args,
  option,
)
from train.files import atomic_write
from train.input_pipeline import epoch_batches, load_data, scale_pixels
from train.parity_keras import PARAM_NAMES, dropout_scale
from train.parity_report import compare_params, make_report, plot_report, summary

__all__ = [
  "DROPOUT_MODES",
  "PARAM_NAMES",
  "ParityConfig",
  "compare_params",
  "dropout_scale",
  "main",
  "make_batches",
  "make_dropout_masks",
  "record_steps",
  "run_jax",
  "run_keras",
  "run_parity",
]

DROPOUT_MODES = ("off", "shared-masks", "random")
# Default tolerances (relative, max|Δθ| / max|θ|), by what is compared: see the docstrings of
# this file and of train/parity_model.py for the measurements behind them.
TUTORIAL_TOLERANCE = 1e-5
MODEL_TOLERANCE = 1e-4
RANDOM_TOLERANCE = 5e-2
NOISE_FACTOR = 10  # With --noise-floor: pass within this many times Keras's drift from itself.
REPORT, PLOT = "report.json", "parity.png"
EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
DEFAULT_RUNS = Path("workdir", "parity")
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ParityConfig:
  """What to compare; the defaults are the Keras tutorial's. Each field is a flag."""

  steps: int = option(1000, "training steps")
  optimizer: str = option(
    "keras_adam",
    "the JAX side's optimizer; keras_adam is the Keras-exact one, optax.adam the negative control",
    choices=tuple(OPTIMIZERS),
  )
  dropout: str = option(
    "off",
    "off: train without dropout (the exact comparison; with a MODEL, both sides get a copy "
    "whose random layers have rate 0); shared-masks (tutorial MLP): the same NumPy-drawn masks "
    "in both; random (a MODEL): random layers on, each side its own masks (a loose check)",
    choices=DROPOUT_MODES,
  )
  dropout_rate: float = option(0.2)
  seed: int = option(0, "Keras's initial weights, the batch order, the dropout masks")
  batch_size: int = option(32)
  learning_rate: float = option(1e-3)
  hidden: int = option(128)
  data_source: str = option(
    "auto", "MNIST source as in train/mnist.py; 'synthetic' is for tests", choices=DATA_SOURCES
  )
  data_dir: str | None = option(None, "folder with the four MNIST IDX files")
  cache_dir: str | None = option(None, "MNIST cache (default: ~/.cache/adamjax/mnist)")
  limit_train_examples: int | None = option(
    None, "draw batches from the first N training examples only", metavar="N"
  )
  record_every: int = option(
    1, "compare parameters every K steps, and at steps 1, 10, 100, ... and the last", metavar="K"
  )
  tolerance: float | None = option(
    None,
    "largest allowed max|Δθ|/max|θ| over the recorded steps (default: "
    f"{TUTORIAL_TOLERANCE:g} for the tutorial MLP, where keras_adam measures ~5e-6 after 1000 "
    f"MNIST steps, float32's noise floor (see this file's docstring); {MODEL_TOLERANCE:g} for "
    f"a MODEL, or {NOISE_FACTOR}x the --noise-floor; {RANDOM_TOLERANCE:g} with --dropout "
    "random, on the mean loss instead)",
  )
  threads: int = option(1, "TensorFlow's intra- and inter-op threads")
  keras_eager: bool = option(False, "run the Keras step op by op instead of in a tf.function")
  keras_dense_gradients: bool = option(
    False,
    "with a MODEL: densify TensorFlow's IndexedSlices gradients (Embedding) before Keras's "
    "Adam, which otherwise applies them slice by slice (see train/parity_model.py)",
  )
  plot: bool = option(True, f"write {PLOT}")
  noise_floor: bool = option(
    False,
    "with a MODEL: train it in Keras a second time with TensorFlow's other CPU kernels "
    "(TF_ENABLE_ONEDNN_OPTS flipped) from weights one ulp off, report how far Keras drifts "
    "from itself, and without "
    f"--tolerance pass when JAX stays within {NOISE_FACTOR}x that (and {MODEL_TOLERANCE:g})",
  )
  model: str | None = option(
    None,
    "a Keras 3 .keras file to compare instead of the tutorial MLP (also the positional "
    "argument); it must be compiled with Adam or AdamW and a built-in loss",
    metavar="MODEL.keras",
  )
  data: str | None = option(
    None,
    "with a MODEL: a .npz with x (or x0, x1, ...) and y (or y0, y1, ...), see "
    "train/parity_model.py",
    metavar="DATA.npz",
  )

  def __post_init__(self):
    check_choices(self)
    if self.steps < 1 or self.record_every < 1:
      raise ValueError("steps and record_every must be at least 1")
    if (self.model is None) != (self.data is None):
      raise ValueError("a MODEL and --data go together (the tutorial MLP takes neither)")
    if self.model is None and self.dropout == "random":
      raise ValueError("dropout 'random' is for a MODEL; the tutorial MLP has shared-masks")
    if self.model is None and (self.noise_floor or self.keras_dense_gradients):
      raise ValueError("--noise-floor and --keras-dense-gradients are for a MODEL")
    if self.model is not None and self.dropout == "shared-masks":
      raise ValueError("dropout 'shared-masks' is for the tutorial MLP; a MODEL has off or random")

  @property
  def resolved_tolerance(self) -> float:
    """``tolerance``, or the default for what is compared."""
    if self.tolerance is not None:
      return self.tolerance
    if self.model is None:
      return TUTORIAL_TOLERANCE
    return RANDOM_TOLERANCE if self.dropout == "random" else MODEL_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Inputs shared by both sides.


def record_steps(steps: int, every: int) -> np.ndarray:
  """The 1-based steps whose parameters are compared: every ``every``-th, 1, 10, 100, ..., last.

  Args:
    steps: Number of training steps.
    every: Record every this many steps (1: all of them).

  Returns:
    Sorted int64 array of distinct steps in ``1..steps``.
  """
  chosen = set(range(every, steps + 1, every)) | {steps}
  chosen |= {10**k for k in range(len(str(steps))) if 10**k <= steps}
  return np.array(sorted(chosen), dtype=np.int64)


def make_batches(config: ParityConfig, data: Any) -> tuple[np.ndarray, np.ndarray]:
  """The first ``config.steps`` training batches, in the training script's shuffled order.

  Epoch after epoch of ``epoch_batches(n, batch_size, seed, epoch)``; a final partial batch is
  skipped, so every step averages over ``batch_size`` examples in both frameworks.

  Args:
    config: Uses ``steps``, ``batch_size`` and ``seed``.
    data: ``MnistArrays`` (uint8 images [N, 28, 28], int32 labels [N]).

  Returns:
    ``(images, labels)``: uint8 [steps, batch, 28, 28] and int32 [steps, batch].
  """
  n = len(data.train_labels)
  if n < config.batch_size:
    raise ValueError(f"{n} training examples are fewer than one batch of {config.batch_size}")
  rows: list[np.ndarray] = []
  epoch = 0
  while len(rows) < config.steps:
    index, mask = epoch_batches(n, config.batch_size, config.seed, epoch)
    rows.extend(index[i] for i in range(len(index)) if mask[i].all())
    epoch += 1
  index = np.stack(rows[: config.steps])
  return data.train_images[index], data.train_labels[index].astype(np.int32)


def make_dropout_masks(config: ParityConfig) -> np.ndarray:
  """Keep masks for the hidden layer, bool [steps, batch, hidden], True with probability 1-rate.

  Drawn as TensorFlow draws them (a uniform sample ``u``, kept where ``u >= rate``), from a
  NumPy stream of its own, so they depend only on the seed.
  """
  rng = np.random.default_rng([config.seed, 0xD809])
  shape = (config.steps, config.batch_size, config.hidden)
  return rng.random(shape, dtype=np.float32) >= np.float32(config.dropout_rate)


# ---------------------------------------------------------------------------------------------
# The two sides.


def run_keras(
  config: ParityConfig,
  images: np.ndarray,
  labels: np.ndarray,
  masks: np.ndarray | None,
  recorded: np.ndarray,
  *,
  timeout: float = 3600.0,
) -> dict[str, Any]:
  """Trains the tutorial model in Keras on TensorFlow, in a subprocess, and returns its record.

  Args:
    config: Uses ``seed``, ``hidden``, ``dropout_rate``, ``learning_rate``, ``threads``,
      ``keras_eager``.
    images: uint8 [steps, batch, 28, 28]; Keras scales them by 1/255 as the tutorial does.
    labels: int32 [steps, batch].
    masks: bool [steps, batch, hidden] keep masks (shared-masks mode), or None (no dropout).
    recorded: The 1-based steps after which to record the parameters.
    timeout: Seconds before the worker is killed.

  Returns:
    ``{"init": {name: array}, "params": {name: [len(recorded), *shape]}, "loss": f32 [steps],
    "grads_step1": {name: array}, "iterations": int, "versions": {...}, "seconds": float}``,
    names as in ``PARAM_NAMES``.
  """
  spec = {
    "seed": config.seed,
    "hidden": config.hidden,
    "dropout_rate": config.dropout_rate,
    "learning_rate": config.learning_rate,
    "threads": config.threads,
    "eager": config.keras_eager,
    "recorded": [int(s) for s in recorded],
  }
  arrays = {"images": images, "labels": labels}
  if masks is not None:
    arrays["masks"] = masks
  start = time.perf_counter()
  out = call_in_keras_backend(
    "tensorflow",
    parity_keras.__file__,
    "train_keras",
    arrays,
    spec,
    timeout=timeout,
    pythonpath=[ROOT],
  )
  return {
    **{part: {n: out[f"{part}/{n}"] for n in PARAM_NAMES} for part in ("init", "params")},
    "grads_step1": {n: out[f"grads_step1/{n}"] for n in PARAM_NAMES},
    "loss": out["loss"],
    "iterations": int(out["iterations"]),
    "versions": json.loads(str(out["versions"])),
    "seconds": time.perf_counter() - start,
  }


def _nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """``{"dense/kernel": x}`` -> ``{"dense": {"kernel": x}}`` (the MLP's parameter tree)."""
  out: dict[str, dict[str, Any]] = {}
  for name, value in flat.items():
    layer, var = name.split("/")
    out.setdefault(layer, {})[var] = value
  return out


def _flat(tree: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
  """The inverse of :func:`_nest`, as host copies (``np.array`` copies: the device buffers
  may be donated to the next step)."""
  return {
    f"{layer}/{var}": np.array(v) for layer, vars_ in tree.items() for var, v in vars_.items()
  }


def _shared_mask_dropout(rate: float):
  """A dropout layer for the MLP that applies a given keep mask, in TensorFlow's arithmetic.

  The MLP hands its dropout layer the step's ``dropout_key`` as ``rngs``; here that value is the
  step's keep mask, applied as the Keras worker applies it (``tf.nn`` dropout with a mask).
  """
  import jax.numpy as jnp
  from flax import nnx

  scale = dropout_scale(rate)

  class SharedMaskDropout(nnx.Module):
    def __call__(self, x, *, deterministic: bool, rngs):
      return x if deterministic else jnp.where(rngs, x * scale, jnp.zeros_like(x))

  return SharedMaskDropout()


def _graphdef_for(config: ParityConfig, init: dict[str, np.ndarray], *, shared_masks: bool):
  """The MLP's graphdef (its dropout layer swapped for shared masks if asked), after checking
  that Keras's initial weights fit it exactly."""
  from flax import nnx

  from train.models import MLP

  model = MLP(config.hidden, config.dropout_rate, rngs=nnx.Rngs(params=config.seed))
  if shared_masks:
    model.dropout = _shared_mask_dropout(config.dropout_rate)
  graphdef, own = nnx.split(model, nnx.Param)
  mine = _flat(nnx.to_pure_dict(own))
  if set(mine) != set(PARAM_NAMES):
    raise ValueError(f"MLP parameters {sorted(mine)}, expected {sorted(PARAM_NAMES)}")
  for name in PARAM_NAMES:
    if mine[name].shape != init[name].shape or mine[name].dtype != init[name].dtype:
      raise ValueError(
        f"{name}: Keras {init[name].shape} {init[name].dtype}, "
        f"MLP {mine[name].shape} {mine[name].dtype}"
      )
  return graphdef


def run_jax(
  config: ParityConfig,
  init: dict[str, np.ndarray],
  images: np.ndarray,
  labels: np.ndarray,
  masks: np.ndarray | None,
  recorded: np.ndarray,
  keras_grads_step1: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
  """Trains the ``MLP`` from ``init`` with ``config.optimizer``, by the training script's step.

  One jitted ``train.train.train_step`` (forward, loss, gradients, optimizer update) per batch,
  the state donated, as train/mnist.py trains.

  Args:
    config: Uses ``optimizer``, ``learning_rate``, ``hidden``, ``dropout_rate``, ``seed``.
    init: Initial parameters by name (``PARAM_NAMES``), from Keras.
    images: uint8 [steps, batch, 28, 28], scaled with ``scale_pixels``.
    labels: int32 [steps, batch].
    masks: bool [steps, batch, hidden] keep masks, or None (no dropout).
    recorded: The 1-based steps after which to record the parameters.
    keras_grads_step1: Keras's gradients at step 1, by name (optional). The optimizer alone
      is then also applied to them, from ``init``: the parameters after that one update
      separate the optimizer's share of the step-1 difference from the gradients' share.

  Returns:
    ``{"params": {name: [len(recorded), *shape]}, "loss": f32 [steps],
    "grads_step1": {name: array}, "step1_from_keras_grads": {name: array} or None,
    "count": int (the optimizer's step counter, if it has one), "pixels_match_keras": bool,
    "seconds": float}``.
  """
  import jax
  import jax.numpy as jnp

  from train.train import TrainState, apply_gradients, train_step

  start = time.perf_counter()
  # The tutorial's x / 255.0 in float32, which the Keras worker feeds, must be exactly what
  # the training script's pixel table gives; otherwise the runs differ before the first step.
  pixels = np.arange(256, dtype=np.uint8)
  pixels_match = bool(np.array_equal(scale_pixels(pixels), (pixels / 255.0).astype(np.float32)))

  graphdef = _graphdef_for(config, init, shared_masks=masks is not None)
  params = jax.tree.map(jnp.asarray, _nest(init))
  tx = OPTIMIZERS[config.optimizer](config.learning_rate)
  state = TrainState(np.int32(0), params, tx.init(params), np.float32(0), np.int32(0), np.int32(0))

  step1_from_keras_grads = None
  if keras_grads_step1 is not None:
    # The state is an argument, not tx.init inside the jit: with the zero moments as
    # compile-time constants, XLA's simplifier folds them and reassociates the constant
    # products (g * 0.1 * alpha -> g * (0.1 * alpha)), which rounds differently.
    update = jax.jit(lambda p, s, g: apply_gradients(tx, p, s, g)[0])
    step1_from_keras_grads = _flat(update(params, state.opt_state, _nest(keras_grads_step1)))
  step = jax.jit(lambda *args: train_step(graphdef, tx, *args), donate_argnums=0)
  every_example = np.ones(labels.shape[1], bool)  # Full batches only (make_batches).
  recorded = {int(s) for s in recorded}
  history: dict[str, list[np.ndarray]] = {n: [] for n in PARAM_NAMES}
  losses = np.zeros(len(labels), np.float32)
  grads_step1: dict[str, np.ndarray] = {}
  for t in range(len(labels)):
    keep = None if masks is None else masks[t]
    x = scale_pixels(images[t])
    state, losses[t], grads = step(state, x, labels[t], every_example, keep)
    if t == 0:
      grads_step1 = _flat(grads)
    if t + 1 in recorded:
      for n, value in _flat(state.params).items():
        history[n].append(value)
  counts = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0 and x.dtype.kind in "iu"]
  return {
    "params": {n: np.stack(h) for n, h in history.items()},
    "loss": losses,
    "grads_step1": grads_step1,
    "step1_from_keras_grads": step1_from_keras_grads,
    "count": int(counts[0]) if counts else None,
    "pixels_match_keras": pixels_match,
    "seconds": time.perf_counter() - start,
  }


def run_parity(config: ParityConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains in Keras (TensorFlow) and in JAX from the same start; writes and returns the report.

  Args:
    config: The comparison to make (see :class:`ParityConfig`).
    workdir: Folder for ``report.json`` and ``parity.png`` (created if missing).

  Returns:
    The report written to ``report.json``: ``config``, ``versions``, ``data_source``,
    ``steps`` (the recorded steps), ``param_abs``, ``param_rel`` and ``identical_fraction``
    (per recorded step), ``loss_keras``, ``loss_jax`` and ``loss_abs`` (per step),
    ``worst`` (the recorded step with the largest ``param_rel``), ``final``, ``milestones``
    (steps 1, 10, 100, ... and the last), ``max_loss_abs``, ``per_param_final``,
    ``grads_step1`` (the two frameworks' gradients at step 1, from the same weights),
    ``step1_optimizer_only`` (JAX's update of Keras's step-1 gradients vs Keras's step 1),
    ``checks`` (pixel scaling, no TensorFlow in this process, step counters), ``criterion``,
    ``tolerance``, ``max_param_rel``, ``passed`` and ``seconds``.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.model is not None:
    from train import parity_model

    report = parity_model.run_parity_model(config, workdir)
    _write(report, workdir, config.plot)
    return report
  data = load_data(
    Config(
      data_source=config.data_source,
      data_dir=config.data_dir,
      cache_dir=config.cache_dir,
      limit_train_examples=config.limit_train_examples,
      limit_test_examples=1,
    )
  )
  images, labels = make_batches(config, data)
  masks = make_dropout_masks(config) if config.dropout == "shared-masks" else None
  recorded = record_steps(config.steps, config.record_every)

  keras_run = run_keras(config, images, labels, masks, recorded)
  jax_run = run_jax(
    config,
    keras_run["init"],
    images,
    labels,
    masks,
    recorded,
    keras_grads_step1=keras_run["grads_step1"],
  )
  report = make_report(
    config, data.source, recorded, keras_run, jax_run, tolerance=config.resolved_tolerance
  )
  _write(report, workdir, config.plot)
  return report


def _write(report: dict[str, Any], workdir: Path, plot: bool) -> None:
  text = json.dumps(report, indent=1) + "\n"
  atomic_write(workdir / REPORT, lambda p: p.write_text(text))
  if plot:
    plot_report(report, workdir / PLOT)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, ParityConfig]:
  """Parses the command line into the namespace and a :class:`ParityConfig`."""
  parser = argparse.ArgumentParser(
    description="Train the Keras tutorial MLP, or any Keras model file (MODEL.keras --data "
    "DATA.npz), in Keras (TensorFlow backend) and in JAX from the same weights on the same "
    "batches, and report how far they drift apart. "
    "Exit code 0: within --tolerance; 1: not; 2: error."
  )
  parser.add_argument(
    "--workdir", help=f"report.json and parity.png (default: a new {DEFAULT_RUNS}/<date-time>)"
  )
  parser.add_argument(
    "model_file",
    nargs="?",
    metavar="MODEL.keras",
    help="a Keras 3 model file to compare instead of the tutorial MLP (needs --data)",
  )
  add_flags(parser, ParityConfig)
  args = parser.parse_args(argv)
  if args.model_file is not None:
    if args.model is not None and args.model != args.model_file:
      parser.error("the model is given twice (positional and --model)")
    args.model = args.model_file
  try:
    return args, from_args(ParityConfig, args)
  except ValueError as e:
    parser.error(str(e))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the comparison from the command line; returns the exit code."""
  from train.runtime import start_jax

  args, config = parse_args(argv)
  # One XLA:CPU thread: this model's ops are tiny, and the machine may be shared. The thread
  # count does not change XLA's results (see train/runtime.py).
  start_jax(cpu_threads="1")
  workdir = Path(args.workdir) if args.workdir else DEFAULT_RUNS / time.strftime("%Y%m%d-%H%M%S")
  try:
    report = run_parity(config, workdir)
  except (RuntimeError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  print(
    f"{config.model or 'tutorial MLP'}: Keras (TensorFlow) vs JAX {config.optimizer}, "
    f"dropout {config.dropout}, {config.steps} steps on {report['data_source']} data"
  )
  for note in report.get("notes", []):
    print(f"note: {note}")
  print(summary(report))
  print(f"report: {workdir / REPORT}")
  return EXIT_PASSED if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
  sys.exit(main())
