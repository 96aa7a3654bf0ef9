"""train/parity.py for any Keras model file: its data, its random layers, and the JAX side.

``python -m train.parity MODEL.keras --data DATA.npz`` trains the model in Keras on TensorFlow
(``train/parity_keras.py``'s ``train_keras_model``, a subprocess) and its converted Flax model
here, from the same file, on the same batches, and compares them step by step.

The data file (``DATA.npz``, read without pickles) holds the inputs as ``x`` (one input) or
``x0, x1, ...`` (one per model input, in the model's input order) and the targets as ``y`` or
``y0, y1, ...`` (one per model output), all with the same number of examples N along axis 0.
Float arrays are cast to float32, as Keras's data adapters cast them to ``floatx``; integer
arrays (token ids, sparse labels) are kept. Step ``t`` (from 0) takes rows ``[b*B, (b+1)*B)``
with ``b = t mod (N // B)``: the file's order, no shuffling, full batches only, epoch after
epoch.

The JAX side is what the converter gives a user: ``adamjax.convert.flax_model`` (the file's
weights, moving statistics and constants), ``converted_optimizer`` (Keras Adam/AdamW with the
file's settings; frozen layers get no updates) and ``adam_state`` (the file's moments and
iteration count, zero for a model compiled but never trained). Each step, in one jitted
function, computes what Keras's ``train_step`` computes: the outputs in training mode (BatchNorm
batch statistics, its moving statistics updated with Keras's momentum), the compiled loss
(``adamjax.convert._losses``, from ``compile_config``), plus every activity penalty
(``model.run``) and weight-regularizer penalty (``model.losses()``), as Keras adds
``model.losses`` in ``compute_loss``; the gradients; the optimizer update; then the weight
constraints (``model.apply_constraints()``), which Keras's optimizer applies after each update.

Random layers (Dropout and its kin, GaussianNoise, the ``dropout``/``recurrent_dropout`` of
recurrent layers, attention dropout): Keras's TensorFlow random streams cannot be reproduced in
JAX, and with different masks the two runs differ by far more than float32 rounding from the
first step, so no tolerance would tell a correct conversion from a wrong one. By default
(``--dropout off``) both sides therefore get a copy of the file whose config has those rates
set to 0 (listed in the report's ``random_layers``): Keras's random layers are then the
identity in training, and the comparison is exact up to float32 rounding. ``--dropout random``
keeps them, each side drawing its own masks; the report says so, and since the parameters then
differ by about a learning rate from the first step, the pass criterion becomes the relative
difference of the mean training loss over the run (default tolerance 5e-2), which catches only
gross errors (a wrong loss, a missing penalty); the parameter differences are still reported.

What to expect: the converted model's gradients are bit-identical to Keras's on the JAX backend
for the same weights and batch (checked for the CNN of ``benchmarks/parity_any_model.py``), so
what remains is Keras-TensorFlow against Keras-JAX: float32 rounding in different kernels,
magnified where a gradient is a small difference of large sums (BatchNorm's backward pass,
~2e-5 relative at step 1 for that CNN) and then by Adam, whose step ``g / (sqrt(v) + eps)`` is
steep near ``g = 0``. Two known sources besides: a variable with a zero true gradient (a bias
right before BatchNorm) whose rounding noise Adam turns into learning-rate-sized steps (the
report's ``noise_gradients``), and Keras-TensorFlow's crossentropies on a softmax or sigmoid
output, which use the logits saved on the tensor instead of the clipped probabilities that
Keras-JAX and ``adamjax.convert._losses`` use. ``benchmarks/results/parity_any_model.md`` has
the measured figures.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Keras layers that draw random numbers in training, and the config fields that turn it off
# at 0 (each layer's ``call`` skips its noise when the rate or stddev is 0).
RANDOM_FIELDS = {
  "Dropout": ("rate",),
  "SpatialDropout1D": ("rate",),
  "SpatialDropout2D": ("rate",),
  "SpatialDropout3D": ("rate",),
  "GaussianDropout": ("rate",),
  "AlphaDropout": ("rate",),
  "GaussianNoise": ("stddev",),
  "SimpleRNN": ("dropout", "recurrent_dropout"),
  "LSTM": ("dropout", "recurrent_dropout"),
  "GRU": ("dropout", "recurrent_dropout"),
  "MultiHeadAttention": ("dropout",),
  "Attention": ("dropout",),
  "AdditiveAttention": ("dropout",),
}
_X, _Y = re.compile(r"^x(\d*)$"), re.compile(r"^y(\d*)$")


# ---------------------------------------------------------------------------------------------
# The model file and its random layers.


def random_layers(config: Any, *, zero: bool = False, path: str | None = None) -> list[str]:
  """Every random layer of a model config with a nonzero rate, as ``"path: Class.field=value"``.

  With ``zero=True`` those fields are set to 0 in ``config`` (in place). Nested models,
  ``Bidirectional``'s wrapped layers and any other nested layer config are walked.
  """
  found: list[str] = []
  if isinstance(config, list):
    for item in config:
      found += random_layers(item, zero=zero, path=path or "")
  elif isinstance(config, dict):
    inner = config.get("config")
    if isinstance(config.get("class_name"), str) and isinstance(inner, dict):
      # Paths from the root model's layers (the root's own name is left out).
      name = inner.get("name", config["class_name"])
      here = "" if path is None else f"{path}/{name}".lstrip("/")
      for field in RANDOM_FIELDS.get(config["class_name"], ()):
        value = inner.get(field)
        if isinstance(value, (int, float)) and value > 0:
          found.append(f"{here}: {config['class_name']}.{field}={value}")
          if zero:
            inner[field] = 0.0
      for value in inner.values():
        found += random_layers(value, zero=zero, path=here)
    else:
      for value in config.values():
        found += random_layers(value, zero=zero, path=path or "")
  return found


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
  """A ``.keras`` file's ``config.json`` (the converter has already validated the file)."""
  with zipfile.ZipFile(path) as archive:
    return json.loads(archive.read("config.json"))


def write_model_copy(
  source: str | os.PathLike, dest: str | os.PathLike, config: dict[str, Any]
) -> None:
  """``source``'s ``.keras`` archive with ``config.json`` replaced (weights, optimizer as is)."""
  with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      data = json.dumps(config).encode() if info.filename == "config.json" else src.read(info)
      dst.writestr(info, data)


def prepare_model(source: str | os.PathLike, workdir: Path, mode: str) -> tuple[Path, list[str]]:
  """The model file both sides train: ``source`` itself, or (``mode="off"`` with random layers)
  a copy in ``workdir`` with their rates at 0. Returns it and the random layers found."""
  if zipfile.is_zipfile(source):
    config = read_model_config(source)
  else:
    raise ValueError(f"{source}: the model must be a Keras 3 .keras file (a zip archive)")
  found = random_layers(copy.deepcopy(config))
  if mode != "off" or not found:
    return Path(source), found
  random_layers(config, zero=True)
  dest = workdir / f"{Path(source).stem}.no_random.keras"
  write_model_copy(source, dest, config)
  return dest, found


# ---------------------------------------------------------------------------------------------
# Data.


def _numbered(keys: Sequence[str], pattern: re.Pattern, what: str) -> list[str]:
  matched = sorted((k for k in keys if pattern.match(k)), key=lambda k: (len(k), k))
  if not matched:
    raise ValueError(f"the data file has no {what} array ('{what}' or '{what}0', '{what}1', ...)")
  if len(matched) > 1 or matched[0] != what:
    expected = [f"{what}{i}" for i in range(len(matched))]
    if matched != expected:
      raise ValueError(f"the data file's {what} arrays are {matched}; expected {expected}")
  return matched


def load_data(path: str | os.PathLike) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The inputs and targets of a ``DATA.npz`` (see the module docstring for the layout).

  Raises:
    ValueError: for a missing or misnumbered array, an object array, arrays of different
      lengths, or arrays other than x*/y*.
  """
  with np.load(path, allow_pickle=False) as data:
    keys = list(data.keys())
    other = [k for k in keys if not (_X.match(k) or _Y.match(k))]
    if other:
      raise ValueError(f"{path}: unexpected arrays {other} (only x, x0.. and y, y0.. are read)")
    xs = [data[k] for k in _numbered(keys, _X, "x")]
    ys = [data[k] for k in _numbered(keys, _Y, "y")]
  lengths = {a.shape[0] if a.ndim else None for a in xs + ys}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(f"{path}: the arrays must share their first axis, got lengths {lengths}")
  for a in xs + ys:
    if a.dtype.kind not in "biuf":
      raise ValueError(f"{path}: arrays must be numeric or bool, got {a.dtype}")
  cast = lambda a: a.astype(np.float32) if a.dtype.kind == "f" else a  # noqa: E731
  return [cast(a) for a in xs], [cast(a) for a in ys]


def batch_index(n: int, batch_size: int, steps: int) -> np.ndarray:
  """int64 [steps, batch_size]: step t takes rows of batch ``t mod (n // batch_size)``, in order."""
  per_epoch = n // batch_size
  if per_epoch < 1:
    raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
  b = np.arange(steps) % per_epoch
  return b[:, None] * batch_size + np.arange(batch_size)[None, :]


# ---------------------------------------------------------------------------------------------
# The JAX side.


def output_names(config: dict[str, Any]) -> list[str]:
  """The model's output layer names, in output order (dict losses are keyed by them)."""
  inner = config.get("config") or {}
  if config.get("class_name") == "Sequential":
    layers = inner.get("layers") or [{}]
    return [str((layers[-1].get("config") or {}).get("name", "output"))]
  outputs = inner.get("output_layers")
  if outputs and not isinstance(outputs[0], list):
    outputs = [outputs]
  return [str(o[0]) for o in outputs or []]


def run_jax_model(
  config: Any,
  model_path: Path,
  xs: list[np.ndarray],
  ys: list[np.ndarray],
  index: np.ndarray,
  recorded: np.ndarray,
  names: Sequence[str],
  keras_grads_step1: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
  """Trains the converted model on the batches; records it under Keras's variable names.

  Args:
    config: The ``ParityConfig`` (uses ``optimizer``, ``dropout``, ``seed``).
    model_path: The ``.keras`` file both sides train.
    xs, ys: The data (:func:`load_data`); ``index`` [steps, batch] the rows of each step.
    recorded: The 1-based steps after which to record the variables.
    names: Keras's variable paths (``model.weights``), in order, from the Keras run; the
      converter's layers list the same variables in the same order.
    keras_grads_step1: Keras's step-1 gradients by name; the optimizer (and constraints) alone
      are then also applied to them from the initial weights.

  Returns:
    ``{"init", "params", "state", "loss", "grads_step1", "step1_from_keras_grads", "count",
    "trainable", "seconds"}``: ``params`` and ``state`` are name -> ``[len(recorded), *shape]``
    for the trainable and the other variables.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from adamjax import convert
  from adamjax.convert import _losses
  from adamjax.convert._flax import variable_paths
  from train.config import OPTIMIZERS

  start = time.perf_counter()
  ckpt = convert.read(model_path)
  model = convert.flax_model(ckpt)
  keys = [(layer.name, var) for layer in ckpt.layers for var in layer.weights]
  if len(keys) != len(names):
    raise ValueError(
      f"Keras's model.weights has {len(names)} variables, the converter's layers {len(keys)}"
    )
  paths = variable_paths(ckpt.layers)
  flax_path = {name: paths[key] for name, key in zip(names, keys, strict=True)}
  trainable = {
    name: var in layer.trainable
    for name, (layer, var) in zip(
      names, [(layer, var) for layer in ckpt.layers for var in layer.weights], strict=True
    )
  }

  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

  def by_name(*trees) -> dict[str, np.ndarray]:
    out = {}
    for name, path in flax_path.items():
      for tree in trees:
        node = tree
        for part in path:
          node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
          out[name] = np.array(node)
          break
    return out

  init = by_name(params, stats, nnx.to_pure_dict(nnx.state(model)))
  missing = sorted(set(names) - set(init))
  if missing:
    raise ValueError(f"variables {missing} are not in the converted model")

  if config.optimizer == "keras_adam":
    tx = convert.converted_optimizer(ckpt, params)
  else:  # A negative control: another Adam with the file's learning rate.
    tx = OPTIMIZERS[config.optimizer](_file_lr(ckpt))
  opt_state = convert.adam_state(ckpt, tx, params)
  model_config = read_model_config(model_path)
  outs = output_names(model_config)
  example = [x[index[0]] for x in xs]
  shapes = jax.eval_shape(lambda xs: _as_list(model(*xs)), example)
  loss = _losses.compiled_loss(
    model_config.get("compile_config") or {},
    outs if len(outs) == len(shapes) else [f"output_{i}" for i in range(len(shapes))],
    [y[index[0]] for y in ys],
    shapes,
  )
  if len(ys) != len(shapes):
    raise ValueError(f"the model has {len(shapes)} outputs, the data file {len(ys)} y arrays")
  random = config.dropout == "random"

  def forward_loss(params, stats, x, y, key):
    m = nnx.merge(graphdef, params, stats, rest)
    rngs = nnx.Rngs(dropout=key) if random else None
    out, masks, activity = m.run(list(x), None, training=True, rngs=rngs)
    out, masks = _as_list(out), _as_list(masks)
    total = loss(y, out, masks)
    extra = [*activity, *m.losses()]
    if extra:  # Keras: ops.sum([compiled loss, *model.losses]).
      total = jnp.sum(jnp.stack([total, *(jnp.sum(e).astype(jnp.float32) for e in extra)]))
    return total, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

  def constrain(params, stats):
    m = nnx.merge(graphdef, params, stats, rest)
    m.apply_constraints()
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))

  def update(params, stats, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return constrain(optax.apply_updates(params, updates), stats), opt_state

  def step(params, stats, opt_state, x, y, key):
    (total, stats), grads = jax.value_and_grad(forward_loss, has_aux=True)(params, stats, x, y, key)
    params, opt_state = update(params, stats, opt_state, grads)
    return params, stats, opt_state, total, grads

  step1_from_keras_grads = None
  if keras_grads_step1 is not None:
    grads = _nest_like(params, flax_path, keras_grads_step1)
    new_params, _ = jax.jit(update)(params, stats, opt_state, grads)
    step1_from_keras_grads = {
      n: v for n, v in by_name(new_params).items() if n in keras_grads_step1
    }

  jitted = jax.jit(step, donate_argnums=(0, 1, 2))
  root = jax.random.key(config.seed)
  recorded_set = {int(s) for s in recorded}
  history: dict[str, list[np.ndarray]] = {n: [] for n in names}
  losses = np.zeros(len(index), np.float32)
  grads_step1: dict[str, np.ndarray] = {}
  for t in range(len(index)):
    x = [jnp.asarray(a[index[t]]) for a in xs]
    y = [jnp.asarray(a[index[t]]) for a in ys]
    params, stats, opt_state, total, grads = jitted(
      params, stats, opt_state, x, y, jax.random.fold_in(root, t)
    )
    losses[t] = total
    if t == 0:
      grads_step1 = {n: g for n, g in by_name(grads).items() if trainable[n]}
    if t + 1 in recorded_set:
      for n, value in by_name(params, stats).items():
        history[n].append(value)
  counts = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0 and x.dtype.kind in "iu"]
  stacked = {n: np.stack(h) for n, h in history.items()}
  return {
    "init": init,
    "params": {n: v for n, v in stacked.items() if n in grads_step1},
    "state": {n: v for n, v in stacked.items() if n not in grads_step1},
    "loss": losses,
    "grads_step1": grads_step1,
    "step1_from_keras_grads": step1_from_keras_grads,
    "count": int(counts[0]) if counts else None,
    "trainable": trainable,
    "seconds": time.perf_counter() - start,
  }


def _file_lr(ckpt) -> float:
  opt = ckpt.optimizer
  lr = opt.learning_rate if opt.learning_rate is not None else opt.config.get("learning_rate")
  return float(lr)


def _as_list(x: Any) -> list[Any]:
  return list(x) if isinstance(x, (list, tuple)) else [x]


def _nest_like(tree: Any, flax_path: dict[str, tuple], flat: dict[str, np.ndarray]) -> Any:
  """``tree`` (nested dicts) with the leaves named in ``flat`` replaced; others zero."""
  import jax

  out = jax.tree.map(np.zeros_like, tree)
  for name, value in flat.items():
    node = out
    *parents, leaf = flax_path[name]
    for part in parents:
      node = node[part]
    node[leaf] = np.asarray(value)
  return out


# ---------------------------------------------------------------------------------------------
# Both sides, compared.


def run_keras_model(
  config: Any,
  model_path: Path,
  xs: list[np.ndarray],
  ys: list[np.ndarray],
  index: np.ndarray,
  recorded: np.ndarray,
  *,
  timeout: float = 3600.0,
  env: dict[str, str] | None = None,
  perturb_seed: int | None = None,
) -> dict[str, Any]:
  """Trains ``model_path`` in Keras on TensorFlow in a subprocess; returns its record by name.

  ``env``: extra environment variables for the subprocess (``TF_ENABLE_ONEDNN_OPTS=0`` runs
  TensorFlow's Eigen kernels instead of oneDNN's). ``perturb_seed``: start from the trainable
  weights moved by one ulp each, up or down at random (the noise-floor control).
  """
  from adamjax.testing import call_in_keras_backend
  from train import parity_keras

  spec = {
    "model": str(Path(model_path).resolve()),
    "seed": config.seed,
    "threads": config.threads,
    "eager": config.keras_eager,
    "recorded": [int(s) for s in recorded],
    "dense_gradients": config.keras_dense_gradients,
    "perturb_seed": perturb_seed,
  }
  arrays = {f"x{i}": x for i, x in enumerate(xs)}
  arrays.update({f"y{i}": y for i, y in enumerate(ys)})
  arrays["index"] = index
  start = time.perf_counter()
  root = Path(__file__).resolve().parents[1]
  out = call_in_keras_backend(
    "tensorflow",
    parity_keras.__file__,
    "train_keras_model",
    arrays,
    spec,
    timeout=timeout,
    pythonpath=[root],
    env=env,
  )
  names = [str(n) for n in out["names"]]
  trainable = dict(zip(names, (bool(t) for t in out["trainable"]), strict=True))
  if len(set(names)) != len(names):
    raise ValueError(f"Keras's variable paths are not unique: {names}")
  params = {n: out[f"params/{i}"] for i, n in enumerate(names)}
  return {
    "names": names,
    "init": {n: out[f"init/{i}"] for i, n in enumerate(names)},
    "params": {n: v for n, v in params.items() if trainable[n]},
    "state": {n: v for n, v in params.items() if not trainable[n]},
    "grads_step1": {n: out[f"grads_step1/{i}"] for i, n in enumerate(names) if trainable[n]},
    "trainable": trainable,
    "loss": out["loss"],
    "iterations": int(out["iterations"]),
    "sparse_gradients": json.loads(str(out["sparse_gradients"])),
    "versions": json.loads(str(out["versions"])),
    "seconds": time.perf_counter() - start,
  }


def noise_floor(keras_run: dict, other: dict, flipped: str) -> dict[str, Any]:
  """How far Keras drifts from itself when only TensorFlow's CPU kernels change."""
  from train.parity_report import compare_params

  params = compare_params(other["params"], keras_run["params"])
  rel = list(params["param_rel"])
  state_rel: list[float] = []
  if keras_run["state"]:
    state_rel = compare_params(other["state"], keras_run["state"])["param_rel"]
  loss = np.abs(other["loss"].astype(np.float64) - keras_run["loss"])
  return {
    "what": (
      f"Keras (TensorFlow) against itself with TF_ENABLE_ONEDNN_OPTS={flipped} and its initial "
      "trainable weights one ulp off"
    ),
    "param_rel": rel,
    "state_rel": state_rel,
    "max_param_rel": float(np.max(rel)),
    "max_state_rel": float(np.max(state_rel)) if state_rel else None,
    "max_rel": float(np.max(rel + state_rel)),
    "max_loss_abs": float(loss.max()),
    "seconds": other["seconds"],
  }


def run_parity_model(config: Any, workdir: Path) -> dict[str, Any]:
  """The comparison for ``config.model`` on ``config.data``; returns the report (unwritten)."""
  from train.parity import record_steps
  from train.parity_report import make_report

  source = Path(config.model)
  xs, ys = load_data(config.data)
  # Convert first: the converter's allow-list checks the file before Keras loads it.
  from adamjax import convert

  convert.flax_model(source)
  model_path, found = prepare_model(source, workdir, config.dropout)
  index = batch_index(len(xs[0]), config.batch_size, config.steps)
  recorded = record_steps(config.steps, config.record_every)
  keras_run = run_keras_model(config, model_path, xs, ys, index, recorded)
  floor = None
  if config.noise_floor:
    # Keras against itself, one rounding error apart: TensorFlow's other CPU kernels (oneDNN
    # <-> Eigen) and every trainable weight one ulp off. How far that grows over the run is
    # what float32 rounding alone does to this model's training.
    flipped = "0" if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0" else "1"
    other = run_keras_model(
      config,
      model_path,
      xs,
      ys,
      index,
      recorded,
      env={"TF_ENABLE_ONEDNN_OPTS": flipped},
      perturb_seed=config.seed + 1,
    )
    floor = noise_floor(keras_run, other, flipped)
  jax_run = run_jax_model(
    config,
    model_path,
    xs,
    ys,
    index,
    recorded,
    keras_run["names"],
    keras_grads_step1=keras_run["grads_step1"],
  )
  if set(jax_run["params"]) != set(keras_run["params"]):
    raise ValueError(
      f"trainable variables differ: Keras {sorted(keras_run['params'])}, "
      f"JAX {sorted(jax_run['params'])}"
    )
  init_same = all(
    np.array_equal(jax_run["init"][n], keras_run["init"][n]) for n in keras_run["names"]
  )
  notes = []
  if found and config.dropout == "off":
    notes.append(
      f"{len(found)} random layer setting(s) set to 0 in the copy both sides trained "
      f"({model_path.name}): Keras's TensorFlow random streams cannot be reproduced in JAX"
    )
  elif found:
    notes.append(
      f"{len(found)} random layer setting(s) left on: each side draws its own masks, so the "
      "differences measure different noise, not float32 rounding; the tolerance is loose"
    )
  model_config = read_model_config(model_path)
  extra = {
    "model": str(source),
    "trained_file": str(model_path),
    "data": str(config.data),
    "examples": int(len(xs[0])),
    "input_shapes": [list(x.shape[1:]) for x in xs],
    "target_shapes": [list(y.shape[1:]) for y in ys],
    "random_layers": found,
    "randomness": "random" if (found and config.dropout == "random") else "off",
    "loss": (model_config.get("compile_config") or {}).get("loss"),
    "notes": notes,
  }
  # A variable whose true gradient is zero (a bias feeding straight into BatchNorm, which
  # subtracts it again) gets gradients of pure rounding noise, which differ in sign between the
  # frameworks; Adam turns any nonzero gradient into a step of about the learning rate, so such
  # a variable drifts apart by design. It shows as a step-1 gradient difference as large as the
  # gradient itself.
  noise = [
    n
    for n, g in keras_run["grads_step1"].items()
    if np.max(np.abs(jax_run["grads_step1"][n].astype(np.float64) - g), initial=0.0)
    > 0.1 * np.max(np.abs(g), initial=0.0)
  ]
  if noise:
    notes.append(
      f"step-1 gradients of {noise} are rounding noise (their difference is over 10% of their "
      "size: e.g. a bias right before BatchNormalization, or attention's key bias, whose true gradients are 0); Adam "
      "turns noise into steps of about the learning rate, so these drift apart in any two runs"
    )
  extra["noise_gradients"] = noise
  sparse = keras_run["sparse_gradients"]
  extra["keras_sparse_gradients"] = sparse
  if sparse and not config.keras_dense_gradients:
    notes.append(
      f"Keras (TensorFlow) gave IndexedSlices gradients for {sparse} and its Adam applies them "
      "slice by slice: a row repeated in a batch has each slice squared into v on its own, and "
      "rows not in the batch keep their moments; JAX (like Keras on JAX) uses dense gradients. "
      "--keras-dense-gradients densifies them on the Keras side to compare the rest"
    )
  tolerance = config.resolved_tolerance
  if floor is not None:
    extra["noise_floor"] = floor
    if config.tolerance is None and config.dropout != "random":
      from train.parity import MODEL_TOLERANCE, NOISE_FACTOR

      tolerance = max(NOISE_FACTOR * floor["max_rel"], MODEL_TOLERANCE)
  checks = {"initial_weights_identical": init_same}
  report = make_report(
    config,
    Path(config.data).name,
    recorded,
    keras_run,
    jax_run,
    tolerance=tolerance,
    checks=checks,
    extra=extra,
  )
  if extra["randomness"] == "random":
    k, j = keras_run["loss"].astype(np.float64), jax_run["loss"].astype(np.float64)
    mean_rel = float(abs(j.mean() - k.mean()) / abs(k.mean()))
    report["criterion"] = (
      "random layers on (different masks on each side): |mean(loss_jax) - mean(loss_keras)| "
      "/ |mean(loss_keras)| over all steps; the parameter differences are reported, not judged"
    )
    report["mean_loss_rel"] = mean_rel
    report["passed"] = bool(np.isfinite(mean_rel) and mean_rel <= report["tolerance"])
  return report
